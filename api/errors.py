"""OpenAI's error envelope for every failure, so clients always get {"error": {...}}."""

from __future__ import annotations

import logging
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from server.errors import ContextLengthExceeded, EngineError, InternalError, ModelLoadFailed, ModelNotFound, ModelUnavailable, QueueFull

log = logging.getLogger("mlxd.api")

_STATUS_BY_ERROR = {
    ModelNotFound: 404,
    QueueFull: 429,
    ModelLoadFailed: 500,
    ModelUnavailable: 503,
    InternalError: 500,
    ContextLengthExceeded: 400,
}
_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


def error_body(message: str, status: int, *, param: Optional[str] = None, code: Optional[str] = None) -> dict:
    return {
        "error": {
            "message": message,
            "type": _TYPE_BY_STATUS.get(status, "server_error"),
            "param": param,
            "code": code,
        }
    }


def error_response(message: str, status: int, *, param=None, code=None, headers=None) -> JSONResponse:
    return JSONResponse(error_body(message, status, param=param, code=code), status_code=status, headers=headers)


def engine_error_response(error: EngineError) -> JSONResponse:
    status = next((s for cls, s in _STATUS_BY_ERROR.items() if isinstance(error, cls)), 400)
    headers = {"Retry-After": str(error.retry_after)} if isinstance(error, QueueFull) else None
    return error_response(str(error), status, param=error.param, code=error.code, headers=headers)


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
    if first.get("type") == "json_invalid":
        return error_response(f"We could not parse the JSON body of your request: {first.get('msg')}", 400, code="invalid_json")
    param = _field_path(first.get("loc", ()))
    message = f"Invalid value for '{param}': {first.get('msg', 'invalid')}" if param else first.get("msg", "invalid request")
    return error_response(message, 400, param=param or None, code="invalid_value")


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    return error_response(detail, exc.status_code, headers=getattr(exc, "headers", None))


async def _engine_error(request: Request, exc: EngineError) -> JSONResponse:
    return engine_error_response(exc)


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error serving %s", request.url.path)
    return error_response(f"internal server error: {exc}", 500, code="internal_error")


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
            f"Request body too large: the limit is {self.max_bytes} bytes.", 413, code="request_too_large"
        )
        await response(scope, receive, send)
