"""Request size limits, enforced before a body is buffered.

The multipart parser spools every file to disk and the upload routes then read them, so
a body past ``max_request_bytes`` must be refused before it is read: by its declared
Content-Length, or, for a chunked body without one, as soon as the bytes received pass
the limit. Starlette's form limits (files, fields per request) answer 400; too many
files or fields is a request too large, so they answer 413 here with the limit named.
(FastAPI's own max_body_size answers in plain text, without naming the setting, and
leaves the connection open.)"""

from __future__ import annotations

from fastapi import FastAPI, Request, status
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hepato.common.settings import Settings

# Starlette's MultiPartException messages (re-raised by Request.form() as a 400), and
# what to add to them.
_FORM_LIMIT_HINTS = {
    "Too many files.": " Send the rest in another request (HEPATO_MAX_FILES_PER_REQUEST).",
    "Too many fields.": "",
}


# Routes with a body limit of their own (a whole slide is one file of several GB).
SLIDE_UPLOAD_PATH = "/v1/slides"


class BodyTooLarge(HTTPException):
    """An HTTPException, so that FastAPI passes it through its body parsing untouched
    (any other error there becomes a generic 400)."""

    def __init__(self, limit: int, setting: str = "HEPATO_MAX_REQUEST_BYTES") -> None:
        hint = (
            "send fewer files per request"
            if setting == "HEPATO_MAX_REQUEST_BYTES"
            else "the slide is larger than this service accepts"
        )
        super().__init__(
            status.HTTP_413_CONTENT_TOO_LARGE,
            f"request body is larger than {limit} bytes ({setting}); {hint}",
        )


def _too_large(exc: BodyTooLarge) -> JSONResponse:
    # Closing the connection stops the client from sending the rest of a body no one reads.
    return JSONResponse(
        status_code=exc.status_code, content={"detail": exc.detail}, headers={"Connection": "close"}
    )


def _content_length(scope: Scope) -> int | None:
    raw = Headers(scope=scope).get("content-length")
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None


class RequestSizeLimit:
    """Pure ASGI middleware (no body buffering, unlike BaseHTTPMiddleware)."""

    def __init__(self, app: ASGIApp, max_bytes: int, max_slide_bytes: int | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_slide_bytes = max_slide_bytes or max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # A slide upload (POST /v1/slides; its file field adds a few hundred bytes of
        # multipart framing) has its own limit; every other body the request limit.
        if scope.get("path", "").rstrip("/") == SLIDE_UPLOAD_PATH:
            limit = self.max_slide_bytes + 64 * 1024
            too_large = BodyTooLarge(self.max_slide_bytes, "HEPATO_MAX_SLIDE_BYTES")
        else:
            limit, too_large = self.max_bytes, BodyTooLarge(self.max_bytes)
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _too_large(too_large)(scope, receive, send)
            return

        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise too_large
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge as exc:
            # Raised outside a route (where the exception handlers would have answered).
            if started:
                raise
            await _too_large(exc)(scope, receive, send)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if isinstance(exc, BodyTooLarge):
        return _too_large(exc)
    if exc.status_code == status.HTTP_400_BAD_REQUEST:
        for prefix, hint in _FORM_LIMIT_HINTS.items():
            if str(exc.detail).startswith(prefix):
                return JSONResponse(
                    status_code=status.HTTP_413_CONTENT_TOO_LARGE,
                    content={"detail": f"{exc.detail}{hint}"},
                )
    return await http_exception_handler(request, exc)


def install_limits(app: FastAPI, settings: Settings) -> None:
    app.add_middleware(
        RequestSizeLimit,
        max_bytes=settings.max_request_bytes,
        max_slide_bytes=settings.max_slide_bytes,
    )
    app.add_exception_handler(HTTPException, _http_error)
