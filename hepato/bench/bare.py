"""The bare model as the end-to-end runs use it: as many processes as workers, each with
the workers' CPU threads, all measuring at once, each calling ``predict`` on microbatches
of one size (hepato.bench.models.measure); and, for the real-time path, one process timing
each call of batch 1 (``bare_realtime``). Every child also reads its own CPU time
(``time.process_time``, all its threads) around what it measures: the model's CPU per
image, which the stack's CPU per image is set against. Processes are spawned, never
forked, so no runtime state crosses into them."""

from __future__ import annotations

import multiprocessing as mp
import queue
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hepato.common import cpus
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
    cpu_ms_per_image: float | None = None  # all processes' CPU over all their images

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model": self.model,
            "input_size": self.input_size,
            "batch": self.batch,
            "processes": self.processes,
            "threads": self.threads,
            "images_per_s": round(self.images_per_s, 3),
            "per_process_images_per_s": [round(v, 3) for v in self.per_process],
        }
        if self.cpu_ms_per_image is not None:
            out["cpu_ms_per_image"] = round(self.cpu_ms_per_image, 3)
        return out


def _load_in_child(models_dir: str, name: str, device: str, threads: int, samples: str) -> Any:
    from hepato.bench.models import sample_images
    from hepato.common.manifest import load_registry
    from hepato.worker.backends.base import Runtime, load_model

    manifest = load_registry(Path(models_dir))[name]
    model = load_model(manifest, Runtime(device=device, threads=threads))
    return model, sample_images(Path(samples))


def _throughput(model: Any, images: Sequence[Any], batch: int, seconds: float) -> dict[str, Any]:
    """Images/s at ``batch``, and CPU ms per image: the CPU of measure's own warm-up call
    is counted with its images, so every call counted is a warmed-up one."""
    from hepato.bench.models import measure

    cpu = time.process_time()
    m = measure(model, images, batch, min_seconds=seconds, min_calls=3)
    cpu = time.process_time() - cpu
    return {
        "images_per_s": m.images_per_s,
        "cpu_s": cpu,
        "cpu_images": m.images + batch,
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
        model, images = _load_in_child(models_dir, name, device, threads, samples)
        inputs = [images[i % len(images)] for i in range(batch)]
        model.predict(inputs)  # warm-up before the common start
        start.wait(timeout=300)
        results.put(("ok", _throughput(model, images, batch, seconds)))
    except BaseException as exc:
        results.put(("error", f"{type(exc).__name__}: {exc}"))
        start.abort()


def _realtime_in_child(
    models_dir: str,
    name: str,
    batches: tuple[int, ...],
    device: str,
    threads: int,
    seconds: float,
    samples: str,
    results: Any,  # a multiprocessing Queue
    cores: frozenset[int] | None,
) -> None:
    try:
        if cores:  # before loading: the runtime's thread pool starts on them
            cpus.pin(cores)
        model, images = _load_in_child(models_dir, name, device, threads, samples)
        model.predict([images[0]])  # warm-up: lazy init, allocator, kernel selection
        latencies: list[float] = []
        cpu, started = time.process_time(), time.perf_counter()
        while len(latencies) < 3 or time.perf_counter() - started < seconds:
            image = images[len(latencies) % len(images)]
            since = time.perf_counter()
            model.predict([image])
            latencies.append((time.perf_counter() - since) * 1000.0)
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        found: dict[int, dict[str, Any]] = {
            1: {
                "latencies_ms": latencies,
                "images_per_s": len(latencies) / elapsed,
                "cpu_s": cpu,
                "cpu_images": len(latencies),
            }
        }
        found.update({b: _throughput(model, images, b, seconds) for b in batches})
        results.put(("ok", found))
    except BaseException as exc:
        results.put(("error", f"{type(exc).__name__}: {exc}"))


def _collect(
    scenario: str, model: str, procs: list[Any], results: Any, timeout_s: float
) -> list[Any]:
    """One figure from every child process; the children are gone when this returns."""
    found: list[Any] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(found) < len(procs):
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
            found.append(value)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    return found


def _cpu_ms(parts: Sequence[dict[str, Any]]) -> float | None:
    images = sum(p["cpu_images"] for p in parts)
    return 1000.0 * sum(p["cpu_s"] for p in parts) / images if images else None


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
    found = _collect(scenario, model, procs, results, timeout_s)
    speeds = [float(f["images_per_s"]) for f in found]
    return BareRun(
        model, input_size, batch, processes, threads, sum(speeds), speeds, _cpu_ms(found)
    )


def bare_realtime(
    scenario: str,
    models_dir: Path,
    model: str,
    input_size: int,
    *,
    batches: Sequence[int],
    device: str,
    threads: int,
    seconds: float,
    samples: Path,
    timeout_s: float,
    cores: frozenset[int] | None = None,
) -> dict[str, Any]:
    """One process of the bare model (on ``cores``, if given): each call of batch 1 timed
    for at least ``seconds`` (latency percentiles), then images/s at each of ``batches``;
    CPU ms per image of each. Keys: ``"batch 1"``, ``"batch 4"``, ..."""
    from hepato.bench.load import percentiles

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    wanted = tuple(b for b in dict.fromkeys(batches) if b != 1)
    args = (str(models_dir), model, wanted, device, threads, seconds, str(samples), results, cores)
    proc = ctx.Process(target=_realtime_in_child, args=args, daemon=True)
    proc.start()
    [found] = _collect(scenario, model, [proc], results, timeout_s)
    out: dict[str, Any] = {}
    for batch, m in found.items():
        row: dict[str, Any] = {
            "model": model,
            "input_size": input_size,
            "batch": batch,
            "threads": threads,
            "images_per_s": round(m["images_per_s"], 3),
            "cpu_ms_per_image": round(_cpu_ms([m]) or 0.0, 3),
        }
        if "latencies_ms" in m:
            row["latency_ms"] = percentiles(m["latencies_ms"])
        out[f"batch {batch}"] = row
    return out


def bracketed(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    """One bare-model row from two runs of it, one before and one after the measurement
    it is compared with: a shared VM's speed drifts within a run (the bare model's
    images/s moved by 10 to 25 % between runs on the 2-core bench VM), and a ratio
    against a single run taken at one end carries all of that drift. Each figure is the
    mean of the two (a latency percentile: the mean of the two runs' percentiles; the
    count summed, the max the larger); ``drift`` is after ÷ before in images/s, so a
    report shows how far the machine moved."""
    out = dict(before)
    for key in ("images_per_s", "cpu_ms_per_image"):
        if key in before and key in after:
            out[key] = round((before[key] + after[key]) / 2, 3)
    if "latency_ms" in before and "latency_ms" in after:
        a, b = before["latency_ms"], after["latency_ms"]
        both = [k for k in a if k in b]
        lat = {k: round((a[k] + b[k]) / 2, 3) for k in both}
        if "count" in lat:
            lat["count"] = a["count"] + b["count"]
        if "max" in lat:
            lat["max"] = max(a["max"], b["max"])
        out["latency_ms"] = lat
    out["images_per_s_before"] = before.get("images_per_s")
    out["images_per_s_after"] = after.get("images_per_s")
    if before.get("images_per_s") and after.get("images_per_s"):
        out["drift"] = round(after["images_per_s"] / before["images_per_s"], 3)
    return out
