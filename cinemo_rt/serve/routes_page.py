"""The page at / (plain HTML, CSS and JS from `page/`), its favicon and its static files."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

PAGE = Path(__file__).parent / "page"

router = APIRouter(include_in_schema=False)


@router.get("/")
def page():
    return FileResponse(PAGE / "index.html")


@router.get("/favicon.ico")
def favicon():  # browsers ask for it whatever the page says; a 404 there is a console error
    return FileResponse(PAGE / "favicon.svg", media_type="image/svg+xml")


def static_files() -> StaticFiles:
    """Mounted at /static by the app (a router carries routes, not mounts)."""
    return StaticFiles(directory=PAGE)
