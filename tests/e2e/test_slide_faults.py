"""Whole slides under faults: a worker killed in the middle of a slide loses nothing and
counts nothing twice; another tenant cannot see a slide; the finished slide's webhook is
queued in the transaction that ends its last tile."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import func, select

from hepato.common.constants import JobState
from hepato.common.db import get_engine
from hepato.common.settings import Settings
from hepato.common.tables import Job, WebhookDelivery
from tests.conftest import REPO
from tests.e2e.test_slides import assert_planted_found_once, features, submit
from tests.slides import planted


def _done_tiles(settings: Settings, slide_id: str) -> int:
    with get_engine(settings.database_url).connect() as conn:
        return int(
            conn.execute(
                select(func.count()).where(
                    Job.batch_id == slide_id, Job.kind == "tile", Job.state == JobState.done
                )
            ).scalar_one()
        )


def test_a_worker_killed_mid_slide_loses_nothing(
    slide_client: TestClient,
    slide_settings: Settings,
    run_slide_workers: Callable[..., None],
    worker_env: dict[str, str],
    tmp_path: Path,
) -> None:
    slide_id = submit(slide_client, planted.write_tiff(tmp_path / "biopsy.tiff"))
    env = {
        **worker_env,
        "HEPATO_WORKER_ID": "doomed",
        "HEPATO_SLIDE_CACHE_DIR": str(tmp_path / "doomed-cache"),
        "HEPATO_MAX_BATCH_SIZE": "2",
        "HEPATO_WORKER_METRICS_PORT": "0",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.slides.blob_worker"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while _done_tiles(slide_settings, slide_id) < 4:
            assert proc.poll() is None, "the worker died on its own"
            assert time.monotonic() < deadline, "the worker made no progress"
            time.sleep(0.1)
    finally:
        # Mid-slide, with a microbatch in its hands: no chance to finish anything.
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    slide = slide_client.get(f"/v1/slides/{slide_id}").json()
    assert slide["state"] == "processing"
    assert 0 < slide["tiles"]["done"] < slide["tiles"]["total"]

    # What the dead worker held comes back when its leases run out.
    run_slide_workers(1)
    slide = slide_client.get(f"/v1/slides/{slide_id}").json()
    assert slide["state"] == "done", slide
    assert slide["tiles"]["done"] == slide["tiles"]["total"]
    assert_planted_found_once(features(slide_client, slide_id))
    counts = {c["label"]: c["count"] for c in slide["summary"]["classes"]}
    assert sum(counts.values()) == len(planted.OBJECTS)


def test_the_finished_slide_sends_one_webhook_with_its_summary(
    slide_client: TestClient,
    slide_settings: Settings,
    run_slide_workers: Callable[..., None],
    tmp_path: Path,
) -> None:
    hooked = slide_settings.model_copy(
        update={"webhook_secret": "whsec_" + "A" * 32, "webhook_allowed_hosts": ["127.0.0.1"]}
    )
    from hepato.gateway.app import create_app

    with TestClient(create_app(hooked)) as client:
        slide_id = submit(
            client,
            planted.write_tiff(tmp_path / "biopsy.tiff"),
            callback_url="http://127.0.0.1:9/slides",
        )
    run_slide_workers(1)
    with get_engine(slide_settings.database_url).connect() as conn:
        bodies = conn.execute(select(WebhookDelivery.body)).scalars().all()
    assert len(bodies) == 1
    body = json.loads(bodies[0])
    assert body["type"] == "slide.finished"
    assert body["data"]["slide_id"] == slide_id and body["data"]["state"] == "done"
    counts = {c["label"]: c["count"] for c in body["data"]["summary"]["classes"]}
    assert sum(counts.values()) == len(planted.OBJECTS)
