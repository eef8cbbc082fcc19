"""A real Triton Inference Server for the tests and `hepato bench models --triton`:
scripts/triton_serve.py in .venv-triton (PyTriton needs numpy<2; ``./dev triton-venv``
makes the venv), serving a repository written by `hepato models export --to triton` on
free ports, as a child process group of its own."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Literal

from hepato.common.settings import REPO_ROOT
from hepato.devstack.localstack import free_port

log = logging.getLogger(__name__)

TRITON_VENV = Path(os.environ.get("HEPATO_TRITON_VENV", REPO_ROOT / ".venv-triton"))
SERVE_SCRIPT = REPO_ROOT / "scripts" / "triton_serve.py"


def triton_python() -> Path:
    """.venv-triton's interpreter, the venv made or brought up to date first by the same
    function ``./dev test`` calls (a stamp makes a second call a no-op)."""
    dev = REPO_ROOT / "dev"
    if not dev.exists() or not SERVE_SCRIPT.exists():
        raise FileNotFoundError(f"no ./dev or {SERVE_SCRIPT}: a Triton server needs a checkout")
    subprocess.run(
        [str(dev), "triton-venv"],
        check=True,
        env={**os.environ, "HEPATO_TRITON_VENV": str(TRITON_VENV)},
        stdout=subprocess.DEVNULL,
    )
    return TRITON_VENV / "bin" / "python"


class TritonServer:
    """``with TritonServer(repository) as server:`` Triton serving every model of the
    repository, ready on gRPC and HTTP; stopped, with its stubs, on exit."""

    def __init__(
        self,
        repository: Path,
        *,
        threads: int = 0,
        log_path: Path | None = None,
        ready_timeout_s: float = 180.0,
    ) -> None:
        self.repository = repository
        self.models = sorted(p.parent.name for p in repository.glob("*/config.pbtxt"))
        self.threads = threads
        self.log_path = log_path or repository.parent / "triton-serve.log"
        self.ready_timeout_s = ready_timeout_s
        self.grpc_port = self.http_port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, protocol: Literal["grpc", "http"]) -> str:
        return f"127.0.0.1:{self.grpc_port if protocol == 'grpc' else self.http_port}"

    def start(self) -> TritonServer:
        python = triton_python()
        if not self.grpc_port:  # a restart keeps its ports, as a restarted Triton would
            self.grpc_port, self.http_port = free_port(), free_port()
        cmd = [str(python), str(SERVE_SCRIPT), str(self.repository)]
        cmd += ["--grpc-port", str(self.grpc_port), "--http-port", str(self.http_port)]
        cmd += ["--threads", str(self.threads)]
        with self.log_path.open("ab") as out:
            # A group of its own: tritonserver and its Python stubs go with the script.
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        log.info("Triton serving %s on %s", self.models, self.url("grpc"))
        return self

    def _wait_ready(self) -> None:
        import tritonclient.http as http

        assert self.proc is not None
        client = http.InferenceServerClient(self.url("http"), connection_timeout=5.0)
        deadline = time.monotonic() + self.ready_timeout_s
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"Triton server exited with code {self.proc.returncode}; see "
                        f"{self.log_path}"
                    )
                with contextlib.suppress(Exception):
                    if client.is_server_ready() and all(
                        client.is_model_ready(m) for m in self.models
                    ):
                        return
                time.sleep(0.2)
        finally:
            client.close()
        raise TimeoutError(
            f"Triton not ready after {self.ready_timeout_s:.0f}s; see {self.log_path}"
        )

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM to the script (PyTriton stops the server), then SIGKILL whatever of
        its group is left."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("Triton server killed after %.0fs", timeout_s)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
