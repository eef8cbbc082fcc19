"""The request layer of the Python client: one API call with bounded retries.

Retries are on 429, 503 and connection errors, with jittered exponential backoff or the
``Retry-After`` the gateway sent (up to ``max_retry_after_s``). Uploads are streamed from
disk: every file is a ``LazyFile`` that opens on its first read and closes at its end, so
a request of thousands of files holds one descriptor and one 64 KiB chunk at a time.
Event streams resume a dropped connection with ``Last-Event-ID``; downloads are streamed
to a part file renamed at the end."""

from __future__ import annotations

import mimetypes
import os
import random
from collections.abc import AsyncGenerator, Collection, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar, cast

import anyio
import httpx
from httpx_sse import EventSource, ServerSentEvent, SSEError
from pydantic import BaseModel
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from hepato.client.types import HepatoAPIError, HepatoConnectionError, retry_after_seconds
from hepato.client.uploads import LazyFile, OnUploaded

DEFAULT_URL = "http://127.0.0.1:8000"
# Statuses that mean "nothing was kept, try again later" (README: How a job is never lost).
RETRY_STATUSES = frozenset({429, 503})
# sse-starlette pings an idle stream every 15 s: a minute of silence is a dead connection.
EVENTS_READ_TIMEOUT_S = 60.0
DOWNLOAD_CHUNK_BYTES = 1 << 16

M = TypeVar("M", bound=BaseModel)
_OCTETS = "application/octet-stream"


class _RetryableStatus(Exception):
    def __init__(self, response: httpx.Response) -> None:
        super().__init__(f"HTTP {response.status_code}")
        self.response = response
        self.retry_after = retry_after_seconds(response.headers.get("retry-after"))


class Transport:
    """httpx.AsyncClient with the URL, the key and the retry policy; the base of
    ``AsyncHepatoClient``."""

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

    async def aclose(self) -> None:
        await self._http.aclose()

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
        file_field: str = "files",
        on_uploaded: OnUploaded | None = None,
        stream: bool = False,
        retry_conflict: bool = False,
        **kwargs: Any,
    ) -> httpx.Response:
        """One API call with bounded retries; any other error status is a HepatoAPIError.
        ``stream``: the body is left unread (the caller closes the response). Each attempt
        builds the request anew, so its files (multipart parts named ``file_field``) are
        read from the start."""
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
                        method, path, files, file_field, on_uploaded, retry_statuses, kwargs
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
        field: str,
        on_uploaded: OnUploaded | None,
        retry_statuses: frozenset[int],
        kwargs: dict[str, Any],
    ) -> httpx.Response:
        lazy = [LazyFile(p, on_uploaded) for p in files]
        parts = [
            (
                field,
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

    async def _download(
        self, path: str, out_path: str | os.PathLike[str], params: dict[str, Any]
    ) -> Path:
        """GET ``path`` streamed to ``out_path``, written whole or not at all (a part file
        renamed at the end). A gzip-encoded body is written decoded."""
        target = Path(out_path)
        part = target.with_name(target.name + ".part")
        response = await self._send("GET", path, params=params, stream=True)
        try:
            with part.open("wb") as sink:
                async for chunk in response.aiter_bytes(DOWNLOAD_CHUNK_BYTES):
                    sink.write(chunk)
            part.replace(target)
        except httpx.TransportError as exc:
            raise HepatoConnectionError(f"{self.url}{path} cut off: {exc!r}") from exc
        finally:
            await response.aclose()
            part.unlink(missing_ok=True)
        return target

    async def _sse(
        self, path: str, kinds: Collection[str]
    ) -> AsyncGenerator[ServerSentEvent, None]:
        """The events named in ``kinds`` of the stream at ``path``, for as long as the
        caller reads: a connection that drops (or ends) is resumed with the last event's
        id as ``Last-Event-ID``, up to ``retries`` reconnects in a row that bring nothing.
        The caller stops reading at its last event (use ``contextlib.aclosing``)."""
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
                    if sse.event not in kinds or not sse.data:
                        continue
                    fruitless = 0
                    if sse.id:
                        last_id = sse.id
                    yield sse
            except SSEError as exc:
                raise HepatoAPIError(response.status_code, f"not an event stream: {exc}") from exc
            except httpx.TransportError:
                pass  # dropped: resume below
            finally:
                await response.aclose()
            # The stream ended before the caller's last event: the connection dropped.
            fruitless += 1
            if fruitless > self.retries:
                raise HepatoConnectionError(f"{self.url}{path}: the event stream keeps dropping")
            await anyio.sleep(self._backoff(fruitless))
