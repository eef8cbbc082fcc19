"""How the bench's clients send an image or a batch: multipart through the gateway (the
default), or direct (``--upload direct``): presigned PUT URLs from ``POST /v1/uploads``,
the bytes put on the object store by the client, then one commit. Either way the answer
is the submission's (202 with the job or batch), so the measurements around it are the
same; a refused step answers in its place (its status is not 202)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING

import httpx

from hepato.bench.options import Upload

if TYPE_CHECKING:
    from hepato.bench.load import Image


async def post_job(
    client: httpx.AsyncClient, image: Image, model: str, upload: Upload
) -> httpx.Response:
    if upload == "multipart":
        files = {"file": (image.name, image.data, "image/png")}
        return await client.post("/v1/jobs", files=files, data={"model": model})
    keys = await _put_all(client, [image])
    if isinstance(keys, httpx.Response):
        return keys
    body = {"model": model, "upload": {"key": keys[0], "filename": image.name}}
    return await client.post("/v1/uploads/jobs", json=body)


async def post_batch(
    client: httpx.AsyncClient, images: Sequence[Image], model: str, upload: Upload
) -> httpx.Response:
    if upload == "multipart":
        files = [("files", (i.name, i.data, "image/png")) for i in images]
        return await client.post("/v1/batches", files=files, data={"model": model})
    keys = await _put_all(client, images)
    if isinstance(keys, httpx.Response):
        return keys
    staged = [{"key": k, "filename": i.name} for k, i in zip(keys, images, strict=True)]
    return await client.post("/v1/uploads/batches", json={"model": model, "uploads": staged})


async def _put_all(
    client: httpx.AsyncClient, images: Sequence[Image]
) -> list[str] | httpx.Response:
    """The keys the images were put under, or the first answer that was not a success."""
    specs = [{"size": len(i.data), "content_type": "image/png"} for i in images]
    signed = await client.post("/v1/uploads", json={"files": specs})
    if signed.status_code != 200:
        return signed
    tickets = signed.json()["uploads"]
    # The presigned URL is absolute: it goes to the store, not to the gateway.
    puts = await asyncio.gather(
        *(
            client.put(t["url"], content=i.data, headers={"Content-Type": "image/png"})
            for t, i in zip(tickets, images, strict=True)
        )
    )
    failed = next((r for r in puts if r.status_code != 200), None)
    return failed if failed is not None else [t["key"] for t in tickets]
