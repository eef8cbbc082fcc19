"""``HepatoClient``: the synchronous client, ``AsyncHepatoClient`` run on an anyio
blocking portal (an event loop in a thread of its own).

One implementation: retries, reconnecting event streams, pagination and polling are loops
with sleeps around streamed bodies; a sans-IO core would still need a sync and an async
driver for each of those loops, which are the near-copies this avoids. The price is one
thread per sync client, and that the sync client's callbacks run on that thread."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path
from typing import Any, TypeVar

from anyio.from_thread import BlockingPortal, start_blocking_portal

from hepato.client.async_client import AsyncHepatoClient
from hepato.client.types import BatchRef, Event, Formats, OnEvent, OnSlideProgress, SlideFormats
from hepato.client.uploads import OnUploaded
from hepato.common.constants import Priority
from hepato.common.schemas import BatchOut, JobOut, ModelOut
from hepato.common.slide_schemas import SlideAccepted, SlideOut

T = TypeVar("T")


class HepatoClient:
    """The synchronous client: ``AsyncHepatoClient`` run on a portal (see the module's
    docstring). Use it as a context manager, or call ``close``."""

    def __init__(self, url: str | None = None, api_key: str | None = None, **options: Any):
        self._portal_cm: AbstractContextManager[BlockingPortal] = start_blocking_portal()
        self._portal = self._portal_cm.__enter__()
        try:
            self._async = AsyncHepatoClient(url, api_key, **options)
        except BaseException:
            self._portal_cm.__exit__(None, None, None)
            raise
        self.url = self._async.url

    def __enter__(self) -> HepatoClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with ExitStack() as stack:
            stack.push(self._portal_cm)  # stops the loop even if closing the client fails
            self._portal.call(self._async.aclose)

    def _iterate(self, agen: AsyncIterator[T]) -> Iterator[T]:
        async def step() -> T:
            return await agen.__anext__()

        try:
            while True:
                try:
                    yield self._portal.call(step)
                except StopAsyncIteration:
                    return
        finally:
            aclose = getattr(agen, "aclose", None)
            if aclose is not None:
                self._portal.call(aclose)

    def submit(
        self,
        paths_or_dir: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
        model: str | None = None,
        priority: Priority | str = Priority.routine,
        question: str | None = None,
        batch_size: int = 500,
        **options: Any,
    ) -> list[BatchRef]:
        """See ``AsyncHepatoClient.submit``; callbacks run on the portal's thread."""

        async def call() -> list[BatchRef]:
            return await self._async.submit(
                paths_or_dir, model, priority, question, batch_size, **options
            )

        return self._portal.call(call)

    def models(self) -> list[ModelOut]:
        return self._portal.call(self._async.models)

    def batch(
        self, batch_id: uuid.UUID | str, page: int = 1, page_size: int | None = None
    ) -> BatchOut:
        return self._portal.call(self._async.batch, batch_id, page, page_size)

    def job(self, job_id: uuid.UUID | str) -> JobOut:
        return self._portal.call(self._async.job, job_id)

    def results(self, batch_id: uuid.UUID | str, page_size: int = 500) -> Iterator[JobOut]:
        return self._iterate(self._async.results(batch_id, page_size))

    def export(
        self, batch_id: uuid.UUID | str, format: Formats, out_path: str | os.PathLike[str]
    ) -> Path:
        return self._portal.call(self._async.export, batch_id, format, out_path)

    def events(self, batch_id: uuid.UUID | str) -> Iterator[Event]:
        return self._iterate(self._async.events(batch_id))

    def job_events(self, job_id: uuid.UUID | str) -> Iterator[Event]:
        return self._iterate(self._async.job_events(job_id))

    def wait(
        self,
        batch_id: uuid.UUID | str,
        on_event: OnEvent | None = None,
        *,
        timeout: float | None = None,
        poll_max_s: float = 5.0,
    ) -> BatchOut:
        async def call() -> BatchOut:
            return await self._async.wait(
                batch_id, on_event, timeout=timeout, poll_max_s=poll_max_s
            )

        return self._portal.call(call)

    # --- whole slides (see hepato.client.slides) -------------------------------------------
    def submit_slide(
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
        """See ``AsyncHepatoClient.submit_slide``: the file is streamed from disk."""

        async def call() -> SlideAccepted:
            return await self._async.submit_slide(
                path,
                model=model,
                priority=priority,
                deadline_s=deadline_s,
                callback_url=callback_url,
                deidentify=deidentify,
                mpp=mpp,
                on_uploaded=on_uploaded,
            )

        return self._portal.call(call)

    def slide(self, slide_id: uuid.UUID | str) -> SlideOut:
        return self._portal.call(self._async.slide, slide_id)

    def slides(self) -> list[SlideOut]:
        return self._portal.call(self._async.slides)

    def cancel_slide(self, slide_id: uuid.UUID | str) -> int:
        return self._portal.call(self._async.cancel_slide, slide_id)

    def slide_thumbnail(self, slide_id: uuid.UUID | str) -> bytes:
        return self._portal.call(self._async.slide_thumbnail, slide_id)

    def slide_tissue_mask(self, slide_id: uuid.UUID | str) -> bytes:
        return self._portal.call(self._async.slide_tissue_mask, slide_id)

    def download_slide_export(
        self,
        slide_id: uuid.UUID | str,
        path: str | os.PathLike[str],
        format: SlideFormats = "geojson",
    ) -> Path:
        return self._portal.call(self._async.download_slide_export, slide_id, path, format)

    def slide_events(self, slide_id: uuid.UUID | str) -> Iterator[SlideOut]:
        return self._iterate(self._async.slide_events(slide_id))

    def wait_slide(
        self,
        slide_id: uuid.UUID | str,
        *,
        timeout: float | None = None,
        on_progress: OnSlideProgress | None = None,
        poll_max_s: float = 5.0,
    ) -> SlideOut:
        """See ``AsyncHepatoClient.wait_slide``; ``on_progress`` runs on the portal's
        thread."""

        async def call() -> SlideOut:
            return await self._async.wait_slide(
                slide_id, timeout=timeout, on_progress=on_progress, poll_max_s=poll_max_s
            )

        return self._portal.call(call)
