"""``GET /ui``: the web page (plain HTML, CSS and JavaScript), and its static files."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from ...ui import STATIC

router = APIRouter()


@router.get("/ui", include_in_schema=False)
async def web_page():
    return FileResponse(STATIC / "index.html", media_type="text/html")


def mount_static(app: FastAPI) -> None:
    """The page's static files (a mount: an APIRouter cannot carry one)."""
    app.mount("/ui/static", StaticFiles(directory=STATIC), name="ui-static")
