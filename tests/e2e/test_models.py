"""Every task through the whole service: one worker serving several models, each
microbatch one model, each result typed by its task and stamped with the model version."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from hepato.common.manifest import dump_manifest, load_manifest, load_registry
from hepato.common.settings import Settings
from hepato.worker.backends.base import Model
from tests.conftest import MODELS_DIR, SAMPLES
from tests.e2e.conftest import images
from tests.e2e.test_pipeline import db_jobs, submit

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def registry_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped default detector beside tiny random models of every other task."""
    from hepato.worker.builders.all import build_all

    folder = tmp_path_factory.mktemp("models")
    build_all(folder, size="tiny")
    default = load_registry(MODELS_DIR)["hepato-yolov8n"]
    dump_manifest(
        default.model_copy(update={"weights": default.weights_path}), folder / "default.yaml"
    )
    return folder


@pytest.fixture(scope="module")
def all_models(registry_dir: Path, base_settings: Settings) -> dict[str, Model]:
    from hepato.worker.backends.base import load_models

    settings = base_settings.model_copy(update={"models_dir": registry_dir})
    return load_models(settings, sorted(load_registry(registry_dir)))


def test_one_worker_serves_every_task_with_typed_results(
    settings: Settings, registry_dir: Path, all_models: dict[str, Model]
) -> None:
    from hepato.gateway.app import create_app
    from hepato.worker.runner import Worker

    settings = settings.model_copy(update={"models_dir": registry_dir, "max_batch_size": 4})
    paths = images(SAMPLES, "synthetic_*.png")[:5]
    tasks = {name: m.manifest.task for name, m in all_models.items()}
    assert set(tasks.values()) == {"detect", "classify", "zero-shot", "vqa"}
    with TestClient(create_app(settings)) as client:
        listed = {m["name"]: m for m in client.get("/v1/models").json()}
        assert set(listed) == set(all_models)
        accepted = {name: submit(client, paths, model=name) for name in all_models}
        vqa = next(n for n, t in tasks.items() if t == "vqa")
        asked = submit(client, paths[:2], model=vqa, question="Is there ballooning?")
        refused = client.post(
            "/v1/batches",
            files=[("files", (paths[0].name, paths[0].read_bytes()))],
            data={"model": "hepato-yolov8n", "question": "Is there ballooning?"},
        )
        assert refused.status_code == 422
        assert "a question applies to vqa models only" in refused.json()["detail"]

        worker = Worker(settings, all_models, burst=True)
        worker.run(install_signals=False)

        for name, batch in accepted.items():
            body = client.get(batch["status_url"]).json()
            assert body["state"] == "done", (name, body["counts"])
            for job in body["jobs"]:
                assert job["task"] == tasks[name] == job["result"]["task"]
                assert job["model"] == {"name": name, "version": "1"}
        answer = client.get(accepted[vqa]["jobs"][0]["status_url"]).json()["result"]
        default_question = all_models[vqa].manifest.options.question  # type: ignore[union-attr]
        assert default_question in answer["question"]
        assert "verdict" in answer and "explanation" in answer
        for job in client.get(asked["status_url"]).json()["jobs"]:
            assert "Is there ballooning?" in job["result"]["question"]
    jobs = db_jobs(settings)
    # Every microbatch held one model: the jobs one claim took (they share its lease
    # token, and the model call's inferred_at) are of one model, they are the whole call
    # (its size is theirs) and the call's size never exceeds the cap.
    microbatches: dict[object, list] = defaultdict(list)  # type: ignore[type-arg]
    for job in jobs:
        assert job.state == "done" and job.lease_token is not None, job
        microbatches[job.lease_token].append(job)
    for members in microbatches.values():
        assert len({j.model for j in members}) == 1, [(j.model, j.filename) for j in members]
        assert len({j.inferred_at for j in members}) == 1
        assert {j.batch_size for j in members} == {len(members)}
        assert 1 <= len(members) <= 4
    assert sum(map(len, microbatches.values())) == len(jobs)
    per_model = Counter(j.model for j in jobs if j.question is None)
    assert set(per_model.values()) == {len(paths)}
    assert worker.batches >= len(all_models) * 2


def test_a_job_for_a_model_without_manifest_is_refused_at_submission(
    settings: Settings, registry_dir: Path
) -> None:
    from hepato.gateway.app import create_app

    with TestClient(create_app(settings)) as client:
        path = images(SAMPLES, "synthetic_*.png")[0]
        response = client.post(
            "/v1/jobs", files={"file": (path.name, path.read_bytes())}, data={"model": "clip"}
        )
        assert response.status_code == 422
        assert "unknown model 'clip'; available: hepato-yolov8n" in response.json()["detail"]
    assert db_jobs(settings) == []


def test_a_worker_refuses_to_start_for_an_unknown_model(settings: Settings) -> None:
    from hepato.common.exceptions import UnknownModel
    from hepato.worker.backends.base import load_models

    with pytest.raises(UnknownModel, match="no manifest for 'nope'"):
        load_models(settings, ["nope"])


def test_a_bad_manifest_stops_the_gateway_naming_the_file(
    settings: Settings, tmp_path: Path
) -> None:
    from hepato.common.exceptions import InvalidManifest
    from hepato.gateway.app import create_app

    source = load_manifest(MODELS_DIR / "hepato-yolov8n.yaml")
    dump_manifest(source.model_copy(update={"weights": source.weights_path}), tmp_path / "a.yaml")
    (tmp_path / "broken.yaml").write_text("name: broken\ntask: detect\nbackend: caffe\n")
    with pytest.raises(InvalidManifest, match=r"broken\.yaml"):
        create_app(settings.model_copy(update={"models_dir": tmp_path}))
