"""The route class every Hearth router uses: JSON bodies must be text that can be encoded before they are validated.

JSON may spell a lone UTF-16 surrogate (`"\\ud800"`), which Python keeps in a str but no UTF-8 encoder (the runner's
gRPC messages, a tokenizer, a C library) can write: left alone, it fails deep inside a request as a 500. Here it is
a 400 naming the field, in the client's protocol (the error handlers shape it), before any model is involved.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

from hearth.errors import InvalidRequest

# A \uD800-\uDFFF escape, or a raw UTF-8-encoded surrogate (invalid UTF-8 that json.loads would reject anyway).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _unencodable(value: Any, path: tuple[Any, ...] = ()) -> tuple[Any, ...] | None:
    """The path of the first string (key or value) in a JSON value that UTF-8 cannot encode, if there is one."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if _unencodable(key) is not None:
                return (*path, key)
            found = _unencodable(item, (*path, key))
            if found is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = _unencodable(item, (*path, index))
            if found is not None:
                return found
    return None


def _param(path: tuple[Any, ...]) -> str:
    text = ""
    for part in path:
        if isinstance(part, str):  # a key may be the bad text itself: spelled with escapes
            part = part.encode("utf-8", "backslashreplace").decode("utf-8")
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


class HearthRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def checked(request: Request) -> Response:
            if "json" in request.headers.get("content-type", "json"):
                body = await request.body()  # (kept by the request: the handler reads the same bytes)
                if _SURROGATE_ESCAPE.search(body):  # only then can a string hold a lone surrogate
                    try:
                        value = json.loads(body)
                    except ValueError:
                        value = None  # not JSON: the handler's parsing says so
                    path = _unencodable(value)
                    if path is not None:
                        raise InvalidRequest(
                            f"'{_param(path) or 'body'}' holds a lone UTF-16 surrogate (such as \\ud800), which is not "
                            "valid Unicode; send surrogates only in pairs", param=_param(path) or None)
            return await handler(request)

        return checked
