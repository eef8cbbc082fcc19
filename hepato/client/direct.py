"""Direct uploads for the Python client (``submit(..., direct=True)``): the gateway signs
one PUT URL per file (``POST /v1/uploads``), the files go from disk straight to the
object store, a few at a time, and one commit (``POST /v1/uploads/batches``) makes the
batch. The gateway reads only each file's header, so it is out of the data path.

The PUTs go to the store's address the gateway signed for (``HEPATO_S3_PUBLIC_ENDPOINT``
on the gateway), without the API key. Each is retried on connection errors and 5xx like
any call; the commit carries an ``Idempotency-Key`` that its retries reuse."""

from __future__ import annotations

import mimetypes
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import httpx

from hepato.client.types import HepatoAPIError, HepatoConnectionError
from hepato.client.uploads import OnUploaded
from hepato.common.images import MIME_TYPES
from hepato.common.upload_schemas import UploadsSigned

if TYPE_CHECKING:
    from hepato.client.transport import Transport

# Files in flight at once; each holds one chunk in memory.
PUT_CONCURRENCY = 8
CHUNK_BYTES = 1 << 16
_IMAGE_TYPES = frozenset(MIME_TYPES.values())


def _content_type(path: Path) -> str | None:
    guess = mimetypes.guess_type(path.name)[0]
    return guess if guess in _IMAGE_TYPES else None


async def _chunks(path: Path) -> AsyncIterator[bytes]:
    async with await anyio.open_file(path, "rb") as f:
        while chunk := await f.read(CHUNK_BYTES):
            yield chunk


async def _put(transport: Transport, store: httpx.AsyncClient, path: Path, url: str) -> None:
    """One file to its URL, streamed from disk (a declared length: S3 wants one)."""
    headers = {"Content-Length": str(path.stat().st_size)}
    kind = _content_type(path)
    if kind:
        headers["Content-Type"] = kind
    for attempt in range(transport.retries + 1):
        last = attempt == transport.retries
        try:
            response = await store.put(url, content=_chunks(path), headers=headers)
        except httpx.TransportError as exc:
            if last:
                raise HepatoConnectionError(f"PUT of {path} to the object store: {exc!r}") from exc
        else:
            if response.status_code < 300:
                return
            if response.status_code < 500 or last:
                raise HepatoAPIError(
                    response.status_code, f"PUT of {path} to the object store: {response.text}"
                )
        await anyio.sleep(transport._backoff(attempt + 1))


async def submit_direct(
    transport: Transport,
    files: Sequence[Path],
    fields: dict[str, Any],
    idempotency_key: str,
    on_uploaded: OnUploaded | None = None,
) -> httpx.Response:
    """Sign, put and commit ``files`` as one batch; the commit's answer (as
    ``POST /v1/batches``'s)."""
    specs = []
    for path in files:
        spec: dict[str, Any] = {"size": path.stat().st_size}
        if kind := _content_type(path):
            spec["content_type"] = kind
        specs.append(spec)
    signed = await transport._send("POST", "/v1/uploads", json={"files": specs})
    tickets = UploadsSigned.model_validate_json(signed.content).uploads
    limiter = anyio.CapacityLimiter(PUT_CONCURRENCY)
    async with httpx.AsyncClient(timeout=transport._http.timeout) as store:
        failed: list[Exception] = []

        async def one(path: Path, url: str) -> None:
            try:
                async with limiter:
                    await _put(transport, store, path, url)
            except (HepatoAPIError, HepatoConnectionError, OSError) as exc:
                # The first failure is raised as is (a task group would wrap it).
                failed.append(exc)
                group.cancel_scope.cancel()
                return
            if on_uploaded is not None:
                on_uploaded(path)

        async with anyio.create_task_group() as group:
            for path, ticket in zip(files, tickets, strict=True):
                group.start_soon(one, path, ticket.url)
        if failed:
            raise failed[0]
    body = {
        **fields,
        "uploads": [
            {"key": t.key, "filename": p.name} for p, t in zip(files, tickets, strict=True)
        ],
    }
    return await transport._send(
        "POST",
        "/v1/uploads/batches",
        json=body,
        headers={"Idempotency-Key": idempotency_key},
        retry_conflict=True,
    )
