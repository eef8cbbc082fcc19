"""The web viewer: static pages (no build step) that talk to the public API from the
browser. The pages themselves need no key; every API call they make is authorised as usual.

``/viewer/`` shows batches of images; ``/viewer/slide.html`` shows whole slides with
OpenSeadragon, vendored under ``static/viewer/vendor/openseadragon`` (see its README)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException, Request, status
from fastapi.responses import FileResponse, RedirectResponse

STATIC = Path(__file__).resolve().parent / "static" / "viewer"

_JS = "text/javascript; charset=utf-8"
_CSS = "text/css; charset=utf-8"
_HTML = "text/html; charset=utf-8"

# An allow-list, not a path join: nothing outside these files can be asked for.
ASSETS = {
    "index.html": _HTML,
    "viewer.js": _JS,
    "viewer.css": _CSS,
    "common.js": _JS,
    "slide.html": _HTML,
    "slide.js": _JS,
    "slide_overlay.js": _JS,
    "slide.css": _CSS,
    "vendor/openseadragon/openseadragon.min.js": _JS,
    "vendor/openseadragon/LICENSE.txt": "text/plain; charset=utf-8",
}

# OpenSeadragon 6 injects this one <style> (a touch-screen focus rule) when a viewer is
# made: allowed by its hash, so no other inline style is.
_OSD_STYLE = "'sha256-9xTiqzfwFaL2SGb1rmr8gysEwVVjIvqWAgmZgqFqpEE='"

HEADERS = {
    # Revalidate each load so an upgraded gateway never runs with yesterday's script.
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    # blob: for images fetched with the key header; nothing from other origins.
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' blob: data:; script-src 'self'; "
        f"style-src 'self' {_OSD_STYLE}; connect-src 'self'; object-src 'none'; "
        "base-uri 'self'; frame-ancestors 'none'"
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


@router.get("/viewer/{name:path}")
def viewer_asset(name: str) -> FileResponse:
    media_type = ASSETS.get(name)
    if media_type is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no viewer file {name!r}")
    return FileResponse(STATIC / name, media_type=media_type, headers=HEADERS)
