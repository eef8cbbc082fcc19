"""The web viewer: a static page (no build step) that talks to the public API from the
browser. The page itself needs no key; every API call it makes is authorised as usual."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException, Request, status
from fastapi.responses import FileResponse, RedirectResponse

STATIC = Path(__file__).resolve().parent / "static" / "viewer"

# An allow-list, not a path join: nothing outside these files can be asked for.
ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "viewer.js": "text/javascript; charset=utf-8",
    "viewer.css": "text/css; charset=utf-8",
}

HEADERS = {
    # Revalidate each load so an upgraded gateway never runs with yesterday's script.
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    # blob: for images fetched with the key header; nothing from other origins.
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' blob: data:; script-src 'self'; "
        "style-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'self'; "
        "frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
}

router = APIRouter(include_in_schema=False)


def _redirect_to_viewer(request: Request) -> RedirectResponse:
    # Relative, so the page also works behind a proxy that adds a path prefix.
    query = request.url.query
    return RedirectResponse("viewer/" + (f"?{query}" if query else ""))


router.add_api_route("/", _redirect_to_viewer, methods=["GET"])
router.add_api_route("/viewer", _redirect_to_viewer, methods=["GET"])


@router.get("/viewer/")
def viewer_page() -> FileResponse:
    return viewer_asset("index.html")


@router.get("/viewer/{name}")
def viewer_asset(name: str) -> FileResponse:
    media_type = ASSETS.get(name)
    if media_type is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no viewer file {name!r}")
    return FileResponse(STATIC / name, media_type=media_type, headers=HEADERS)
