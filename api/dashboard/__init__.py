"""The dashboard at GET /: static HTML, CSS and JS shipped in the package, nothing fetched
from elsewhere. The page reads /health and /v1/usage and redraws itself every few seconds.

The page and its files hold no data, so they load without an API key (STATIC_PATHS,
which api/security.py exempts); when the server wants a key the page asks for one and
sends it with its own requests."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from ..errors import error_response

router = APIRouter()
HERE = Path(__file__).parent
_FILES = {"dashboard.css": "text/css", "dashboard.js": "text/javascript"}
STATIC_PATHS = ("/", *(f"/dashboard/{name}" for name in _FILES))


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(HERE / "index.html", media_type="text/html")


@router.get("/dashboard/{name}", include_in_schema=False)
async def asset(name: str):
    if name not in _FILES:
        return error_response(f"no dashboard file {name!r}", 404, code="not_found")
    return FileResponse(HERE / name, media_type=_FILES[name])
