"""``hepato bench e2e``: the scenarios, run in order against one local stack.

  load        single-image clients at each concurrency, and batches of 100 images
  overhead    the null model with 1, 2, 4 workers against the object store alone
  efficiency  the whole stack against the bare model, same batch size, processes, threads
  batching    max_batch_size x max_wait_ms with the null model, and the model at 320 px
  realtime    POST /v1/detect at 1, 4, 16 clients against the bare model (hepato.bench.detect)

Processes are managed in hepato.bench.stack, clients in hepato.bench.load, the bare
model in hepato.bench.bare, tables, plots and ratios in hepato.bench.report."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import asdict
from typing import Any

import httpx

from hepato.bench import cpu, detect, load, report
from hepato.bench.bare import BareRun, bare_throughput, bracketed
from hepato.bench.options import NULL_MODEL, BenchOptions
from hepato.bench.registry import variant_name, write_models_dir
from hepato.bench.stack import BenchStack
from hepato.common import cpus
from hepato.common.exceptions import BenchFailed
from hepato.common.settings import Settings

Work = Coroutine[Any, Any, None]


class Bench:
    def __init__(self, opts: BenchOptions, stack: BenchStack, settings: Settings) -> None:
        self.opts = opts
        self.stack = stack
        self.settings = settings
        self.images = load.load_images(opts.samples)
        self.served = 0  # images sent so far, so every upload has its own name

    # --- plumbing -------------------------------------------------------------
    def _next(self, count: int) -> list[load.Image]:
        images = load.cycle(self.images, count, self.served)
        self.served += count
        return images

    def measure(
        self, scenario: str, what: str, work: Callable[[load.Recorder], Work]
    ) -> load.Recorder:
        """Run ``work`` under the scenario's timeout while watching every process; a
        death or a timeout ends the run with a message naming the scenario."""
        rec = load.Recorder()
        timeout_s = self.opts.timeout_s
        cpu_before = cpu.snapshot(self.stack.local)

        async def guarded() -> None:
            task = asyncio.create_task(work(rec))
            deadline = time.monotonic() + timeout_s
            try:
                while True:
                    remaining = max(0.0, deadline - time.monotonic())
                    done, _ = await asyncio.wait({task}, timeout=min(0.5, remaining))
                    if done:
                        task.result()
                        return
                    self.stack.check_alive(scenario)
                    if time.monotonic() >= deadline:
                        finished = rec.done + rec.failures
                        raise BenchFailed(
                            scenario,
                            f"{what}: timed out after {timeout_s:g}s with {finished} of "
                            f"{rec.expected or '?'} images finished (--timeout-s)",
                        )
            finally:
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task

        try:
            asyncio.run(guarded())
        except httpx.HTTPError as exc:
            self.stack.check_alive(scenario)  # a dead process is the better explanation
            raise BenchFailed(scenario, f"{what}: {type(exc).__name__}: {exc}") from exc
        rec.cpu_ms_per_image = cpu.spent(cpu_before, cpu.snapshot(self.stack.local), rec.done)
        return rec

    def batches(
        self,
        scenario: str,
        what: str,
        model: str,
        images: Sequence[load.Image],
        *,
        clients: int,
        chunk: int,
        wait_each: bool,
    ) -> load.Recorder:
        def work(rec: load.Recorder) -> Work:
            return load.batch_clients(
                self.stack.base_url,
                images,
                model,
                concurrency=clients,
                chunk=chunk,
                wait_each=wait_each,
                rec=rec,
                upload=self.opts.upload,
            )

        return self.measure(scenario, what, work)

    def start_workers(self, scenario: str, count: int, model: str, env: dict[str, str]) -> None:
        self.stack.start_workers(scenario, count, [model], env)
        if self.opts.warmup_images:
            warm = self._next(self.opts.warmup_images)
            self.batches(
                scenario, "warm-up", model, warm, clients=1, chunk=len(warm), wait_each=True
            )

    def flood(self, scenario: str, what: str, model: str, count: int) -> load.Recorder:
        """``count`` images as batches from ``clients`` submitters, all at once."""
        o = self.opts
        images = self._next(count)
        rec = self.batches(
            scenario, what, model, images, clients=o.clients, chunk=o.chunk, wait_each=False
        )
        base = self.stack.base_url
        self.measure(
            scenario, f"{what}: batch sizes", lambda _: load.read_model_batch_sizes(base, rec)
        )
        return rec

    def drain(
        self,
        scenario: str,
        what: str,
        model: str,
        workers: int,
        env: dict[str, str],
        count: int,
    ) -> load.Recorder:
        """``count`` images queued with no worker running, then drained by fresh workers
        (no warm-up: it would queue behind them); timed by the jobs' own timelines."""
        self.stack.stop_workers()
        images, base, chunk, upload = (
            self._next(count),
            self.stack.base_url,
            self.opts.chunk,
            self.opts.upload,
        )
        rec = self.measure(
            scenario,
            f"{what}: queueing",
            lambda r: load.submit_only(base, images, model, chunk=chunk, rec=r, upload=upload),
        )
        self.stack.start_workers(scenario, workers, [model], env)
        # From the workers' readiness on (their model loading is not the drain's cost).
        before = cpu.snapshot(self.stack.local)
        self.measure(scenario, what, lambda _: load.drained(base, rec))
        rec.cpu_ms_per_image = cpu.spent(before, cpu.snapshot(self.stack.local), rec.done)
        self.stack.stop_workers()
        return rec

    def bare(self, scenario: str, model: str, size: int, batch: int, processes: int) -> BareRun:
        return bare_throughput(
            scenario,
            self.stack.models_dir,
            model,
            size,
            batch=batch,
            processes=processes,
            device=self.settings.device,
            threads=cpus.share(processes),
            seconds=self.opts.bare_seconds,
            samples=self.opts.samples,
            timeout_s=self.opts.timeout_s,
        )

    # --- scenarios ------------------------------------------------------------------
    def load_sweep(self) -> dict[str, Any]:
        o, scenario = self.opts, "load"
        threads = cpus.share(o.load_workers)
        self.start_workers(scenario, o.load_workers, o.model, {"HEPATO_CPU_THREADS": str(threads)})
        singles = []
        for c in o.concurrency:

            def work(rec: load.Recorder, c: int = c) -> Work:
                return load.single_clients(
                    self.stack.base_url,
                    self.images,
                    o.model,
                    concurrency=c,
                    seconds=o.sweep_seconds,
                    wait=o.wait,
                    rec=rec,
                    upload=o.upload,
                )

            rec = self.measure(scenario, f"{c} single-image clients", work)
            singles.append({"concurrency": c, **rec.summary()})
            report.progress(scenario, f"{c} clients", singles[-1])
        batches = []
        for c in o.batch_clients:
            images = self._next(c * o.batches_per_client * o.batch_images)
            what = f"{c} batch clients"
            rec = self.batches(
                scenario, what, o.model, images, clients=c, chunk=o.batch_images, wait_each=True
            )
            batches.append({"concurrency": c, "batch_images": o.batch_images, **rec.summary()})
            report.progress(scenario, what, batches[-1])
        self.stack.stop_workers()
        settings = {
            "model": o.model,
            "workers": o.load_workers,
            "cpu_threads": threads,
            "batching": "the model's manifest",
            "seconds_per_level": o.sweep_seconds,
            "wait": o.wait,
            "batches_per_client": o.batches_per_client,
        }
        return {"settings": settings, "singles": singles, "batches": batches}

    def overhead(self) -> dict[str, Any]:
        o, scenario = self.opts, "overhead"
        system = []
        for w in o.workers:
            self.start_workers(scenario, w, NULL_MODEL, {"HEPATO_CPU_THREADS": str(cpus.share(w))})
            rec = self.flood(scenario, f"null model, {w} workers", NULL_MODEL, o.overhead_images)
            system.append({"workers": w, **rec.summary()})
            report.progress(scenario, f"{w} workers", system[-1])
        # The store alone, with nothing else running.
        self.stack.stop_workers()
        images = self._next(o.overhead_images)
        store_settings = self.stack.store_settings()

        def work(rec: load.Recorder) -> Work:
            return load.object_store_alone(store_settings, images, concurrency=o.clients, rec=rec)

        store = self.measure(scenario, "object store alone", work).summary()
        report.progress(scenario, "object store alone", store)
        settings = {
            "model": NULL_MODEL,
            "images": o.overhead_images,
            "clients": o.clients,
            "images_per_request": o.chunk,
            "object_store": "one PUT and one GET per image, minio client, same clients",
        }
        return {"settings": settings, "system": system, "object_store": store}

    def efficiency(self) -> dict[str, Any]:
        o, scenario = self.opts, "efficiency"
        w, batch = o.efficiency_workers, o.efficiency_batch
        env = {"HEPATO_CPU_THREADS": str(cpus.share(w)), "HEPATO_MAX_BATCH_SIZE": str(batch)}
        runs = []
        for size in o.input_sizes:
            name = variant_name(o.model, size)
            self.start_workers(scenario, w, name, env)
            # The bare model before and after both runs (hepato.bench.bare.bracketed).
            before = self.bare(scenario, name, size, batch, w).summary()
            rec = self.flood(scenario, f"{name}, whole stack", name, o.efficiency_images)
            drain = self.drain(
                scenario, f"{name}, queue filled first", name, w, env, o.efficiency_images
            )
            bare = bracketed(before, self.bare(scenario, name, size, batch, w).summary())
            e2e = rec.summary()
            runs.append({"input_size": size, "e2e": e2e, "drain": drain.summary(), "bare": bare})
            report.progress(scenario, f"{size} px", e2e, bare["images_per_s"])
            report.drift(scenario, f"{size} px", bare)
            report.progress(scenario, f"{size} px, workers alone", drain.summary())
        settings = {
            "model": o.model,
            "batch": batch,
            "workers": w,
            "cpu_threads": cpus.share(w),
            "images": o.efficiency_images,
            "clients": o.clients,
            "images_per_request": o.chunk,
            "upload": o.upload,
            "bare_seconds": o.bare_seconds,
        }
        return {"settings": settings, "runs": runs}

    def _study(
        self, scenario: str, model: str, batch: int, wait_ms: float, count: int
    ) -> dict[str, Any]:
        env = {
            "HEPATO_CPU_THREADS": str(cpus.share(1)),
            "HEPATO_MAX_BATCH_SIZE": str(batch),
            "HEPATO_MAX_WAIT_MS": str(wait_ms),
        }
        self.start_workers(scenario, 1, model, env)
        what = f"{model}, batch {batch}, wait {wait_ms:g} ms"
        row: dict[str, Any] = {"max_batch_size": batch, "max_wait_ms": wait_ms}
        row.update(self.flood(scenario, what, model, count).summary())
        report.progress(scenario, what, row)
        return row

    def batching(self) -> dict[str, Any]:
        o, scenario = self.opts, "batching"
        null = [
            self._study(scenario, NULL_MODEL, b, wait_ms, o.study_images)
            for b in o.study_batches
            for wait_ms in o.study_waits_ms
        ]
        # The workers' own per-job cost, with no uploads sharing the machine.
        null_alone = []
        for b in o.study_batches:
            env = {
                "HEPATO_CPU_THREADS": str(cpus.share(1)),
                "HEPATO_MAX_BATCH_SIZE": str(b),
                "HEPATO_MAX_WAIT_MS": str(o.model_wait_ms),
            }
            what = f"null, batch {b}, wait {o.model_wait_ms:g} ms, workers alone"
            rec = self.drain(scenario, what, NULL_MODEL, 1, env, o.study_images)
            row: dict[str, Any] = {"max_batch_size": b, "max_wait_ms": o.model_wait_ms}
            row.update(rec.summary())
            report.progress(scenario, what, row)
            null_alone.append(row)
        name = variant_name(o.model, o.model_input_size)
        model = [
            self._study(scenario, name, b, o.model_wait_ms, o.model_study_images)
            for b in o.model_batches
        ]
        self.stack.stop_workers()
        size = o.model_input_size
        bare = [self.bare(scenario, name, size, b, 1).summary() for b in o.model_batches]
        settings = {
            "workers": 1,
            "cpu_threads": cpus.share(1),
            "null_images": o.study_images,
            "model": name,
            "model_input_size": size,
            "model_images": o.model_study_images,
            "clients": o.clients,
            "images_per_request": o.chunk,
        }
        return {
            "settings": settings,
            "null": null,
            "null_workers_alone": null_alone,
            "model": model,
            "bare": bare,
        }


def run_bench(opts: BenchOptions, settings: Settings, argv: list[str]) -> dict[str, Any]:
    """Start the stack, run the chosen scenarios, stop everything; write and return the
    report. A failure still stops every process and names its scenario."""
    opts.out.mkdir(parents=True, exist_ok=True)
    # Beside the report, so what was served can be read after the run.
    models_dir = opts.out / "models"
    stack = BenchStack(settings.data_dir / "bench-stack", models_dir)
    result: dict[str, Any] = {
        "command": argv,
        "started_at": report.now(),
        "machine": report.machine_info(settings.device),
        "options": {k: report.plain(v) for k, v in asdict(opts).items()},
        "scenarios": {},
    }
    runs: dict[str, Callable[[Bench], dict[str, Any]]] = {
        "load": Bench.load_sweep,
        "overhead": Bench.overhead,
        "efficiency": Bench.efficiency,
        "batching": Bench.batching,
        "realtime": detect.run,
    }
    try:
        write_models_dir(settings, opts, models_dir)
        with report.status("starting Postgres, Redis, SeaweedFS and the gateway..."):
            stack.start()
        bench = Bench(opts, stack, settings)
        for name in opts.only:
            report.heading(name)
            started = time.perf_counter()
            found = runs[name](bench)
            found["seconds"] = round(time.perf_counter() - started, 1)
            found["ratios"] = report.ratios(name, found)
            result["scenarios"][name] = found
            report.table(name, found)
    except BenchFailed as exc:
        # What was measured before the failure is kept, with the failure beside it.
        result["error"] = str(exc)
        raise
    finally:
        with report.status("stopping every process the bench started..."):
            stack.stop()
        result["finished_at"] = report.now()
        result["targets"] = report.targets(result["scenarios"])
        report.write(result, opts.out)
    return result
