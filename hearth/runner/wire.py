"""Carrying Hearth's typed errors across the gRPC boundary, both ways."""

from __future__ import annotations

import grpc

from hearth import errors

CLASS_KEY = "hearth-error-class"
CODE_KEY = "hearth-error-code"
PARAM_KEY = "hearth-error-param"

_STATUS_BY_HTTP = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
}

# Errors a runner may raise, by class name; anything else arrives as BackendError.
_CLASSES: dict[str, type[errors.HearthError]] = {
    cls.__name__: cls
    for cls in (
        errors.InvalidRequest,
        errors.ContextLengthExceeded,
        errors.CapabilityNotSupported,
        errors.Overloaded,
        errors.ModelLoadFailed,
        errors.BackendError,
        errors.NotFound,
    )
}


def to_status(error: errors.HearthError) -> tuple[grpc.StatusCode, tuple[tuple[str, str], ...]]:
    """The gRPC status and trailing metadata that carry `error`."""
    code = _STATUS_BY_HTTP.get(error.status, grpc.StatusCode.INTERNAL)
    trailers = [(CLASS_KEY, type(error).__name__)]
    if error.code:
        trailers.append((CODE_KEY, error.code))
    if error.param:
        trailers.append((PARAM_KEY, error.param))
    return code, tuple(trailers)


def from_status(details: str, trailers: tuple[tuple[str, str | bytes], ...] | None) -> errors.HearthError | None:
    """The typed error a runner sent, or None if the status did not come from Hearth's runner code."""
    meta = {key: (value.decode() if isinstance(value, bytes) else value) for key, value in (trailers or ())}
    cls = _CLASSES.get(meta.get(CLASS_KEY, ""))
    if cls is None:
        return None
    return cls(details, code=meta.get(CODE_KEY), param=meta.get(PARAM_KEY))
