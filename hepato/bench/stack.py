"""The processes of ``hepato bench e2e``: one local stack (Postgres, Redis, S3, gateway)
for the whole run, and workers restarted with each scenario's settings.

Only process management lives here; what is measured is in hepato.bench.load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx
import redis

from hepato.common import cpus
from hepato.common.constants import worker_key
from hepato.common.exceptions import BenchFailed
from hepato.common.migrate import run_migrations
from hepato.common.settings import Settings
from hepato.devstack.localstack import LocalStack, free_port


class BenchStack:
    """A LocalStack with a gateway serving ``models_dir`` and a replaceable set of
    workers. ``stop`` stops every process it started, whatever state it is in."""

    def __init__(self, root: Path, models_dir: Path, *, ready_timeout_s: float = 180.0) -> None:
        self.local = LocalStack(root)
        self.models_dir = models_dir
        self.ready_timeout_s = ready_timeout_s
        self.port = 0
        self.workers: list[tuple[str, subprocess.Popen]] = []
        self._env: dict[str, str] = {}

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def logs(self) -> Path:
        return self.local.root / "logs"

    def store_settings(self) -> Settings:
        """Settings that reach this stack's object store (for the store-alone baseline)."""
        return Settings(
            s3_endpoint=self.local.s3_endpoint,
            s3_access_key=self.local.s3_access_key,
            s3_secret_key=self.local.s3_secret_key,
            s3_secure=False,
        )

    def start(self) -> None:
        try:
            self.local.start()
        except (RuntimeError, TimeoutError) as exc:
            raise BenchFailed("start-up", f"{exc}; logs under {self.local.root}") from exc
        run_migrations(self.local.database_url)
        self.port = free_port()
        # The bench's own stack: no API keys, every request is the tenant "public".
        self._env = {
            **os.environ,
            **self.local.env(),
            "HEPATO_AUTH": "open",
            "HEPATO_PORT": str(self.port),
            "HEPATO_MODELS_DIR": str(self.models_dir),
        }
        self.local.spawn("gateway", [sys.executable, "-m", "hepato", "gateway"], self._env)
        self._wait_gateway()

    def _wait_gateway(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            self.check_alive("start-up")
            try:
                if httpx.get(f"{self.base_url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise BenchFailed("start-up", f"gateway not ready after {self.ready_timeout_s:.0f}s")

    def start_workers(
        self, scenario: str, count: int, models: Sequence[str], overrides: Mapping[str, str]
    ) -> None:
        """Replace the running workers with ``count`` new ones serving ``models`` with the
        HEPATO_* ``overrides``; return once every one has loaded its models."""
        self.stop_workers()
        run = uuid.uuid4().hex[:6]
        ids = []
        for i in range(count):
            worker_id = f"bench-{scenario}-{run}-{i}"
            env = {
                **self._env,
                # Several workers on one host: no fixed metrics port to collide on, and
                # decoder processes that share the cores rather than each taking all.
                "HEPATO_WORKER_METRICS_PORT": "0",
                "HEPATO_DECODE_PROCESSES": str(cpus.share(count)),
                **overrides,
                "HEPATO_WORKER_MODELS": json.dumps(list(models)),
                "HEPATO_WORKER_ID": worker_id,
            }
            proc = self.local.spawn(f"worker-{i}", [sys.executable, "-m", "hepato", "worker"], env)
            self.workers.append((worker_id, proc))
            ids.append(worker_id)
        self._wait_heartbeats(scenario, ids)

    def _wait_heartbeats(self, scenario: str, ids: list[str]) -> None:
        client = redis.Redis.from_url(self.local.redis_url)
        deadline = time.monotonic() + self.ready_timeout_s
        try:
            while time.monotonic() < deadline:
                self.check_alive(scenario)
                if all(client.exists(worker_key(i)) for i in ids):
                    return
                time.sleep(0.2)
        finally:
            client.close()
        raise BenchFailed(
            scenario, f"workers not ready after {self.ready_timeout_s:.0f}s; see {self.logs}"
        )

    def stop_workers(self, timeout_s: float = 30.0) -> None:
        """SIGTERM every worker (each finishes its batch in hand), then wait; kill what
        is left after ``timeout_s``."""
        procs = [p for _, p in self.workers]
        for p in procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + timeout_s
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.local.apps[:] = [(n, p) for n, p in self.local.apps if p not in procs]
        self.workers.clear()

    def check_alive(self, scenario: str) -> None:
        """Raise, naming the scenario and the process, if the gateway or a worker died."""
        for name, proc in self.local.apps:
            if proc.poll() is not None:
                raise BenchFailed(
                    scenario,
                    f"{name} exited with code {proc.returncode}; its log is in {self.logs}",
                )

    def stop(self) -> None:
        self.workers.clear()
        self.local.stop()
