"""The FastAPI app: routers, error envelope, body limit, health."""

from __future__ import annotations

import time
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from mlxd.server.ledger import Ledger
from mlxd.server.runtime import Runtime

from . import dashboard, metrics, usage
from .anthropic import messages
from .engine_stream import RequestIds
from .errors import BodySizeLimit, install_error_handlers
from .openai import chat, models, responses
from .security import Policy, SecurityMiddleware

DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024


def create_app(runtime: Runtime, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, version: str = "",
               ledger: Optional[Ledger] = None, policy: Policy = Policy()):
    app = FastAPI(title="mlxd", version=version, docs_url=None, redoc_url=None)
    app.state.runtime = runtime
    app.state.started = int(time.time())
    install_error_handlers(app)
    app.include_router(chat.router)
    app.include_router(models.router)
    app.include_router(responses.router)
    app.include_router(messages.router)
    if ledger is not None:  # usage ledger: /v1/usage, /metrics, the dashboard at /
        app.state.ledger = ledger
        app.state.metrics = metrics.UsageMetrics(runtime.engine, ledger)
        app.include_router(usage.router)
        app.include_router(metrics.router)
        app.include_router(dashboard.router)

    @app.get("/health")
    async def health(request: Request):
        reason = runtime.engine.degraded_reason
        if reason is not None:  # restarting after an engine error (or stopped): 503 until it serves again
            return JSONResponse({"status": "degraded", "reason": reason}, status_code=503)
        loaded = runtime.engine.loaded_models()
        return {
            "status": "ok",
            "loaded": [m["name"] for m in loaded],
            "memory": runtime.engine.memory(),
            "models": loaded,
            "requests": {"active": runtime.engine.batch_size, "queued": runtime.engine.queue_depth},
        }

    # Outermost: every answer names its request; then Host, Origin and key checks run before a body is read.
    return RequestIds(SecurityMiddleware(BodySizeLimit(app, max_body_bytes), policy))
