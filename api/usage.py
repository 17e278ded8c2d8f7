"""GET /v1/usage (the ledger summarized) and GET /v1/usage/requests (its last rows)."""

from __future__ import annotations

import asyncio
from typing import Optional

from fastapi import APIRouter, Query, Request

from mlxd.server import ledger

from .errors import error_response

router = APIRouter()


def _split(values: list[str]) -> list[str]:
    """`group_by=model,day` and `group_by=model&group_by=day` mean the same."""
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def _read(path, fn, **kwargs):
    conn = ledger.connect(path)
    try:
        return fn(conn, **kwargs)
    finally:
        conn.close()


@router.get("/v1/usage")
async def usage_summary(
    request: Request,
    since: Optional[str] = None,
    until: Optional[str] = None,
    group_by: list[str] = Query(default=[]),
    model: Optional[str] = None,
    client: Optional[str] = None,
):
    bounds = {}
    for name, text in (("since", since), ("until", until)):
        try:
            bounds[name] = ledger.parse_time(text, end=name == "until")
        except ValueError as e:
            return error_response(str(e), 400, param=name, code="invalid_value")
    keys = _split(group_by)
    bad = [k for k in keys if k not in ledger.GROUP_KEYS]
    if bad:
        message = f"group_by {bad[0]!r} is not one of {', '.join(ledger.GROUP_KEYS)}"
        return error_response(message, 400, param="group_by", code="invalid_value")
    path = request.app.state.ledger.path
    return await asyncio.to_thread(_read, path, ledger.summary, group_by=keys, model=model, client=client, **bounds)


@router.get("/v1/usage/requests")
async def usage_requests(request: Request, limit: int = Query(default=50, ge=1, le=1000)):
    rows = await asyncio.to_thread(_read, request.app.state.ledger.path, ledger.recent, limit=limit)
    return {"object": "list", "data": rows}
