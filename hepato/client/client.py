"""Python client of the HepatoAI API: ``AsyncHepatoClient`` and ``HepatoClient``.

One implementation: ``AsyncHepatoClient`` does all the work and ``HepatoClient`` runs it
on an anyio blocking portal (an event loop in a thread of its own). Retries, reconnecting
event streams, pagination and polling are loops with sleeps around streamed bodies; a
sans-IO core would still need a sync and an async driver for each of those loops, which
are the near-copies this avoids. The price is one thread per sync client, and that the
sync client's callbacks run on that thread.

Uploads are streamed from disk: every file is a ``LazyFile`` that opens on its first read
and closes at its end, so a request of thousands of files holds one descriptor and one
64 KiB chunk at a time. Each request carries an ``Idempotency-Key`` that its retries
reuse, so a retried request never submits twice."""

from __future__ import annotations

import json
import mimetypes
import os
import random
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path
from typing import IO, Any, Literal, TypeVar, cast

import anyio
import httpx
from anyio.from_thread import BlockingPortal, start_blocking_portal
from httpx_sse import EventSource, SSEError
from pydantic import BaseModel, TypeAdapter
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from hepato.client.types import (
    BatchEvent,
    Event,
    HepatoAPIError,
    HepatoClientError,
    HepatoConnectionError,
    JobEvent,
    OnEvent,
    retry_after_seconds,
)
from hepato.client.uploads import IMAGE_SUFFIXES, LazyFile, OnUploaded, chunked, find_images
from hepato.common.constants import TERMINAL_STATES, JobState, Priority
from hepato.common.schemas import BatchAccepted, BatchOut, JobOut, ModelOut

__all__ = [
    "IMAGE_SUFFIXES",
    "AsyncHepatoClient",
    "BatchEvent",
    "BatchOut",
    "BatchRef",
    "Event",
    "HepatoAPIError",
    "HepatoClient",
    "HepatoClientError",
    "HepatoConnectionError",
    "JobEvent",
    "JobOut",
    "ModelOut",
    "find_images",
]

DEFAULT_URL = "http://127.0.0.1:8000"
# Statuses that mean "nothing was kept, try again later" (README: How a job is never lost).
RETRY_STATUSES = frozenset({429, 503})
# sse-starlette pings an idle stream every 15 s: a minute of silence is a dead connection.
EVENTS_READ_TIMEOUT_S = 60.0
EXPORT_CHUNK_BYTES = 1 << 16

# What POST /v1/batches answers: the batch, its jobs and the files it refused by name.
BatchRef = BatchAccepted

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)
_OCTETS = "application/octet-stream"
Formats = Literal["geojson", "coco", "csv"]


_JOBS = TypeAdapter(list[JobOut])
_MODELS = TypeAdapter(list[ModelOut])


class _RetryableStatus(Exception):
    def __init__(self, response: httpx.Response) -> None:
        super().__init__(f"HTTP {response.status_code}")
        self.response = response
        self.retry_after = retry_after_seconds(response.headers.get("retry-after"))


def _batch_finished(counts: dict[str, int]) -> bool:
    return not counts.get(JobState.pending, 0) and not counts.get(JobState.processing, 0)


class AsyncHepatoClient:
    """The API over httpx.AsyncClient, with bounded retries on 429, 503 and connection
    errors (honouring Retry-After, up to ``max_retry_after_s``)."""

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        retries: int = 5,
        backoff_s: float = 0.25,
        max_backoff_s: float = 10.0,
        max_retry_after_s: float = 60.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = (url or os.environ.get("HEPATO_URL") or DEFAULT_URL).rstrip("/")
        key = api_key or os.environ.get("HEPATO_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.max_retry_after_s = max_retry_after_s
        self._http = httpx.AsyncClient(
            base_url=self.url, headers=headers, timeout=timeout, transport=transport
        )

    async def __aenter__(self) -> AsyncHepatoClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # --- transport ---------------------------------------------------------------
    def _backoff(self, attempt: int) -> float:
        base = min(self.max_backoff_s, self.backoff_s * 2 ** max(0, attempt - 1))
        return base * random.uniform(0.5, 1.0)  # jitter: clients that failed together spread

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        after = getattr(exc, "retry_after", None)
        if after is not None:
            return float(min(after, self.max_retry_after_s))
        return self._backoff(state.attempt_number)

    async def _send(
        self,
        method: str,
        path: str,
        *,
        files: Sequence[Path] = (),
        on_uploaded: OnUploaded | None = None,
        stream: bool = False,
        retry_conflict: bool = False,
        **kwargs: Any,
    ) -> httpx.Response:
        """One API call with bounded retries; any other error status is a HepatoAPIError.
        ``stream``: the body is left unread (the caller closes the response). Each attempt
        builds the request anew, so its files are read from the start."""
        retry_statuses = RETRY_STATUSES | ({409} if retry_conflict else set())
        retrying = AsyncRetrying(
            retry=retry_if_exception(
                lambda e: isinstance(e, _RetryableStatus | httpx.TransportError)
            ),
            stop=stop_after_attempt(self.retries + 1),
            wait=self._wait,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    response = await self._attempt(
                        method, path, files, on_uploaded, retry_statuses, kwargs
                    )
        except _RetryableStatus as exc:
            raise HepatoAPIError.from_response(exc.response) from None
        except httpx.TransportError as exc:
            raise HepatoConnectionError(f"{self.url}: {exc!r}") from exc
        if response.is_error:
            await response.aread()
            await response.aclose()
            raise HepatoAPIError.from_response(response)
        if not stream:
            await response.aread()
            await response.aclose()
        return response

    async def _attempt(
        self,
        method: str,
        path: str,
        files: Sequence[Path],
        on_uploaded: OnUploaded | None,
        retry_statuses: frozenset[int],
        kwargs: dict[str, Any],
    ) -> httpx.Response:
        lazy = [LazyFile(p, on_uploaded) for p in files]
        parts = [
            (
                "files",
                (f.path.name, cast(IO[bytes], f), mimetypes.guess_type(f.path.name)[0] or _OCTETS),
            )
            for f in lazy
        ]
        try:
            request = self._http.build_request(method, path, files=parts or None, **kwargs)
            # The whole body is sent before send() returns, whatever ``stream`` says.
            response = await self._http.send(request, stream=True)
        finally:
            for f in lazy:
                f.close()
        if response.status_code in retry_statuses:
            await response.aread()  # a short error body, kept for the error of the last try
            await response.aclose()
            raise _RetryableStatus(response)
        return response

    async def _get(self, model: type[M], path: str, **params: Any) -> M:
        response = await self._send("GET", path, params=params or None)
        return model.model_validate_json(response.content)

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
    ) -> list[BatchRef]:
        """Submit image files, ``batch_size`` per request (one batch each). A request
        whose every file is refused raises HepatoAPIError (422, ``detail`` names them);
        ``.submitted`` holds the batches created before it."""
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
                response = await self._send(
                    "POST",
                    "/v1/batches",
                    files=chunk,
                    on_uploaded=on_uploaded,
                    data=form,
                    # Generated once per request, before its retries.
                    headers={"Idempotency-Key": str(uuid.uuid4())},
                    retry_conflict=True,  # 409: the first try is still running; its answer comes
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
        target = Path(out_path)
        part = target.with_name(target.name + ".part")
        response = await self._send(
            "GET", f"/v1/batches/{batch_id}/export", params={"format": format}, stream=True
        )
        try:
            with part.open("wb") as sink:
                async for chunk in response.aiter_raw(EXPORT_CHUNK_BYTES):
                    sink.write(chunk)
            part.replace(target)
        except httpx.TransportError as exc:
            raise HepatoConnectionError(f"export of {batch_id} cut off: {exc!r}") from exc
        finally:
            await response.aclose()
            part.unlink(missing_ok=True)
        return target

    # --- live status ------------------------------------------------------------------
    def events(self, batch_id: uuid.UUID | str) -> AsyncIterator[Event]:
        """The batch's job events until every job is finished, then its ``BatchEvent``.
        A dropped connection is resumed with ``Last-Event-ID`` (bounded by ``retries``
        reconnects in a row that bring nothing)."""
        return self._events(f"/v1/batches/{batch_id}/events", batch=True)

    def job_events(self, job_id: uuid.UUID | str) -> AsyncIterator[Event]:
        return self._events(f"/v1/jobs/{job_id}/events", batch=False)

    async def _events(self, path: str, *, batch: bool) -> AsyncIterator[Event]:
        last_id: str | None = None
        fruitless = 0
        timeout = httpx.Timeout(self._http.timeout.connect, read=EVENTS_READ_TIMEOUT_S)
        while True:
            headers = {"Accept": "text/event-stream", "Cache-Control": "no-store"}
            if last_id is not None:
                headers["Last-Event-ID"] = last_id
            response = await self._send("GET", path, headers=headers, timeout=timeout, stream=True)
            try:
                async for sse in EventSource(response).aiter_sse():
                    if sse.event not in ("job", "batch") or not sse.data:
                        continue
                    fruitless = 0
                    if sse.id:
                        last_id = sse.id
                    event_id = int(sse.id) if sse.id.isdigit() else None
                    data = {**json.loads(sse.data), "event_id": event_id}
                    if sse.event == "batch":
                        yield BatchEvent.model_validate(data)
                        return
                    job = JobEvent.model_validate(data)
                    yield job
                    if not batch and job.state in TERMINAL_STATES:
                        return
            except SSEError as exc:
                raise HepatoAPIError(response.status_code, f"not an event stream: {exc}") from exc
            except httpx.TransportError:
                pass  # dropped: resume below
            finally:
                await response.aclose()
            # The stream ended before its last event: the connection dropped.
            fruitless += 1
            if fruitless > self.retries:
                raise HepatoConnectionError(f"{self.url}{path}: the event stream keeps dropping")
            await anyio.sleep(self._backoff(fruitless))

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
