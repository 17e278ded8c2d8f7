"""GET /v1/models and /v1/models/{id}: what this server can serve, in OpenAI's list shape."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from mlxd.server.errors import ModelNotFound
from mlxd.server.runtime import NOT_SERVED

router = APIRouter()


def _model_object(info: dict, created: int) -> dict:
    extra = {k: v for k, v in info.items() if k != "id" and v is not None}
    return {"id": info["id"], "object": "model", "created": created, "owned_by": "mlxd", **extra}


@router.get("/v1/models")
async def list_models(request: Request):
    infos = await asyncio.to_thread(request.app.state.runtime.list_models)
    created = request.app.state.started
    return {"object": "list", "data": [_model_object(i, created) for i in infos]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request):
    infos = await asyncio.to_thread(request.app.state.runtime.list_models)
    for info in infos:
        if info["id"] == model_id:
            return _model_object(info, request.app.state.started)
    raise ModelNotFound(NOT_SERVED)
