"""Manifests: a bad one is refused with its file and every problem named."""

from __future__ import annotations

from pathlib import Path

import pytest

from hepato.common.exceptions import InvalidManifest
from hepato.common.manifest import (
    ClassifyManifest,
    DetectManifest,
    VqaManifest,
    ZeroShotManifest,
    load_manifest,
    load_registry,
)
from tests.conftest import MODELS_DIR

GOOD = """
name: liver-yolo
task: detect
backend: onnx
weights: weights/liver.onnx
labels: [fibrosis, inflammation, steatosis, ballooning]
input_size: 640
"""


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


def test_the_shipped_manifests_load_with_their_weights_present() -> None:
    registry = load_registry(MODELS_DIR)
    assert {"hepato-yolov8n", "hepato-yolov8n-pt"} <= set(registry)
    assert all(m.weights_present for m in registry.values())


def test_weights_are_relative_to_the_manifest(tmp_path: Path) -> None:
    manifest = load_manifest(write(tmp_path, "m.yaml", GOOD))
    assert isinstance(manifest, DetectManifest)
    assert manifest.weights_path == tmp_path / "weights" / "liver.onnx"
    assert not manifest.weights_present
    assert (manifest.max_batch_size, manifest.options.iou) == (16, 0.5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("task: segment", "task: 'segment' is not a task; use one of detect, classify"),
        (
            "backend: tensorrt",
            "backend: Input should be 'ultralytics', 'onnx', 'transformers', 'null' or 'triton'",
        ),
        ("input_size: -3", "input_size: Input should be greater than or equal to 16"),
        ("max_batch_size: 0", "max_batch_size: Input should be greater than or equal to 1"),
        ("name: Liver YOLO", "name: String should match pattern"),
        ("labels: [a, a]", "labels must be unique"),
        ("labels: []", "a detect model needs labels"),
        ("colour: red", "colour: Extra inputs are not permitted"),
        ("options: {iou: 2}", "options.iou: Input should be less than or equal to 1"),
    ],
)
def test_each_mistake_is_named(tmp_path: Path, change: str, message: str) -> None:
    key = change.split(":")[0]
    lines = [ln for ln in GOOD.strip().splitlines() if not ln.startswith(f"{key}:")]
    path = write(tmp_path, "bad.yaml", "\n".join([*lines, change]))
    with pytest.raises(InvalidManifest) as info:
        load_manifest(path)
    assert str(path) in str(info.value)
    assert message in str(info.value)


def test_missing_fields_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(InvalidManifest, match=r"weights: Field required"):
        load_manifest(write(tmp_path, "a.yaml", "name: a\ntask: classify\nbackend: onnx\n"))
    with pytest.raises(InvalidManifest, match="not valid YAML"):
        load_manifest(write(tmp_path, "b.yaml", "name: [unclosed\n"))
    with pytest.raises(InvalidManifest, match="expected a mapping"):
        load_manifest(write(tmp_path, "c.yaml", "- a\n- b\n"))


def test_task_options_are_checked(tmp_path: Path) -> None:
    zero_shot = """
name: clip
task: zero-shot
backend: transformers
weights: clip
labels: [fibrosis, steatosis]
options: {prompts: [only one]}
"""
    with pytest.raises(InvalidManifest, match=r"options\.prompts has 1 entries for 2 labels"):
        load_manifest(write(tmp_path, "z.yaml", zero_shot))
    ok = load_manifest(write(tmp_path, "z2.yaml", zero_shot.replace("[only one]", "[a, b]")))
    assert isinstance(ok, ZeroShotManifest)
    vqa = """
name: medgemma
task: vqa
backend: transformers
weights: medgemma-4b-it
options: {question: "Is there steatosis?", question_template: "no placeholder"}
"""
    with pytest.raises(InvalidManifest, match=r"must contain \{question\}"):
        load_manifest(write(tmp_path, "v.yaml", vqa))
    good_vqa = vqa.replace(', question_template: "no placeholder"', ", max_new_tokens: 32")
    manifest = load_manifest(write(tmp_path, "v2.yaml", good_vqa))
    assert isinstance(manifest, VqaManifest) and manifest.options.max_new_tokens == 32
    classify = "name: r50\ntask: classify\nbackend: torch\nweights: r.pt\nlabels: [a, b]\n"
    manifest = load_manifest(write(tmp_path, "c.yaml", classify))
    assert isinstance(manifest, ClassifyManifest) and manifest.input_size == 224


def test_a_triton_model_names_its_server_and_has_no_local_weights(tmp_path: Path) -> None:
    lines = [ln for ln in GOOD.strip().splitlines() if not ln.startswith(("backend", "weights"))]
    served = "\n".join([*lines, "backend: triton", "triton: {url: 'triton:8001', model_name: y}"])
    manifest = load_manifest(write(tmp_path, "t.yaml", served))
    assert isinstance(manifest, DetectManifest) and manifest.triton is not None
    assert (manifest.triton.protocol, manifest.triton.timeout_s) == ("grpc", 30.0)
    assert manifest.weights_present
    with pytest.raises(InvalidManifest, match="backend triton needs a triton section"):
        load_manifest(write(tmp_path, "u.yaml", "\n".join([*lines, "backend: triton"])))
    local = GOOD + "triton: {url: 'triton:8001', model_name: y}\n"
    with pytest.raises(InvalidManifest, match="a triton section is for backend triton, not onnx"):
        load_manifest(write(tmp_path, "v.yaml", local))
    no_weights = "name: r\ntask: classify\nbackend: onnx\nlabels: [a]\n"
    with pytest.raises(InvalidManifest, match="only backends 'null' and 'triton' have none"):
        load_manifest(write(tmp_path, "w.yaml", no_weights))


def test_a_registry_reports_every_bad_file_and_duplicate_names(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", GOOD)
    write(tmp_path, "b.yaml", GOOD)
    write(tmp_path, "c.yml", GOOD.replace("liver-yolo", "other").replace("onnx", "tflite"))
    write(tmp_path, "notes.txt", "not a manifest")
    with pytest.raises(InvalidManifest) as info:
        load_registry(tmp_path)
    text = str(info.value)
    assert "b.yaml: model name 'liver-yolo' is also declared in" in text
    assert "c.yml" in text and "backend" in text
    with pytest.raises(InvalidManifest, match="models directory not found"):
        load_registry(tmp_path / "nowhere")
