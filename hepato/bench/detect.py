"""The realtime scenario of ``hepato bench e2e`` (issue 15): how close ``POST /v1/detect``
comes to the bare model, and where one request's time goes.

  bare       the variant the stack serves, one process with a lone worker's threads (all
             the cores): each batch-1 call timed, then images/s at each client count;
             CPU ms per image. The stack's realtime_workers workers (1 by default) each
             get their share of the cores. With model_cpus, the bare model and the
             workers' model threads run on those cores, every other part on the rest
  1 client   realtime_requests requests one after another: latency, and the median of
             each stage the gateway reports (the answer's stages_ms)
  c clients  for sweep_seconds: images/s against the bare model at batch c, latency,
             CPU ms per image by part of the stack

``/v1/detect`` answers with the result once the job has finished, so one request is one
image's whole latency as a caller sees it: client-side wall time around the request. Its
figures, table and targets are hepato.bench.realtime's; the other clients are in
hepato.bench.load."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import httpx

from hepato.bench import cpu, realtime, report
from hepato.bench.bare import bare_realtime, bracketed
from hepato.bench.load import REQUEST_TIMEOUT, Image, Recorder, cycle
from hepato.bench.registry import variant_name
from hepato.common import cpus
from hepato.common.manifest import load_registry

if TYPE_CHECKING:
    from hepato.bench.e2e import Bench

SCENARIO = "realtime"
WARM_UP_REQUESTS = 3
Measured = Callable[[Recorder], Coroutine[Any, Any, None]]


def _refused(response: httpx.Response) -> str:
    if response.status_code == 202:
        return "HTTP 202: still running when the gateway's detect_timeout_s ran out"
    return f"HTTP {response.status_code}: {response.text[:200]}"


def _stages(body: object) -> dict[str, float] | None:
    """The response's ``stages_ms`` as numbers, or None where the gateway gives none (an
    empty one, for a job with no stage recorded, is given as it is)."""
    found = body.get("stages_ms") if isinstance(body, dict) else None
    if not isinstance(found, dict):
        return None
    return {str(k): float(v) for k, v in found.items() if isinstance(v, int | float)}


async def detect_clients(
    base_url: str,
    images: Sequence[Image],
    model: str,
    *,
    concurrency: int,
    rec: Recorder,
    stages: list[dict[str, float]],
    seconds: float | None = None,
    requests: int | None = None,
) -> None:
    """``concurrency`` clients, each sending one image at a time to ``POST /v1/detect``
    and the next once its answer is in, until ``seconds`` have passed since the first or
    ``requests`` have been sent by all of them together. Each answer's ``stages_ms`` goes
    to ``stages``."""
    if seconds is None and requests is None:
        raise ValueError("detect_clients needs seconds or requests")
    end = time.perf_counter() + seconds if seconds is not None else float("inf")
    counter = itertools.count()
    if requests is not None:
        rec.expected += requests
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(
        base_url=base_url, timeout=REQUEST_TIMEOUT, limits=limits
    ) as client:

        async def one_client() -> None:
            while time.perf_counter() < end:
                i = next(counter)
                if requests is not None and i >= requests:
                    return
                image = cycle(images, 1, i)[0]
                since = rec.start()
                response = await client.post(
                    "/v1/detect",
                    files={"file": (image.name, image.data, "image/png")},
                    data={"model": model},
                )
                if response.status_code != 200:
                    rec.finish(since, False, _refused(response))
                    await asyncio.sleep(0.1)  # a refusing gateway is not hammered
                    continue
                rec.finish(since, True)
                found = _stages(response.json())
                if found:
                    stages.append(found)

        await asyncio.gather(*(one_client() for _ in range(concurrency)))


def run(bench: Bench) -> dict[str, Any]:
    """The bare model, with no worker running; then the workers serving the same variant
    with its manifest's batching, warmed up, at each client count; then the bare model
    again, each of its figures the mean of its two runs (hepato.bench.bare.bracketed)."""
    o, stack = bench.opts, bench.stack
    # With model_cpus, the bare model and the workers' model threads on those cores, the
    # rest of the stack on the others (hepato.bench.cpu ``pin_all_but_workers``).
    split = cpus.split(o.model_cpus)
    workers, size = o.realtime_workers, o.realtime_size
    threads = len(split.model) if split else cpus.share(1)
    worker_threads = max(1, len(split.model) // workers) if split else cpus.share(workers)
    name = variant_name(o.model, size)

    def bare_model() -> dict[str, Any]:
        stack.stop_workers()  # the bare model has the machine to itself
        found = bare_realtime(
            SCENARIO,
            stack.models_dir,
            name,
            size,
            batches=o.realtime_concurrency,
            device=bench.settings.device,
            threads=threads,
            seconds=o.bare_seconds,
            samples=o.samples,
            timeout_s=o.timeout_s,
            cores=split.model if split else None,
        )
        for key, row in found.items():
            _progress_bare(key, row)
        return found

    before = bare_model()
    env = {"HEPATO_CPU_THREADS": str(worker_threads), "HEPATO_MODEL_CPUS": o.model_cpus}
    if split:  # decoding is the rest's work
        env["HEPATO_DECODE_PROCESSES"] = str(max(1, len(split.rest) // workers))
    bench.start_workers(SCENARIO, workers, name, env)
    if split:
        cpu.pin_all_but_workers(stack.local, split.rest)

    def clients(c: int, stages: list[dict[str, float]], requests: int | None) -> Measured:
        seconds = None if requests is not None else o.sweep_seconds
        return lambda rec: detect_clients(
            stack.base_url,
            bench.images,
            name,
            concurrency=c,
            rec=rec,
            stages=stages,
            seconds=seconds,
            requests=requests,
        )

    if o.warmup_images:  # the detect route's own first calls, unmeasured
        bench.measure(SCENARIO, "detect warm-up", clients(1, [], WARM_UP_REQUESTS))
    detect = []
    for c in dict.fromkeys((1, *o.realtime_concurrency)):
        stages: list[dict[str, float]] = []
        what = f"{c} detect client{'s' if c > 1 else ''}"
        rec = bench.measure(
            SCENARIO, what, clients(c, stages, o.realtime_requests if c == 1 else None)
        )
        row: dict[str, Any] = {"concurrency": c, **rec.summary()}
        if stages:
            row["stages_ms"] = realtime.stage_medians(stages)
            row["stages_requests"] = len(stages)
        detect.append(row)
        report.progress(SCENARIO, what, row, (before.get(f"batch {c}") or {}).get("images_per_s"))
    if split:
        cpu.pin_all_but_workers(stack.local, split.model | split.rest)
    after = bare_model()
    bare = {key: bracketed(row, after[key]) for key, row in before.items() if key in after}
    for key, row in bare.items():
        report.drift(SCENARIO, f"bare model, {key}", row)
    manifest = load_registry(stack.models_dir)[name]
    settings = {
        "model": name,
        "input_size": size,
        "workers": workers,
        "cpu_threads": worker_threads,
        "bare_cpu_threads": threads,
        "model_cpus": cpus.format_list(split.model) if split else None,
        "stack_cpus": cpus.format_list(split.rest) if split else None,
        "max_batch_size": manifest.max_batch_size,
        "max_wait_ms": manifest.max_wait_ms,
        "requests_at_one_client": o.realtime_requests,
        "seconds_per_concurrency": o.sweep_seconds,
        "bare_seconds": o.bare_seconds,
    }
    return {"settings": settings, "bare": bare, "detect": detect}


def _progress_bare(key: str, row: Mapping[str, Any]) -> None:
    lat = row.get("latency_ms") or {}
    latency = f", p50 {lat['p50']} ms, p99 {lat['p99']} ms" if lat else ""
    report.console.print(
        f"  {SCENARIO}: bare model, {key}: [bold]{row['images_per_s']:.1f} images/s[/]"
        f"{latency}, CPU {row['cpu_ms_per_image']:.1f} ms per image"
    )
