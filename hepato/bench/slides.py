"""``hepato bench slides``: a synthetic whole slide through the whole service, in one run
against what bounds it.

  service   POST /v1/slides to the slide's last tile done, one worker: tiles/s, and the
            CPU each part of the stack spends per tile (hepato.bench.cpu)
  images    the same tiles as PNG images, flooded through POST /v1/batches: images/s
  bare      the bare model on the same tiles at the same batch size, read by the same
            code as the worker's (worker.slides.read_tile on a SlideCache): model time only
  memory    the worker's peak RSS (its VmHWM, a fresh process each time) on the slide and
            on one of twice the area

The stack, its workers and the image clients are hepato.bench.e2e's (Bench, BenchStack);
the slides are written by hepato.common.slides.synthetic."""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from httpx_sse import aconnect_sse
from sqlalchemy import func, select

from hepato.bench import load, report, slide_report
from hepato.bench.e2e import Bench
from hepato.bench.options import BenchOptions
from hepato.bench.stack import BenchStack
from hepato.common import cpus
from hepato.common.db import get_engine
from hepato.common.exceptions import BenchFailed
from hepato.common.job_statements import CLAIMED_COLUMNS
from hepato.common.jobs import ClaimedJob, claimed_job
from hepato.common.manifest import dump_manifest, load_registry
from hepato.common.settings import REPO_ROOT, Settings
from hepato.common.slide_schemas import SLIDE_TERMINAL_STATES
from hepato.common.slides.cache import SlideCache
from hepato.common.slides.synthetic import SlideKind, write_synthetic_slide
from hepato.common.storage import ObjectStore
from hepato.common.tables import Job
from hepato.worker.backends.base import Runtime, load_model
from hepato.worker.slides import read_tile

REPORT_NAME = "bench-slides.json"
SCENARIO = "slides"
QUICK_SIZE = 4000


@dataclass
class SlideBenchOptions:
    out: Path = REPO_ROOT / ".data" / "bench"
    size: int = 20000  # level-0 side of the slide, px; the memory run's is size * sqrt(2)
    model: str = "hepato-yolov8n"
    batch: int = 16  # microbatch cap of the worker, and the bare model's batch
    fmt: SlideKind = "svs"
    mpp: float = 0.5
    tissue_fraction: float = 0.5
    seed: int = 0
    timeout_s: float = 1800.0  # per measurement
    clients: int = 8  # image path: concurrent submitters
    chunk: int = 25  # image path: images per POST /v1/batches
    warmup_images: int = 16  # through each new worker, not measured
    samples: Path = REPO_ROOT / "samples"


def _peak_rss_mb(pid: int) -> dict[str, float] | None:
    """The process's resident memory now and its high-water mark (Linux), MB."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return None
    kib = {
        key: float(value.split()[0])
        for key, _, value in (line.partition(":") for line in lines)
        if key in ("VmRSS", "VmHWM")
    }
    if len(kib) < 2:
        return None
    return {"rss_mb": round(kib["VmRSS"] / 1024, 1), "peak_rss_mb": round(kib["VmHWM"] / 1024, 1)}


def _load() -> float | None:
    """The 1-minute load average at the end of a measurement: above the core count, other
    work shared the machine and the figures are low."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def _stamp(value: str | None) -> float | None:
    return datetime.fromisoformat(value).timestamp() if value else None


def _span(a: float | None, b: float | None) -> float | None:
    return round(b - a, 3) if a is not None and b is not None else None


class SlideBench:
    def __init__(self, opts: SlideBenchOptions, bench: Bench, settings: Settings) -> None:
        self.opts, self.bench, self.settings = opts, bench, settings
        self.stack: BenchStack = bench.stack
        self.env = {
            "HEPATO_CPU_THREADS": str(cpus.share(1)),
            "HEPATO_MAX_BATCH_SIZE": str(opts.batch),
        }

    def fresh_worker(self) -> int:
        """One new worker (warmed up through the image path); its pid."""
        self.bench.start_workers(SCENARIO, 1, self.opts.model, self.env)
        return self.stack.workers[0][1].pid

    # --- the slide through the service ---------------------------------------------
    def through_service(self, path: Path, what: str) -> dict[str, Any]:
        """POST the slide and follow its events to the end; tiles/s from the POST's start
        to the finished event, and the slide's own timeline (Postgres's clock)."""
        base, model = self.stack.base_url, self.opts.model
        found: dict[str, Any] = {}

        def post() -> str:
            with (
                path.open("rb") as f,
                httpx.Client(base_url=base, timeout=load.REQUEST_TIMEOUT) as c,
            ):
                r = c.post("/v1/slides", files={"file": (path.name, f)}, data={"model": model})
            if r.status_code != 202:
                raise httpx.HTTPStatusError(
                    f"POST /v1/slides: HTTP {r.status_code}: {r.text[:200]}",
                    request=r.request,
                    response=r,
                )
            return str(r.json()["slide_id"])

        async def work(rec: load.Recorder) -> None:
            rec.start()
            slide_id = await asyncio.to_thread(post)
            rec.accept()
            async with httpx.AsyncClient(base_url=base, timeout=load.REQUEST_TIMEOUT) as client:
                url = f"/v1/slides/{slide_id}/events"
                async with aconnect_sse(client, "GET", url) as source:
                    async for sse in source.aiter_sse():
                        if sse.data and json.loads(sse.data)["state"] in SLIDE_TERMINAL_STATES:
                            break
                rec.finished = time.perf_counter()
                slide = (await client.get(f"/v1/slides/{slide_id}")).raise_for_status().json()
            tiles = slide["tiles"]
            rec.done = tiles["done"]
            rec.failures = tiles["total"] - tiles["done"]
            found.update(slide)

        rec = self.bench.measure(SCENARIO, what, work)
        slide = found
        if slide.get("state") != "done":
            raise BenchFailed(SCENARIO, f"{what}: the slide ended {slide.get('state')}: {slide}")
        created, planned = _stamp(slide["created_at"]), _stamp(slide["planned_at"])
        finished = _stamp(slide["finished_at"])
        batches = self._batch_sizes(uuid.UUID(slide["id"]))
        tiles_span = _span(planned, finished)
        summary = slide["summary"] or {}
        return {
            "slide_id": slide["id"],
            "tiles": rec.done,
            "failures": rec.failures,
            "seconds": round(rec.seconds, 3),
            "tiles_per_s": round(rec.images_per_s, 3),
            "upload_seconds": round((rec.accepted or 0.0) - (rec.started or 0.0), 3),
            "planning_seconds": _span(created, planned),
            "tiles_seconds": tiles_span,
            "tiles_per_s_after_planning": round(rec.done / tiles_span, 3) if tiles_span else None,
            "model_batch_size": batches,
            "detections": sum(c["count"] for c in summary.get("classes", [])),
            "tissue_area_mm2": summary.get("tissue_area_mm2"),
            "cpu_ms_per_tile": rec.cpu_ms_per_image,
            "load_average_1min": _load(),
        }

    def _rows(self, query: Any) -> list[Any]:
        engine = get_engine(self.stack.local.database_url)
        try:
            with engine.connect() as conn:
                return list(conn.execute(query).all())
        finally:
            engine.dispose()

    def _batch_sizes(self, slide_id: uuid.UUID) -> dict[str, float]:
        [(mean, top)] = self._rows(
            select(func.avg(Job.batch_size), func.max(Job.batch_size)).where(
                Job.batch_id == slide_id, Job.kind == "tile"
            )
        )
        return {"mean": round(float(mean or 0), 2), "max": int(top or 0)}

    def tile_jobs(self, slide_id: str) -> list[ClaimedJob]:
        """The slide's tile jobs as a worker claims them (ClaimedJob), row by row."""
        rows = self._rows(
            select(*CLAIMED_COLUMNS)
            .where(Job.batch_id == uuid.UUID(slide_id), Job.kind == "tile")
            .order_by(Job.tile_y, Job.tile_x)
        )
        return [claimed_job(row) for row in rows]

    # --- the same tiles, read by the worker's code --------------------------------------
    def _tiles(
        self, jobs: Sequence[ClaimedJob], cache_dir: Path
    ) -> Iterator[tuple[ClaimedJob, np.ndarray]]:
        """An iterator of (job, RGB tile at the model's input size), read from a local copy
        of the stored slide exactly as a worker reads it."""
        size = load_registry(self.stack.models_dir)[self.opts.model].input_size
        store = ObjectStore(self.stack.store_settings(), 4)
        cache = SlideCache(cache_dir, 1 << 40, store)
        try:
            for job in jobs:
                yield job, read_tile(cache, job, size)
        finally:
            cache.close()

    def as_images(self, jobs: Sequence[ClaimedJob], cache_dir: Path) -> list[load.Image]:
        import cv2

        out = []
        for i, (_, rgb) in enumerate(self._tiles(jobs, cache_dir)):
            ok, png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
            if not ok:
                raise BenchFailed(SCENARIO, "a tile could not be encoded as PNG")
            out.append(load.Image(f"tile-{i:06d}.png", png.tobytes()))
        return out

    def image_path(self, images: Sequence[load.Image]) -> dict[str, Any]:
        o, what = self.opts, "the same tiles as images"
        rec = self.bench.batches(
            SCENARIO, what, o.model, images, clients=o.clients, chunk=o.chunk, wait_each=False
        )
        out = rec.summary()
        out["png_bytes_mean"] = round(sum(len(i.data) for i in images) / max(1, len(images)))
        out["load_average_1min"] = _load()
        return out

    def bare(self, jobs: Sequence[ClaimedJob], cache_dir: Path) -> dict[str, Any]:
        """The bare model on the tiles, microbatches of the worker's size, in this process
        with the worker's threads; only ``predict`` is timed."""
        manifest = load_registry(self.stack.models_dir)[self.opts.model]
        batch = min(self.opts.batch, manifest.max_batch_size)
        threads = cpus.share(1)
        model = load_model(manifest, Runtime(device=self.settings.device, threads=threads))
        model_s = read_s = 0.0
        tiles, chunk = 0, []
        warm = False
        started = time.perf_counter()
        for _, rgb in self._tiles(jobs, cache_dir):
            chunk.append(rgb)
            if len(chunk) < batch and tiles + len(chunk) < len(jobs):
                continue
            if not warm:  # lazy init, allocator, kernel selection: not the model's rate
                model.predict(chunk)
                warm = True
            read_s += time.perf_counter() - started
            t0 = time.perf_counter()
            model.predict(chunk)
            model_s += time.perf_counter() - t0
            tiles += len(chunk)
            chunk = []
            started = time.perf_counter()
        return {
            "tiles": tiles,
            "batch": batch,
            "threads": threads,
            "model_seconds": round(model_s, 3),
            "tiles_per_s": round(tiles / model_s, 3) if model_s else 0.0,
            "read_ms_per_tile": round(1000 * read_s / tiles, 3) if tiles else None,
            "load_average_1min": _load(),
        }


def _write_models_dir(settings: Settings, model: str, folder: Path) -> None:
    """The registry as the gateway and workers of this run serve it (weights made
    absolute). Not hepato.bench.registry's: that adds input-size variants of the model,
    which a model without weights (null) cannot have."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.yaml"):
        stale.unlink()
    registry = load_registry(settings.models_dir)
    if model not in registry:
        raise BenchFailed("start-up", f"no model {model!r} in {settings.models_dir}")
    for name, m in registry.items():
        update = {"weights": m.weights_path} if m.weights is not None else {}
        dump_manifest(m.model_copy(update=update), folder / f"{name}.yaml")


def _write_slide(opts: SlideBenchOptions, folder: Path, side: int) -> dict[str, Any]:
    path = folder / f"synthetic-{side}.{opts.fmt}"
    started = time.perf_counter()
    write_synthetic_slide(
        path,
        side,
        side,
        mpp=opts.mpp,
        tissue_fraction=opts.tissue_fraction,
        seed=opts.seed,
        fmt=opts.fmt,
        samples=opts.samples,
    )
    return {
        "file": path.name,
        "width": side,
        "height": side,
        "format": opts.fmt,
        "mpp": opts.mpp,
        "tissue_fraction": opts.tissue_fraction,
        "file_bytes": path.stat().st_size,
        "write_seconds": round(time.perf_counter() - started, 2),
    }


def _run(sb: SlideBench, slides: dict[str, Any], work: Path, result: dict[str, Any]) -> None:
    single, double = slides["single"], slides["double"]
    files = {k: work / s["file"] for k, s in slides.items()}
    pid = sb.fresh_worker()
    idle = _peak_rss_mb(pid)
    service = sb.through_service(files["single"], "slide through the service")
    single["worker_memory"] = {"after_warm_up": idle, "after_slide": _peak_rss_mb(pid)}
    result["service"] = service
    slide_report.progress("slide through the service", service)
    jobs = sb.tile_jobs(service["slide_id"])
    images = sb.as_images(jobs, work / "cache-images")
    result["images"] = sb.image_path(images)
    del images
    slide_report.progress("the same tiles as images", result["images"])
    pid = sb.fresh_worker()
    idle = _peak_rss_mb(pid)
    twice = sb.through_service(files["double"], "slide of twice the area")
    double["worker_memory"] = {"after_warm_up": idle, "after_slide": _peak_rss_mb(pid)}
    result["service_double"] = twice
    slide_report.progress("slide of twice the area", twice)
    sb.stack.stop_workers()
    result["bare"] = sb.bare(jobs, work / "cache-bare")
    slide_report.progress("bare model, same tiles", result["bare"])


def run_slide_bench(opts: SlideBenchOptions, settings: Settings, argv: list[str]) -> dict[str, Any]:
    """Write the slides, start the stack, run every measurement, stop everything; write
    and return the report. A failure still stops every process."""
    opts.out.mkdir(parents=True, exist_ok=True)
    models_dir = opts.out / "slide-models"
    stack = BenchStack(settings.data_dir / "bench-stack", models_dir)
    work = Path(tempfile.mkdtemp(prefix="bench-slides-", dir=settings.data_dir))
    result: dict[str, Any] = {
        "command": argv,
        "started_at": report.now(),
        "machine": report.machine_info(settings.device),
        "options": {k: report.plain(v) for k, v in asdict(opts).items()},
    }
    try:
        e2e = BenchOptions(
            out=opts.out,
            model=opts.model,
            samples=opts.samples,
            timeout_s=opts.timeout_s,
            warmup_images=opts.warmup_images,
            clients=opts.clients,
            chunk=opts.chunk,
        )
        _write_models_dir(settings, opts.model, models_dir)
        double_side = math.ceil(opts.size * math.sqrt(2))
        with report.status(f"writing synthetic slides ({opts.size} and {double_side} px)..."):
            slides = {
                "single": _write_slide(opts, work, opts.size),
                "double": _write_slide(opts, work, double_side),
            }
        result["slides"] = slides
        with report.status("starting Postgres, Redis, SeaweedFS and the gateway..."):
            stack.start()
        report.heading(SCENARIO)
        _run(SlideBench(opts, Bench(e2e, stack, settings), settings), slides, work, result)
    except BenchFailed as exc:
        result["error"] = str(exc)
        raise
    finally:
        with report.status("stopping every process the bench started..."):
            stack.stop()
        shutil.rmtree(work, ignore_errors=True)
        result["finished_at"] = report.now()
        result["ratios"] = slide_report.ratios(result)
        result["targets"] = slide_report.targets(result["ratios"])
        out = opts.out / REPORT_NAME
        result["files"] = [str(out)]
        out.write_text(json.dumps(report.plain(result), indent=2) + "\n")
    slide_report.print_report(result)
    return result
