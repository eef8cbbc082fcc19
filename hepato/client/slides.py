"""The whole-slide half of the client (``/v1/slides``): ``SlideMethods``, a base of
``AsyncHepatoClient``.

A slide is one file of up to gigabytes: it is streamed from disk in 64 KiB chunks (the
``LazyFile`` the image uploads use), and its POST is retried like an image submission,
under one ``Idempotency-Key`` so that a retry never makes a second slide. ``wait_slide``
follows the slide's event stream, resumed with ``Last-Event-ID`` when it drops, and polls
where a gateway has no events endpoint."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path
from typing import get_args

import anyio
import httpx
from pydantic import BaseModel

from hepato.client.transport import Transport
from hepato.client.types import HepatoAPIError, OnSlideProgress, SlideFormats
from hepato.client.uploads import OnUploaded
from hepato.common.constants import Priority
from hepato.common.slide_schemas import SLIDE_TERMINAL_STATES, SlideAccepted, SlideOut

# The gateway answers a slide's POST once the file is stored and sniffed: for gigabytes
# that can take longer than the client's usual read timeout.
SLIDE_ANSWER_TIMEOUT_S = 600.0


class _SlideList(BaseModel):
    slides: list[SlideOut]


class _SlideCanceled(BaseModel):
    slide_id: uuid.UUID
    canceled: int


def _progress_key(out: SlideOut) -> tuple[object, ...]:
    """What ``wait_slide`` reports a change of when it polls."""
    return (out.state, out.tiles, out.summary is not None, out.error)


class SlideMethods(Transport):
    """Submit, read, follow, cancel and export whole slides."""

    async def submit_slide(
        self,
        path: str | os.PathLike[str],
        *,
        model: str | None = None,
        priority: Priority | str = Priority.routine,
        deadline_s: float | None = None,
        callback_url: str | None = None,
        deidentify: bool = False,
        mpp: float | None = None,
        on_uploaded: OnUploaded | None = None,
    ) -> SlideAccepted:
        """POST /v1/slides: one slide file, streamed from disk (never read whole). ``mpp``
        (µm per pixel) is used where the slide names none; ``deidentify`` asks the gateway
        to keep no label, macro or scanner metadata. ``on_uploaded(path)`` is called each
        time the file has been sent whole (again for a retry). A file the gateway refuses
        (413 too large, 415/422 not a slide or truncated) raises HepatoAPIError, its
        ``detail`` naming why."""
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no such file")
        if mpp is not None and not 0 < mpp < float("inf"):
            raise ValueError(f"mpp must be a positive number of µm per pixel, not {mpp}")
        form = {
            "priority": Priority(priority).value,
            "deidentify": "true" if deidentify else "false",
        }
        if model:
            form["model"] = model
        if deadline_s is not None:
            form["deadline_s"] = str(deadline_s)
        if callback_url is not None:
            form["callback_url"] = callback_url
        if mpp is not None:
            form["mpp"] = repr(float(mpp))
        usual = self._http.timeout
        timeout = httpx.Timeout(
            connect=usual.connect,
            read=None if usual.read is None else max(usual.read, SLIDE_ANSWER_TIMEOUT_S),
            write=usual.write,
            pool=usual.pool,
        )
        response = await self._send(
            "POST",
            "/v1/slides",
            files=[file],
            file_field="file",
            on_uploaded=on_uploaded,
            data=form,
            # Generated once, before the retries: the gateway keeps one slide per key.
            headers={"Idempotency-Key": str(uuid.uuid4())},
            retry_conflict=True,  # 409: the first try is still running; its answer comes
            timeout=timeout,
        )
        return SlideAccepted.model_validate_json(response.content)

    # --- reads ------------------------------------------------------------------------
    async def slide(self, slide_id: uuid.UUID | str) -> SlideOut:
        return await self._get(SlideOut, f"/v1/slides/{slide_id}")

    async def slides(self) -> list[SlideOut]:
        """The tenant's slides, newest first."""
        return (await self._get(_SlideList, "/v1/slides")).slides

    async def cancel_slide(self, slide_id: uuid.UUID | str) -> int:
        """DELETE /v1/slides/{id}: the number of its tile jobs that were canceled."""
        response = await self._send("DELETE", f"/v1/slides/{slide_id}")
        return _SlideCanceled.model_validate_json(response.content).canceled

    async def slide_thumbnail(self, slide_id: uuid.UUID | str) -> bytes:
        """The slide's thumbnail, PNG bytes."""
        return (await self._send("GET", f"/v1/slides/{slide_id}/thumbnail")).content

    async def slide_tissue_mask(self, slide_id: uuid.UUID | str) -> bytes:
        """The tissue mask the slide's tiles were planned on, PNG bytes."""
        return (await self._send("GET", f"/v1/slides/{slide_id}/tissue_mask")).content

    async def download_slide_export(
        self,
        slide_id: uuid.UUID | str,
        path: str | os.PathLike[str],
        format: SlideFormats = "geojson",
    ) -> Path:
        """GET /v1/slides/{id}/export streamed to ``path`` (written whole or not at all;
        a gzip-encoded answer is written decoded)."""
        if format not in get_args(SlideFormats):
            raise ValueError(f"a slide exports as {' or '.join(get_args(SlideFormats))}")
        return await self._download(f"/v1/slides/{slide_id}/export", path, {"format": format})

    # --- live status --------------------------------------------------------------------
    async def slide_events(self, slide_id: uuid.UUID | str) -> AsyncIterator[SlideOut]:
        """The slide each time it changes, until it is finished (done, done with failures,
        failed or canceled). A dropped connection is resumed with ``Last-Event-ID``."""
        async with aclosing(self._sse(f"/v1/slides/{slide_id}/events", ("slide",))) as stream:
            async for sse in stream:
                out = SlideOut.model_validate_json(sse.data)
                yield out
                if out.state in SLIDE_TERMINAL_STATES:
                    return

    async def wait_slide(
        self,
        slide_id: uuid.UUID | str,
        *,
        timeout: float | None = None,
        on_progress: OnSlideProgress | None = None,
        poll_max_s: float = 5.0,
    ) -> SlideOut:
        """Until the slide is finished; then the slide. ``on_progress(slide)`` is called
        with every change (its tile counts, its state). Follows the events stream; where
        the gateway has none (404/405) it polls with a growing interval. ``timeout``:
        seconds, then TimeoutError."""
        with anyio.fail_after(timeout):
            last: SlideOut | None = None
            try:
                async for out in self.slide_events(slide_id):
                    if on_progress is not None:
                        on_progress(out)
                    last = out
            except HepatoAPIError as exc:
                if exc.status_code not in (404, 405):
                    raise
                return await self._poll_slide(slide_id, on_progress, poll_max_s)
        return last if last is not None else await self.slide(slide_id)

    async def _poll_slide(
        self, slide_id: uuid.UUID | str, on_progress: OnSlideProgress | None, cap: float
    ) -> SlideOut:
        interval, seen = 0.1, None
        while True:
            out = await self.slide(slide_id)
            if _progress_key(out) != seen:
                seen = _progress_key(out)
                interval = 0.1
                if on_progress is not None:
                    on_progress(out)
            if out.state in SLIDE_TERMINAL_STATES:
                return out
            await anyio.sleep(interval)
            interval = min(cap, interval * 1.5)
