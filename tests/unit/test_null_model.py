"""The null model: the benchmark's stand-in for a detector, with no weights and no
compute, loaded and served like any other model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hepato.common.exceptions import InvalidManifest
from hepato.common.manifest import DetectManifest, load_manifest, load_registry
from hepato.common.results import DetectResult
from hepato.worker.backends.base import Runtime, load_model
from hepato.worker.backends.null import NullModel
from tests.conftest import MODELS_DIR


@pytest.fixture(scope="module")
def manifest() -> DetectManifest:
    found = load_registry(MODELS_DIR)["null"]
    assert isinstance(found, DetectManifest)
    return found


def test_the_shipped_manifest_needs_no_weights(manifest: DetectManifest) -> None:
    assert (manifest.task, manifest.backend) == ("detect", "null")
    assert (manifest.max_batch_size, manifest.max_wait_ms) == (32, 5.0)
    assert manifest.weights is None and manifest.weights_present
    with pytest.raises(InvalidManifest, match="has no weights"):
        _ = manifest.weights_path


def test_it_loads_like_any_model(manifest: DetectManifest) -> None:
    model = load_model(manifest, Runtime(device="cpu", threads=1))
    assert isinstance(model, NullModel)
    assert model.manifest is manifest


@pytest.mark.parametrize("count", [0, 1, 7, 32])
def test_one_empty_detection_per_image_in_one_call(manifest: DetectManifest, count: int) -> None:
    model = load_model(manifest, Runtime(device="cpu", threads=1))
    shapes = [(320, 320, 3), (100, 240, 3), (8, 8, 3)]
    images = [np.zeros(shapes[i % len(shapes)], dtype=np.uint8) for i in range(count)]
    results, sizes, elapsed_ms = model.predict(images)
    assert results == [DetectResult(boxes=[])] * count
    assert sizes == [count] * count
    assert elapsed_ms >= 0


def test_only_the_null_backend_goes_without_weights(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text("name: m\ntask: detect\nbackend: onnx\nlabels: [a]\n")
    with pytest.raises(InvalidManifest, match="weights: Field required") as info:
        load_manifest(path)
    assert str(path) in str(info.value)
    path.write_text("name: m\ntask: detect\nbackend: 'null'\nlabels: [a]\n")
    assert load_manifest(path).weights_present
