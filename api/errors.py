"""Error envelopes: every failure answers in the envelope of the door it came through.

OpenAI's doors (chat completions, responses, models) answer `{"error": {...}}`;
Anthropic's door (`/v1/messages...`) answers `{"type": "error", "error": {"type", "message"}}`.
`door_of(path)` picks the envelope, so handlers and middleware need no door knowledge.
"""

from __future__ import annotations

import logging
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from mlxd.server.errors import (
    ContextLengthExceeded,
    EngineError,
    EngineUnavailable,
    InternalError,
    ModelLoadFailed,
    ModelNotFound,
    ModelUnavailable,
    QueueFull,
    QueueTimeout,
)

log = logging.getLogger("mlxd.api")

_STATUS_BY_ERROR = {
    ModelNotFound: 404,
    QueueFull: 429,
    ModelLoadFailed: 500,
    ModelUnavailable: 503,
    InternalError: 500,
    ContextLengthExceeded: 400,
    EngineUnavailable: 503,
    QueueTimeout: 503,
}
_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


_ANTHROPIC_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    529: "overloaded_error",
}
ANTHROPIC_PATH_PREFIX = "/v1/messages"


def door_of(path: str) -> str:
    """Which envelope a path answers in: "anthropic" or "openai"."""
    return "anthropic" if path.startswith(ANTHROPIC_PATH_PREFIX) else "openai"


def error_body(
    message: str, status: int, *, param: Optional[str] = None, code: Optional[str] = None, door: str = "openai"
) -> dict:
    if door == "anthropic":
        return {"type": "error", "error": {"type": _ANTHROPIC_TYPE_BY_STATUS.get(status, "api_error"), "message": message}}
    return {
        "error": {
            "message": message,
            "type": _TYPE_BY_STATUS.get(status, "server_error"),
            "param": param,
            "code": code,
        }
    }


def error_response(message: str, status: int, *, param=None, code=None, headers=None, door: str = "openai") -> JSONResponse:
    body = error_body(message, status, param=param, code=code, door=door)
    return JSONResponse(body, status_code=status, headers=headers)


def engine_error_status(error: EngineError) -> int:
    return next((s for cls, s in _STATUS_BY_ERROR.items() if isinstance(error, cls)), 400)


def engine_error_response(error: EngineError, door: str = "openai") -> JSONResponse:
    retry_after = getattr(error, "retry_after", None)
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return error_response(str(error), engine_error_status(error), param=error.param, code=error.code,
                          headers=headers, door=door)


_UNION_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _field_path(loc) -> str:
    """('body', 'messages', 0, 'role') -> 'messages[0].role', without pydantic's union tags."""
    path = ""
    for part in loc:
        if part == "body" and not path:
            continue
        if isinstance(part, str) and (part in _UNION_TAGS or "[" in part or part[:1].isupper()):
            continue
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    # The deepest error is the most specific one (a union reports one per member).
    first = max(exc.errors(), key=lambda e: len(e.get("loc", ())), default={})
    door = door_of(request.url.path)
    if first.get("type") == "json_invalid":
        message = f"We could not parse the JSON body of your request: {first.get('msg')}"
        return error_response(message, 400, code="invalid_json", door=door)
    param = _field_path(first.get("loc", ()))
    message = f"Invalid value for '{param}': {first.get('msg', 'invalid')}" if param else first.get("msg", "invalid request")
    return error_response(message, 400, param=param or None, code="invalid_value", door=door)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    return error_response(detail, exc.status_code, headers=getattr(exc, "headers", None), door=door_of(request.url.path))


async def _engine_error(request: Request, exc: EngineError) -> JSONResponse:
    return engine_error_response(exc, door_of(request.url.path))


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error serving %s", request.url.path)
    return error_response(f"internal server error: {exc}", 500, code="internal_error", door=door_of(request.url.path))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(EngineError, _engine_error)
    app.add_exception_handler(Exception, _unexpected_error)


class BodySizeLimit:
    """ASGI middleware: answer 413 when a request body is larger than `max_bytes`."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._reject(scope, receive, send)
        # No trustworthy length: read the body up to the limit, then replay it.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._reject(scope, receive, send)
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, scope, receive, send):
        response = error_response(
            f"Request body too large: the limit is {self.max_bytes} bytes.", 413, code="request_too_large",
            door=door_of(scope.get("path", "")),
        )
        await response(scope, receive, send)
