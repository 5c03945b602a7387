"""Typed errors raised anywhere in Hearth; the API maps them to responses in one place (api/errors.py)."""

from __future__ import annotations


class HearthError(Exception):
    """An error with everything a client needs: HTTP status, OpenAI error type, code and field."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}


class InvalidRequest(HearthError):
    status = 400
    type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class CapabilityNotSupported(InvalidRequest):
    code = "unsupported_capability"


class Unauthorized(HearthError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class ModelDisabled(HearthError):
    status = 403
    type = "permission_error"
    code = "model_disabled"


class NotFound(HearthError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class PayloadTooLarge(HearthError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class Overloaded(HearthError):
    status = 429
    type = "rate_limit_error"
    code = "server_busy"

    def __init__(self, message: str, **kwargs: object) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.headers.setdefault("Retry-After", "1")


class ModelLoadFailed(HearthError):
    status = 500
    type = "server_error"
    code = "model_load_failed"


class BackendError(HearthError):
    status = 500
    type = "server_error"
    code = "backend_error"


class RunnerCrashed(HearthError):
    """The model's runner process died; the next request starts a fresh one."""

    status = 503
    type = "server_error"
    code = "runner_crashed"


class ServiceUnavailable(HearthError):
    status = 503
    type = "server_error"
    code = "unavailable"


class ConfigError(Exception):
    """A model config that cannot be used; carries the file (and line) at fault."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None) -> None:
        where = file or ""
        if file and line:
            where = f"{file}:{line}"
        super().__init__(f"{where}: {message}" if where else message)
        self.reason = message
        self.file = file
        self.line = line
