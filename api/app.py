"""The FastAPI app: routers, error envelope, body limit, health."""

from __future__ import annotations

import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from mlxd.server.runtime import Runtime

from .engine_stream import RequestIds
from .errors import BodySizeLimit, install_error_handlers
from .openai import chat, models

DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024


def create_app(runtime: Runtime, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, version: str = ""):
    app = FastAPI(title="mlxd", version=version, docs_url=None, redoc_url=None)
    app.state.runtime = runtime
    app.state.started = int(time.time())
    install_error_handlers(app)
    app.include_router(chat.router)
    app.include_router(models.router)

    @app.get("/health")
    async def health(request: Request):
        reason = runtime.engine.degraded_reason
        if reason is not None:  # restarting after an engine error (or stopped): 503 until it serves again
            return JSONResponse({"status": "degraded", "reason": reason}, status_code=503)
        return {
            "status": "ok",
            "loaded": [m["name"] for m in runtime.engine.loaded_models()],
            "memory": runtime.engine.memory(),
        }

    return RequestIds(BodySizeLimit(app, max_body_bytes))
