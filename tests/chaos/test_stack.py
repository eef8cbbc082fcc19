"""Chaos, the local stack (issue 12, item 9): ``hepato up`` run as a newcomer runs it,
its only worker SIGKILLed in the middle of the main job and again while the stack idles.
The supervisor starts the worker again (and says so), the gateway keeps answering, and
every job ends done: the dead worker's claimed jobs once their leases run out."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from hepato.common.settings import Settings
from hepato.devstack.localstack import free_port
from tests.chaos.conftest import ledger, record, verdict, wait_for
from tests.conftest import REPO, SAMPLES
from tests.e2e.test_pipeline import db_jobs

pytestmark = pytest.mark.slow

# Short leases so the dead worker's jobs come back within the test (the defaults are for
# production: a 60 s lease).
FAST_RECOVERY = {
    "HEPATO_LEASE_S": "4",
    "HEPATO_LEASE_EXTEND_EVERY_S": "1",
    "HEPATO_SWEEP_INTERVAL_S": "0.5",
    "HEPATO_REQUEUE_PENDING_AFTER_S": "3",
    "HEPATO_WORKER_METRICS_PORT": "0",
}


class Console:
    """The ``hepato up`` process's stdout, line by line, read by a thread."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._new: queue.Queue[str] = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def text(self) -> str:
        return "\n".join(self.lines)

    def find(self, pattern: str) -> list[re.Match[str]]:
        return [m for line in list(self.lines) if (m := re.search(pattern, line))]


def _interruptible() -> None:
    """In the child before exec: Ctrl-C's default action. A test run started in the
    background by a non-interactive shell (``./.ci/run &``) ignores SIGINT, children
    inherit that, and Python then never turns SIGINT into KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # Not pytest's tmp_path: embedded Postgres runs as its own user (see test_up.py).
    with tempfile.TemporaryDirectory(prefix="hepato-up-chaos-") as root:
        yield Path(root)


def workers_of(up: subprocess.Popen[str]) -> list[psutil.Process]:
    found = []
    for child in psutil.Process(up.pid).children():
        try:
            if child.cmdline()[-2:] == ["hepato", "worker"]:
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


def one_worker(up: subprocess.Popen[str], other_than: int | None = None) -> psutil.Process:
    def live() -> psutil.Process | None:
        assert up.poll() is None, "hepato up exited"
        alive = [w for w in workers_of(up) if w.pid != other_than and w.is_running()]
        return alive[0] if len(alive) == 1 else None

    found: psutil.Process = wait_for("the stack's worker", live, 120, 0.1)
    return found


def test_a_killed_worker_is_restarted_and_its_jobs_finish(data_dir: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        **FAST_RECOVERY,
        "HEPATO_DATA_DIR": str(data_dir),
        "HEPATO_S3_BUCKET": "hepato",
    }
    repeat = 8  # 13 sample images each time: enough work for the kill to land mid-run
    cmd = [sys.executable, "-m", "hepato", "up", "--workers", "1", "--port", str(port)]
    cmd += ["--samples", str(SAMPLES), "--repeat", str(repeat), "--keep-running", "--no-slide"]
    up = subprocess.Popen(
        cmd,
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=_interruptible,
    )
    console = Console(up)
    try:
        _run(up, console, base, repeat, data_dir)
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGINT)  # Ctrl-C: the stack stops everything it started
            try:
                up.wait(timeout=90)
            except subprocess.TimeoutExpired:
                up.kill()
    print(console.text())
    assert "stack stopped" in console.text()
    left = [
        p.info["cmdline"]
        for p in psutil.process_iter(["cmdline"])
        if str(data_dir) in " ".join(p.info["cmdline"] or [])
    ]
    assert not left, f"processes left behind: {left}"


def _run(
    up: subprocess.Popen[str], console: Console, base: str, repeat: int, data_dir: Path
) -> None:
    first = one_worker(up)
    # The completion ledger goes in before the main job is submitted (the worker loads
    # its model first), so it sees every write that sets a job done.
    settings = Settings(database_url=first.environ()["HEPATO_DATABASE_URL"])
    with ledger(settings) as read:
        assert not console.find(r"^batch "), "the ledger came too late"
        started = wait_for("the main job", lambda: console.find(r"^batch (\S+): (\d+) images"), 180)
        total = int(started[0].group(2))
        status_url = f"{base}/v1/batches/{started[0].group(1)}"

        # SIGKILL while the worker holds claimed jobs, some already done.
        def mid_run() -> dict[str, int] | None:
            counts: dict[str, int] = httpx.get(status_url, timeout=5).json()["counts"]
            return counts if counts["processing"] and counts["done"] >= 8 else None

        at_kill = wait_for("the worker mid-run", mid_run, 120, 0.02)
        first.send_signal(signal.SIGKILL)
        held = _held_by_dead(settings, first.pid)
        wait_for("the restart", lambda: console.find(r"worker-0 restarted \(pid (\d+)"), 30)
        assert console.find(r"worker-0 exited \(-9\).*restarting it in"), console.text()
        # The gateway served throughout.
        assert httpx.get(f"{base}/healthz", timeout=5).status_code == 200

        wait_for("the main job's end", lambda: "batch state done" in console.text(), 180, 0.2)
        wait_for("the idle stack", lambda: "stack is running" in console.text(), 30, 0.1)

        # A second death, with the stack idle, then more work.
        second = one_worker(up, other_than=first.pid)
        second.send_signal(signal.SIGKILL)
        wait_for("the second restart", lambda: len(console.find(r"worker-0 restarted")) >= 2, 60)
        more = _submit(base, 16)
        assert up.poll() is None, console.text()

        def all_done() -> bool:
            states = [j["state"] for j in _jobs(base, more["status_url"])]
            return states.count("done") == len(states)

        wait_for("the later jobs", all_done, 120, 0.2)
        accepted = [j.id for j in db_jobs(settings)]
        result = verdict(settings, accepted, read())

    redelivered = [j for j in result.jobs.values() if j.attempts > 1]
    record(
        "`hepato up`: its only worker SIGKILLed mid-run and again idle; restarted by the "
        "supervisor",
        len(accepted),
        len(held),
        len(result.lost),
        len(result.duplicated),
        len(redelivered),
        counts_at_kill=at_kill,
    )
    assert len(accepted) == total + 16 == repeat * 13 + 16
    assert result.lost == [] and result.duplicated == []
    assert all(j.state == "done" for j in result.jobs.values())
    # The jobs the dead worker held finished elsewhere: on the worker started in its place.
    assert held, "the SIGKILL found the worker holding jobs"
    for job_id in held:
        job = result.jobs[job_id]
        assert job.attempts == 2 and job.worker_id != f"{_host()}:{first.pid}", job


def _host() -> str:
    return socket.gethostname()


def _held_by_dead(settings: Settings, pid: int) -> list[uuid.UUID]:
    return [
        j.id
        for j in db_jobs(settings)
        if j.state == "processing" and (j.worker_id or "").endswith(f":{pid}")
    ]


def _submit(base: str, n: int) -> dict:  # type: ignore[type-arg]
    path = SAMPLES / "synthetic_00.png"
    files = [("files", (f"late-{i}.png", path.read_bytes(), "image/png")) for i in range(n)]
    response = httpx.post(f"{base}/v1/batches", files=files, timeout=60)
    assert response.status_code == 202, response.text
    return response.json()  # type: ignore[no-any-return]


def _jobs(base: str, status_url: str) -> list[dict]:  # type: ignore[type-arg]
    url = status_url if status_url.startswith("http") else base + status_url
    page = httpx.get(url, params={"page_size": 1000}, timeout=10).json()
    return page["jobs"]  # type: ignore[no-any-return]
