"""The FastAPI app: routers, error envelope, body limit, health."""

from __future__ import annotations

import time

from fastapi import FastAPI, Request

from mlxd.server.runtime import Runtime

from .errors import BodySizeLimit, error_response, install_error_handlers
from .openai import chat, models
from .security import Policy, SecurityMiddleware

DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024


def create_app(runtime: Runtime, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, version: str = "",
               policy: Policy = Policy()):
    app = FastAPI(title="mlxd", version=version, docs_url=None, redoc_url=None)
    app.state.runtime = runtime
    app.state.started = int(time.time())
    install_error_handlers(app)
    app.include_router(chat.router)
    app.include_router(models.router)

    @app.get("/health")
    async def health(request: Request):
        if not runtime.engine.healthy:
            return error_response("the generation thread has stopped", 503, code="engine_down")
        return {
            "status": "ok",
            "loaded": [m["name"] for m in runtime.engine.loaded_models()],
            "memory": runtime.engine.memory(),
        }

    # Outermost: Host, Origin and key checks run before a body is read.
    return SecurityMiddleware(BodySizeLimit(app, max_body_bytes), policy)
