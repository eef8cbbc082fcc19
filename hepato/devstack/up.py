"""``hepato up``: the one-command local stack and its main job on the sample images, then
on one small synthetic whole slide (hepato.devstack.sample_slide)."""

from __future__ import annotations

import os
import signal
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import redis
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from hepato.common import cpus
from hepato.common.constants import WORKER_KEY_PATTERN
from hepato.common.images import MIME_TYPES, sniff_format
from hepato.common.migrate import run_migrations
from hepato.common.settings import get_settings
from hepato.devstack.localstack import LocalStack
from hepato.devstack.sample_slide import run_slide_job
from hepato.devstack.supervise import Supervisor

# Piped output gets a table wide enough for its links instead of 80 columns.
console = Console(width=None if sys.stdout.isatty() else 160)
TERMINAL_BATCH = ("done", "done_with_failures")


def sample_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and sniff_format(p.read_bytes()[:16]))
    if not files:
        raise SystemExit(f"no images in {folder}")
    return files


def run_stack(
    *,
    workers: int,
    port: int,
    samples: Path,
    repeat: int,
    keep_running: bool,
    slide: bool = True,
) -> int:
    settings = get_settings()
    stack = LocalStack(settings.data_dir / "stack")
    console.print(f"[bold]HepatoAI[/] local stack, data in {stack.root}")
    supervisor: Supervisor | None = None
    try:
        with console.status("starting Postgres, Redis and SeaweedFS S3..."):
            stack.start()
        # A local demo stack: no API keys, every request is the tenant "public".
        env = {**os.environ, **stack.env(), "HEPATO_PORT": str(port), "HEPATO_AUTH": "open"}
        # Workers on one CPU share its cores rather than each taking all of them.
        share = str(cpus.share(workers))
        env.setdefault("HEPATO_CPU_THREADS", share)
        env.setdefault("HEPATO_DECODE_PROCESSES", share)
        run_migrations(stack.database_url)
        base = f"http://127.0.0.1:{port}"
        stack.spawn("gateway", [sys.executable, "-m", "hepato", "gateway"], env)
        # One /metrics port per worker: they share this host.
        metrics_port = settings.worker_metrics_port
        for i in range(workers):
            port_env = {"HEPATO_WORKER_METRICS_PORT": str(metrics_port + i if metrics_port else 0)}
            stack.spawn(
                f"worker-{i}", [sys.executable, "-m", "hepato", "worker"], {**env, **port_env}
            )
        with console.status(f"waiting for the gateway at {base} and {workers} worker(s)..."):
            _wait_ready(base, stack, workers)
        console.print(f"gateway ready at {base} (API docs: {base}/docs); logs in {stack.root}/logs")
        if metrics_port:
            console.print(
                f"metrics: {base}/metrics, workers on 127.0.0.1 ports "
                f"{metrics_port}-{metrics_port + workers - 1} (/metrics)"
            )
        console.print(
            f"[bold red]auth is OFF (HEPATO_AUTH=open): anyone who can reach {base} can read, "
            "submit and cancel every job[/]; run `hepato gateway` with API keys "
            "(`hepato keys create TENANT`) anywhere else"
        )
        # From here on a dead gateway or worker is started again, as compose would.
        supervisor = Supervisor(stack, lambda line: console.print(f"[yellow]{line}[/]")).start()
        code = _main_job(base, sample_files(samples), repeat, workers, supervisor)
        if code == 0 and slide:
            code = run_slide_job(base, stack.root, console)
        if keep_running and supervisor.fatal is None:
            console.print("[bold green]stack is running[/]; press Ctrl-C to stop it")
            stopped = threading.Event()
            signal.signal(signal.SIGTERM, lambda *_: stopped.set())
            try:
                while not stopped.wait(1.0):
                    if supervisor.fatal:
                        return 1
            except KeyboardInterrupt:
                pass
        return code
    finally:
        if supervisor is not None:
            supervisor.stop()
        with console.status("stopping every process the stack started..."):
            stack.stop()
        console.print("stack stopped")


def _wait_ready(base: str, stack: LocalStack, workers: int, timeout_s: float = 180.0) -> None:
    """Until the gateway is ready and every worker has loaded its model, so the run's
    figures measure serving, not start-up."""
    client = redis.Redis.from_url(stack.redis_url)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for name, proc in stack.apps:
            if proc.poll() is not None:
                raise SystemExit(f"{name} exited with {proc.returncode}; see {stack.root}/logs")
        try:
            ready = httpx.get(f"{base}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            ready = False
        if ready and len(list(client.scan_iter(WORKER_KEY_PATTERN))) >= workers:
            return
        time.sleep(0.3)
    raise SystemExit(f"gateway not ready after {timeout_s:.0f}s")


def _main_job(
    base: str, files: list[Path], repeat: int, workers: int, supervisor: Supervisor
) -> int:
    payload = [
        ("files", (p.name, p.read_bytes(), MIME_TYPES[sniff_format(p.read_bytes()) or "png"]))
        for _ in range(repeat)
        for p in files
    ]
    with httpx.Client(base_url=base, timeout=120) as client:
        started = time.perf_counter()
        response = client.post("/v1/batches", files=payload)
        if response.status_code != 202:
            console.print(f"[red]submission refused: {response.status_code} {response.text}")
            return 1
        accepted = response.json()
        for bad in accepted["rejected"]:
            console.print(f"[yellow]rejected {bad['filename']}: {bad['error']}")
        total = accepted["accepted"]
        status_url = accepted["status_url"]
        console.print(f"batch {accepted['batch_id']}: {total} images, {status_url}")
        with Progress(
            TextColumn("[bold]detecting"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[counts]}"),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            task = progress.add_task("batch", total=total, counts="")
            while True:
                if supervisor.fatal:
                    console.print(f"[red]{supervisor.fatal}; the batch cannot finish")
                    return 1
                try:
                    batch = client.get(status_url, params={"page_size": 1}).json()
                except httpx.TransportError:
                    # The gateway died and is being restarted; the jobs are in Postgres.
                    time.sleep(0.5)
                    continue
                counts = batch["counts"]
                finished = sum(n for s, n in counts.items() if s not in ("pending", "processing"))
                shown = " ".join(f"{s}={n}" for s, n in counts.items() if n)
                progress.update(task, completed=finished, counts=shown)
                if batch["state"] in TERMINAL_BATCH:
                    break
                time.sleep(0.2)
        elapsed = time.perf_counter() - started
        jobs = _all_jobs(client, status_url)
    _print_results(jobs, repeat)
    sizes = [j["batch_size"] for j in jobs if j["batch_size"]]
    console.print(
        f"[bold]{len(jobs)} images in {elapsed:.2f}s = {len(jobs) / elapsed:.2f} images/s end to "
        f"end[/] with {workers} worker(s); average batch size "
        f"{statistics.mean(sizes) if sizes else 0:.2f}; batch state {batch['state']}"
    )
    return 0 if batch["state"] == "done" else 1


def _all_jobs(client: httpx.Client, status_url: str) -> list[dict]:
    jobs: list[dict] = []
    url: str | None = status_url + "?page_size=1000"
    while url:
        page = client.get(url).json()
        jobs.extend(page["jobs"])
        url = page["next_page_url"]
    return jobs


def _print_results(jobs: list[dict], repeat: int) -> None:
    # With --repeat the same images went through several times; show each image once.
    if repeat > 1:
        jobs = list({j["filename"]: j for j in jobs}.values())
    shown = sorted(jobs, key=lambda j: j["filename"])
    table = Table(title="Detections per image (demo model, not for clinical use)")
    for col in ("image", "state", "batch", "detections", "per class", "best score", "inspect"):
        table.add_column(col, overflow="fold")
    for job in shown:
        dets = (job["result"] or {}).get("boxes", [])
        per_class = Counter(d["label"] for d in dets)
        best = max((d["score"] for d in dets), default=None)
        table.add_row(
            job["filename"],
            job["state"] if not job["error"] else f"{job['state']}: {job['error']}",
            str(job["batch_size"] or "-"),
            str(len(dets)),
            ", ".join(f"{k} {v}" for k, v in sorted(per_class.items())) or "-",
            f"{best:.2f}" if best is not None else "-",
            job["status_url"],
        )
    console.print(table)
    console.print("each job's image is at <status URL>/image; the batch at its status URL")
