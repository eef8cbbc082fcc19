"""``AsyncHepatoClient``: submission, reads, exports and live status over ``Transport``
(images and batches here; whole slides in ``hepato.client.slides``).

Each submit request carries an ``Idempotency-Key`` that its retries reuse, so a retried
request never submits twice. Event streams resume a dropped connection with
``Last-Event-ID``; ``wait`` polls where a gateway has no events endpoint."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import aclosing
from pathlib import Path

import anyio
from pydantic import TypeAdapter

from hepato.client.direct import submit_direct
from hepato.client.slides import SlideMethods
from hepato.client.types import (
    BatchEvent,
    BatchRef,
    Event,
    Formats,
    HepatoAPIError,
    HepatoClientError,
    JobEvent,
    OnEvent,
)
from hepato.client.uploads import OnUploaded, chunked, find_images
from hepato.common.constants import TERMINAL_STATES, JobState, Priority
from hepato.common.schemas import BatchOut, JobOut, ModelOut

_MODELS = TypeAdapter(list[ModelOut])


def _direct_fields(form: dict[str, str]) -> dict[str, object]:
    """The multipart form's fields as a commit's JSON (deadline_s a number)."""
    return {k: float(v) if k == "deadline_s" else v for k, v in form.items()}


def _batch_finished(counts: dict[str, int]) -> bool:
    return not counts.get(JobState.pending, 0) and not counts.get(JobState.processing, 0)


class AsyncHepatoClient(SlideMethods):
    """The API over httpx.AsyncClient, with bounded retries on 429, 503 and connection
    errors (honouring Retry-After, up to ``max_retry_after_s``). The whole-slide methods
    (``submit_slide``, ``wait_slide``, ...) come from ``SlideMethods``."""

    async def __aenter__(self) -> AsyncHepatoClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # --- submission ---------------------------------------------------------------
    async def submit(
        self,
        paths_or_dir: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
        model: str | None = None,
        priority: Priority | str = Priority.routine,
        question: str | None = None,
        batch_size: int = 500,
        *,
        deadline_s: float | None = None,
        on_uploaded: OnUploaded | None = None,
        on_batch: Callable[[BatchRef], object] | None = None,
        direct: bool = False,
    ) -> list[BatchRef]:
        """Submit image files, ``batch_size`` per request (one batch each). A request
        whose every file is refused raises HepatoAPIError (422, ``detail`` names them);
        ``.submitted`` holds the batches created before it. ``direct``: each file is put
        on the object store itself and the batch committed (hepato.client.direct), not
        sent through the gateway."""
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        files = find_images(paths_or_dir)
        if not files:
            raise HepatoClientError(f"no image files in {paths_or_dir}")
        form = {"priority": Priority(priority).value}
        if model:
            form["model"] = model
        if question is not None:
            form["question"] = question
        if deadline_s is not None:
            form["deadline_s"] = str(deadline_s)
        refs: list[BatchRef] = []
        for chunk in chunked(files, batch_size):
            try:
                if direct:
                    response = await submit_direct(
                        self, chunk, _direct_fields(form), str(uuid.uuid4()), on_uploaded
                    )
                else:
                    response = await self._send(
                        "POST",
                        "/v1/batches",
                        files=chunk,
                        on_uploaded=on_uploaded,
                        data=form,
                        # Generated once per request, before its retries.
                        headers={"Idempotency-Key": str(uuid.uuid4())},
                        retry_conflict=True,  # 409: the first try is still running
                    )
            except HepatoAPIError as exc:
                exc.submitted = refs
                raise
            refs.append(BatchRef.model_validate_json(response.content))
            if on_batch is not None:
                on_batch(refs[-1])
        return refs

    # --- reads ----------------------------------------------------------------------
    async def models(self) -> list[ModelOut]:
        response = await self._send("GET", "/v1/models")
        return _MODELS.validate_json(response.content)

    async def batch(
        self, batch_id: uuid.UUID | str, page: int = 1, page_size: int | None = None
    ) -> BatchOut:
        params = {"page": page, **({"page_size": page_size} if page_size else {})}
        return await self._get(BatchOut, f"/v1/batches/{batch_id}", **params)

    async def job(self, job_id: uuid.UUID | str) -> JobOut:
        return await self._get(JobOut, f"/v1/jobs/{job_id}")

    async def results(
        self, batch_id: uuid.UUID | str, page_size: int = 500
    ) -> AsyncIterator[JobOut]:
        """Every job of a batch, page after page."""
        page = 1
        while True:
            out = await self.batch(batch_id, page=page, page_size=page_size)
            for job in out.jobs:
                yield job
            if out.next_page_url is None or not out.jobs:
                return
            page += 1

    async def export(
        self, batch_id: uuid.UUID | str, format: Formats, out_path: str | os.PathLike[str]
    ) -> Path:
        """GET /v1/batches/{id}/export, streamed to ``out_path`` (written whole or not at
        all: a part file is renamed at the end)."""
        return await self._download(f"/v1/batches/{batch_id}/export", out_path, {"format": format})

    # --- live status ------------------------------------------------------------------
    def events(self, batch_id: uuid.UUID | str) -> AsyncIterator[Event]:
        """The batch's job events until every job is finished, then its ``BatchEvent``.
        A dropped connection is resumed with ``Last-Event-ID`` (bounded by ``retries``
        reconnects in a row that bring nothing)."""
        return self._events(f"/v1/batches/{batch_id}/events", batch=True)

    def job_events(self, job_id: uuid.UUID | str) -> AsyncIterator[Event]:
        return self._events(f"/v1/jobs/{job_id}/events", batch=False)

    async def _events(self, path: str, *, batch: bool) -> AsyncIterator[Event]:
        async with aclosing(self._sse(path, ("job", "batch"))) as stream:
            async for sse in stream:
                # Opaque: only ever sent back as Last-Event-ID.
                event_id = sse.id or None
                data = {**json.loads(sse.data), "event_id": event_id}
                if sse.event == "batch":
                    yield BatchEvent.model_validate(data)
                    return
                job = JobEvent.model_validate(data)
                yield job
                if not batch and job.state in TERMINAL_STATES:
                    return

    async def wait(
        self,
        batch_id: uuid.UUID | str,
        on_event: OnEvent | None = None,
        *,
        timeout: float | None = None,
        poll_max_s: float = 5.0,
    ) -> BatchOut:
        """Until every job of the batch is finished; then the batch (its first page).
        Follows the events stream; where the gateway has none (404/405) it polls the
        batch with a growing interval and reports each change of counts as a
        ``BatchEvent``."""
        with anyio.fail_after(timeout):
            try:
                async for event in self.events(batch_id):
                    if on_event is not None:
                        on_event(event)
            except HepatoAPIError as exc:
                if exc.status_code not in (404, 405):
                    raise
                await self._poll(batch_id, on_event, poll_max_s)
        return await self.batch(batch_id)

    async def _poll(self, batch_id: uuid.UUID | str, on_event: OnEvent | None, cap: float) -> None:
        interval, seen = 0.1, None
        while True:
            out = await self.batch(batch_id, page_size=1)
            if out.counts != seen:
                seen = out.counts
                interval = 0.1
                if on_event is not None:
                    on_event(BatchEvent(batch_id=out.id, state=out.state, counts=out.counts))
            if _batch_finished(out.counts):
                return
            await anyio.sleep(interval)
            interval = min(cap, interval * 1.5)
