"""The one-command local stack, as a newcomer runs it."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from hepato.devstack.localstack import free_port
from tests.conftest import SAMPLES

pytestmark = pytest.mark.slow


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # Not pytest's tmp_path: embedded Postgres runs as its own user, and another pytest
    # session resets pytest's base directory to 0700, locking that user out.
    with tempfile.TemporaryDirectory(prefix="hepato-up-") as root:
        yield Path(root)


def test_up_runs_the_samples_and_stops_everything(data_dir: Path) -> None:
    tmp_path = data_dir
    port = free_port()
    env = {**os.environ, "HEPATO_DATA_DIR": str(tmp_path), "HEPATO_S3_BUCKET": "hepato"}
    cmd = [
        sys.executable,
        "-m",
        "hepato",
        "up",
        "--workers",
        "2",
        "--port",
        str(port),
        "--samples",
        str(SAMPLES),
        "--no-keep-running",
    ]
    for run in range(2):  # the second run reuses the data directory
        # The synthetic slide once: its path is tested in depth by tests/e2e/test_slides.py.
        args = cmd if run == 0 else [*cmd, "--no-slide"]
        result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=420)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "images/s end to end with 2 worker(s)" in result.stdout
        assert "batch state done" in result.stdout
        assert "ihc_colon.png" in result.stdout
        if run == 0:
            assert "sample-slide.svs" in result.stdout
            assert ": done (sample-slide.svs, aperio-svs" in result.stdout
            assert "steatosis band (NASH CRN)" in result.stdout
            assert "/export?format=geojson" in result.stdout
        assert "stack stopped" in result.stdout
        left = [
            p.info["cmdline"]
            for p in psutil.process_iter(["cmdline"])
            if str(tmp_path) in " ".join(p.info["cmdline"] or [])
        ]
        assert not left, f"run {run}: processes left behind: {left}"
