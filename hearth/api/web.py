"""The web page: static files from hearth/web, served at / and /web/ (no build step, nothing fetched from a CDN).

The page holds no data of its own: it calls the API like any client, with the API key the user gives it, so these
files are served without a key (like /healthz) while every API route behind them still needs one.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse
from starlette.staticfiles import StaticFiles

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
# Served as they are: HTML must not be cached across upgrades, and the page may only talk to its own origin.
HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; media-src 'self' blob: data:; "
                               "style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

router = APIRouter(include_in_schema=False)


@router.get("/")
async def index() -> FileResponse:
    return FileResponse(WEB_DIR / "index.html", headers=HEADERS)


@router.get("/ui")
async def ui() -> RedirectResponse:
    return RedirectResponse("/")


class WebFiles(StaticFiles):
    """hearth/web's files, with the page's security headers; never a directory listing or a path outside it."""

    async def get_response(self, path: str, scope):  # type: ignore[no-untyped-def]
        response = await super().get_response(path, scope)
        response.headers.update(HEADERS)
        return response


def mount(app) -> None:  # type: ignore[no-untyped-def]
    app.include_router(router)
    app.mount("/web", WebFiles(directory=WEB_DIR), name="web")
