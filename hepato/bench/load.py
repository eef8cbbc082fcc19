"""The clients of ``hepato bench e2e``: what is submitted, how completion is observed and
what is recorded. Nothing here starts or stops a process.

Latency is client-side wall time from the start of the submitting request to the moment
the client sees the job finished (an event on the job's or batch's stream, or a poll).
Throughput is images finished over first submission start to last finish seen."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from httpx_sse import aconnect_sse

from hepato.bench import uploads
from hepato.bench.options import Upload, Wait
from hepato.common.constants import TERMINAL_STATES
from hepato.common.settings import Settings

MAX_ERRORS_KEPT = 5
# Long enough for a batch of hundreds of images on a slow CPU; a stuck run is cut by the
# scenario's own timeout, not by this.
REQUEST_TIMEOUT = httpx.Timeout(30.0, read=600.0)


@dataclass(frozen=True)
class Image:
    name: str
    data: bytes


def load_images(folder: Path, pattern: str = "synthetic_*.png") -> list[Image]:
    found = [Image(p.name, p.read_bytes()) for p in sorted(folder.glob(pattern))]
    if not found:
        raise FileNotFoundError(f"no {pattern} in {folder}")
    return found


def cycle(images: Sequence[Image], count: int, start: int = 0) -> list[Image]:
    """``count`` images taken round-robin, each with a distinct name."""
    out = []
    for i in range(start, start + count):
        image = images[i % len(images)]
        stem, _, suffix = image.name.rpartition(".")
        out.append(Image(f"{stem}-{i:06d}.{suffix}", image.data))
    return out


@dataclass
class Recorder:
    """What one measurement saw; filled as it goes, so a timeout can say how far it got."""

    expected: int = 0
    started: float | None = None
    finished: float | None = None
    accepted: float | None = None  # the last submission's 202: how fast uploads went in
    done: int = 0
    failures: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    batch_latencies_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    batch_ids: list[str] = field(default_factory=list)
    # Images per model call, as the jobs recorded it (read after the measurement).
    model_batch_sizes: list[int] = field(default_factory=list)
    # CPU ms per finished image, by part of the stack (hepato.bench.cpu).
    cpu_ms_per_image: dict[str, float] = field(default_factory=dict)

    def start(self) -> float:
        now = time.perf_counter()
        if self.started is None:
            self.started = now
        return now

    def finish(self, since: float, ok: bool, error: str | None = None) -> None:
        now = time.perf_counter()
        self.finished = now if self.finished is None else max(self.finished, now)
        if ok:
            self.done += 1
            self.latencies_ms.append((now - since) * 1000.0)
        else:
            self.fail(error or "failed")

    def accept(self) -> None:
        self.accepted = time.perf_counter()

    def fail(self, error: str) -> None:
        self.failures += 1
        if error not in self.errors and len(self.errors) < MAX_ERRORS_KEPT:
            self.errors.append(error)

    @property
    def seconds(self) -> float:
        if self.started is None or self.finished is None:
            return 0.0
        return self.finished - self.started

    @property
    def images_per_s(self) -> float:
        return self.done / self.seconds if self.seconds else 0.0

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "images": self.done,
            "failures": self.failures,
            "seconds": round(self.seconds, 4),
            "images_per_s": round(self.images_per_s, 3),
            "latency_ms": percentiles(self.latencies_ms),
        }
        if self.accepted is not None and self.started is not None:
            out["submit_seconds"] = round(self.accepted - self.started, 4)
        if self.batch_latencies_ms:
            out["batch_latency_ms"] = percentiles(self.batch_latencies_ms)
        if self.model_batch_sizes:
            sizes = self.model_batch_sizes
            out["model_batch_size"] = {
                "mean": round(sum(sizes) / len(sizes), 2),
                "max": max(sizes),
            }
        if self.cpu_ms_per_image:
            out["cpu_ms_per_image"] = self.cpu_ms_per_image
        if self.errors:
            out["errors"] = self.errors
        return out


def percentiles(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    p50, p95, p99 = np.percentile(np.asarray(values), [50, 95, 99])
    return {
        "p50": round(float(p50), 2),
        "p95": round(float(p95), 2),
        "p99": round(float(p99), 2),
        "mean": round(float(np.mean(values)), 2),
        "max": round(float(np.max(values)), 2),
        "count": len(values),
    }


def _client(base_url: str, connections: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(base_url=base_url, timeout=REQUEST_TIMEOUT, limits=limits)


def _refused(response: httpx.Response) -> str:
    return f"HTTP {response.status_code}: {response.text[:200]}"


# --- single images, each client waiting for its job --------------------------------
async def single_clients(
    base_url: str,
    images: Sequence[Image],
    model: str,
    *,
    concurrency: int,
    seconds: float,
    wait: Wait,
    rec: Recorder,
    poll_interval_s: float = 0.02,
    upload: Upload = "multipart",
) -> None:
    """``concurrency`` clients, each submitting one image (POST /v1/jobs) and waiting for
    it to finish before the next, until ``seconds`` have passed since the first."""
    end = time.perf_counter() + seconds
    counter = iter(range(10**9))
    # One connection per client for its submissions and one for its stream.
    async with _client(base_url, 2 * concurrency + 4) as client:

        async def one_client() -> None:
            while time.perf_counter() < end:
                image = cycle(images, 1, next(counter))[0]
                since = rec.start()
                response = await uploads.post_job(client, image, model, upload)
                if response.status_code != 202:
                    rec.finish(since, False, _refused(response))
                    await asyncio.sleep(0.1)  # a refusing gateway is not hammered
                    continue
                job_id = response.json()["job_id"]
                if wait == "sse":
                    state, error = await _follow_job(client, job_id)
                else:
                    state, error = await _poll_job(client, job_id, poll_interval_s)
                rec.finish(since, state == "done", f"job {state}: {error}")

        await asyncio.gather(*(one_client() for _ in range(concurrency)))


async def _follow_job(client: httpx.AsyncClient, job_id: str) -> tuple[str, str | None]:
    async with aconnect_sse(client, "GET", f"/v1/jobs/{job_id}/events") as source:
        async for sse in source.aiter_sse():
            if sse.event != "job" or not sse.data:
                continue
            data = json.loads(sse.data)
            if data["state"] in TERMINAL_STATES:
                return data["state"], data.get("error")
    return "lost", "the event stream ended before the job finished"


async def _poll_job(
    client: httpx.AsyncClient, job_id: str, interval_s: float
) -> tuple[str, str | None]:
    while True:
        response = await client.get(f"/v1/jobs/{job_id}")
        if response.status_code != 200:
            return "lost", _refused(response)
        job = response.json()
        if job["state"] in TERMINAL_STATES:
            return job["state"], job.get("error")
        await asyncio.sleep(interval_s)


# --- batches -------------------------------------------------------------------------
def chunks(images: Sequence[Image], size: int) -> Iterator[list[Image]]:
    for i in range(0, len(images), size):
        yield list(images[i : i + size])


async def batch_clients(
    base_url: str,
    images: Sequence[Image],
    model: str,
    *,
    concurrency: int,
    chunk: int,
    wait_each: bool,
    rec: Recorder,
    upload: Upload = "multipart",
) -> None:
    """Submit ``images`` as batches of ``chunk`` (POST /v1/batches) from ``concurrency``
    clients and follow each batch's event stream until every job is finished.

    ``wait_each``: a client waits for its batch to finish before submitting the next
    (closed loop, for batch latency); otherwise it submits as fast as the gateway accepts
    while the streams are followed alongside (a flood, for throughput)."""
    rec.expected += len(images)
    todo = list(chunks(images, chunk))
    followers: list[asyncio.Task[None]] = []
    async with _client(base_url, 2 * concurrency + len(todo) + 4) as client:

        async def one_client() -> None:
            while todo:
                part = todo.pop(0)
                since = rec.start()
                response = await uploads.post_batch(client, part, model, upload)
                if response.status_code != 202:
                    for _ in part:
                        rec.finish(since, False, _refused(response))
                    continue
                rec.accept()
                batch_id = response.json()["batch_id"]
                rec.batch_ids.append(batch_id)
                follow = _follow_batch(client, batch_id, since, len(part), rec)
                if wait_each:
                    await follow
                else:
                    followers.append(asyncio.create_task(follow))

        try:
            await asyncio.gather(*(one_client() for _ in range(concurrency)))
            await asyncio.gather(*followers)
        finally:
            for task in followers:
                task.cancel()


async def _follow_batch(
    client: httpx.AsyncClient, batch_id: str, since: float, size: int, rec: Recorder
) -> None:
    seen: set[str] = set()
    async with aconnect_sse(client, "GET", f"/v1/batches/{batch_id}/events") as source:
        async for sse in source.aiter_sse():
            if not sse.data:
                continue
            data = json.loads(sse.data)
            if sse.event == "batch":
                rec.batch_latencies_ms.append((time.perf_counter() - since) * 1000.0)
                break
            finished = sse.event == "job" and data["state"] in TERMINAL_STATES
            if finished and data["job_id"] not in seen:
                seen.add(data["job_id"])
                ok = data["state"] == "done"
                rec.finish(since, ok, f"job {data['state']}: {data.get('error')}")
    for _ in range(size - len(seen)):
        rec.fail(f"batch {batch_id}: its event stream ended before every job finished")


async def read_model_batch_sizes(base_url: str, rec: Recorder) -> None:
    """Fill ``rec.model_batch_sizes`` from the jobs of the batches it submitted."""
    async with _client(base_url, 4) as client:
        for batch_id in rec.batch_ids:
            url: str | None = f"/v1/batches/{batch_id}?page_size=1000"
            while url:
                page = (await client.get(url)).raise_for_status().json()
                rec.model_batch_sizes.extend(
                    j["batch_size"] for j in page["jobs"] if j["batch_size"]
                )
                url = page["next_page_url"]


# --- the queue filled first ---------------------------------------------------------------
async def submit_only(
    base_url: str,
    images: Sequence[Image],
    model: str,
    *,
    chunk: int,
    rec: Recorder,
    upload: Upload = "multipart",
) -> None:
    """Queue ``images`` as batches (no worker should be running); ids into ``rec``."""
    async with _client(base_url, 4) as client:
        for part in chunks(images, chunk):
            response = await uploads.post_batch(client, part, model, upload)
            if response.status_code != 202:
                raise httpx.HTTPStatusError(
                    _refused(response), request=response.request, response=response
                )
            rec.batch_ids.append(response.json()["batch_id"])
            rec.expected += len(part)


async def drained(base_url: str, rec: Recorder, poll_s: float = 0.25) -> None:
    """Wait until every job of ``rec.batch_ids`` finished, then time the workers by the
    jobs' own timelines (Postgres's clock): first claim to last result written. No
    client, gateway or upload is in that span: it is what the workers alone deliver."""
    async with _client(base_url, 4) as client:
        for batch_id in rec.batch_ids:
            while True:
                body = (await client.get(f"/v1/batches/{batch_id}")).raise_for_status().json()
                if body["state"] in ("done", "done_with_failures"):
                    break
                await asyncio.sleep(poll_s)
        claimed: list[float] = []
        written: list[float] = []
        for batch_id in rec.batch_ids:
            url: str | None = f"/v1/batches/{batch_id}?page_size=1000"
            while url:
                page = (await client.get(url)).raise_for_status().json()
                for job in page["jobs"]:
                    if job["state"] != "done":
                        rec.fail(f"job {job['state']}: {job.get('error')}")
                        continue
                    rec.done += 1
                    claimed.append(_epoch(job["timeline"]["claimed"]))
                    written.append(_epoch(job["timeline"]["written"]))
                    if job["batch_size"]:
                        rec.model_batch_sizes.append(job["batch_size"])
                url = page["next_page_url"]
    if claimed:
        rec.started, rec.finished = min(claimed), max(written)


def _epoch(stamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(stamp).timestamp()


# --- the object store alone -------------------------------------------------------------
async def object_store_alone(
    settings: Settings, images: Sequence[Image], *, concurrency: int, rec: Recorder
) -> None:
    """One PUT and one GET per image with the client the gateway and workers use, from
    ``concurrency`` threads: what the store can do for these images with nothing else."""
    from hepato.common.storage import ObjectStore

    store = ObjectStore(settings.model_copy(update={"s3_bucket": "hepato-bench"}), concurrency)
    await asyncio.to_thread(store.ensure_bucket)
    # Unmeasured: the store's first write to a bucket allocates its volumes.
    await asyncio.to_thread(store.put, "bench/warm-up", images[0].data, "image/png")
    rec.expected += len(images)

    def one(image: Image) -> None:
        since = rec.start()
        key = f"bench/{uuid.uuid4().hex}.png"
        try:
            store.put(key, image.data, "image/png")
            ok = store.get(key) == image.data
            rec.finish(since, ok, "read back different bytes")
        except Exception as exc:
            rec.finish(since, False, f"{type(exc).__name__}: {exc}")

    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(concurrency, thread_name_prefix="s3-bench") as pool:
        await asyncio.gather(*(loop.run_in_executor(pool, one, image) for image in images))
