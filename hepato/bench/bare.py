"""The bare model as the end-to-end runs use it: as many processes as workers, each with
the workers' CPU threads, all measuring at once, each calling ``predict`` on microbatches
of one size (hepato.bench.models.measure). Processes are spawned, never forked, so no runtime
state crosses into them."""

from __future__ import annotations

import multiprocessing as mp
import queue
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hepato.common.exceptions import BenchFailed


@dataclass(frozen=True)
class BareRun:
    model: str
    input_size: int
    batch: int
    processes: int
    threads: int
    images_per_s: float  # all processes together
    per_process: list[float]

    def summary(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "input_size": self.input_size,
            "batch": self.batch,
            "processes": self.processes,
            "threads": self.threads,
            "images_per_s": round(self.images_per_s, 3),
            "per_process_images_per_s": [round(v, 3) for v in self.per_process],
        }


def _measure_in_child(
    models_dir: str,
    name: str,
    batch: int,
    device: str,
    threads: int,
    seconds: float,
    samples: str,
    start: Any,  # a multiprocessing Barrier
    results: Any,  # a multiprocessing Queue
) -> None:
    try:
        from hepato.bench.models import measure, sample_images
        from hepato.common.manifest import load_registry
        from hepato.worker.backends.base import Runtime, load_model

        manifest = load_registry(Path(models_dir))[name]
        model = load_model(manifest, Runtime(device=device, threads=threads))
        images = sample_images(Path(samples))
        inputs = [images[i % len(images)] for i in range(batch)]
        model.predict(inputs)  # warm-up before the common start
        start.wait(timeout=300)
        m = measure(model, images, batch, min_seconds=seconds, min_calls=3)
        results.put(("ok", m.images_per_s))
    except BaseException as exc:
        results.put(("error", f"{type(exc).__name__}: {exc}"))
        start.abort()


def bare_throughput(
    scenario: str,
    models_dir: Path,
    model: str,
    input_size: int,
    *,
    batch: int,
    processes: int,
    device: str,
    threads: int,
    seconds: float,
    samples: Path,
    timeout_s: float,
) -> BareRun:
    """Images/s of ``processes`` copies of the bare model measuring side by side."""
    ctx = mp.get_context("spawn")
    start = ctx.Barrier(processes)
    results = ctx.Queue()
    args = (str(models_dir), model, batch, device, threads, seconds, str(samples), start, results)
    procs = [
        ctx.Process(target=_measure_in_child, args=args, daemon=True) for _ in range(processes)
    ]
    for p in procs:
        p.start()
    found: list[float] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(found) < processes:
            try:
                status, value = results.get(timeout=1.0)
            except queue.Empty:
                # A child killed outright (out of memory) never reports; nor does a hang.
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise BenchFailed(
                        scenario, f"bare model {model}: a process exited with code {dead[0]}"
                    ) from None
                if time.monotonic() > deadline:
                    raise BenchFailed(
                        scenario, f"bare model {model} gave no figure within {timeout_s:.0f}s"
                    ) from None
                continue
            if status != "ok":
                raise BenchFailed(scenario, f"bare model {model} failed: {value}")
            found.append(float(value))
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    return BareRun(model, input_size, batch, processes, threads, sum(found), found)
