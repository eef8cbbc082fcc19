"""The ResNet classifier on PyTorch and on ONNX Runtime: a microbatch of mixed sizes gives
what each image gives alone, and the exported graph gives what PyTorch gives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hepato.common.exceptions import ModelWeightsNotFound
from hepato.common.manifest import ClassifyManifest, dump_manifest, load_manifest
from hepato.common.results import ClassifyResult, TaskResult
from hepato.worker.backends.base import Runtime, load_model
from hepato.worker.backends.classify import (
    ResNetOnnx,
    ResNetTorch,
    export_onnx,
    preprocess,
    to_results,
)
from hepato.worker.builders.classify import LABELS, build_classifier
from tests.conftest import REPO

# Batched and single runs take the same preprocessing path; what differs is the runtime's
# choice of convolution kernels per batch size, a float32 summation-order effect (~1e-7).
BATCH_TOL = 1e-5
# ONNX Runtime and PyTorch fuse and order float32 arithmetic differently over ~20 layers;
# observed differences are ~3e-7, so 1e-4 is far from noise yet catches any real mismatch.
BACKEND_TOL = 1e-4
# Softmax is computed in float64; the sum is off by rounding only.
SUM_TOL = 1e-9

RUNTIME = Runtime(device="cpu", threads=2)
SHAPES = [(64, 64), (100, 80), (30, 200), (512, 384), (17, 33), (64, 65), (300, 100), (1, 1)]


@pytest.fixture(scope="module")
def torch_manifest(tmp_path_factory: pytest.TempPathFactory) -> ClassifyManifest:
    path = build_classifier(tmp_path_factory.mktemp("classify"), size="tiny")
    manifest = load_manifest(path)
    assert isinstance(manifest, ClassifyManifest)
    return manifest


@pytest.fixture(scope="module")
def onnx_manifest(torch_manifest: ClassifyManifest) -> ClassifyManifest:
    assert torch_manifest.source is not None
    folder = torch_manifest.source.parent
    exported = export_onnx(torch_manifest, folder / "exported.onnx")
    path = folder / f"{exported.name}.yaml"
    dump_manifest(exported, path)
    manifest = load_manifest(path)
    assert isinstance(manifest, ClassifyManifest)
    return manifest


@pytest.fixture(scope="module")
def torch_model(torch_manifest: ClassifyManifest) -> ResNetTorch:
    return ResNetTorch(torch_manifest, RUNTIME)


@pytest.fixture(scope="module")
def onnx_model(onnx_manifest: ClassifyManifest) -> ResNetOnnx:
    return ResNetOnnx(onnx_manifest, RUNTIME)


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SHAPES]


def probabilities(result: TaskResult) -> np.ndarray:
    """By class id, whatever the result's order."""
    assert isinstance(result, ClassifyResult)
    out = np.zeros(len(result.labels))
    for entry in result.labels:
        out[entry.class_id] = entry.probability
    return out


def ranking(result: TaskResult) -> list[int]:
    assert isinstance(result, ClassifyResult)
    return [entry.class_id for entry in result.labels]


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_batch_of_mixed_sizes_equals_each_image_alone(
    backend: str,
    torch_model: ResNetTorch,
    onnx_model: ResNetOnnx,
    images: list[np.ndarray],
) -> None:
    model = torch_model if backend == "torch" else onnx_model
    batched, sizes, ms = model.predict(images)
    assert sizes == [len(images)] * len(images), "a fixed input size makes one call"
    assert ms > 0
    for image, got in zip(images, batched, strict=True):
        [alone], [size], _ = model.predict([image])
        assert size == 1
        np.testing.assert_allclose(probabilities(got), probabilities(alone), atol=BATCH_TOL)


def test_onnx_gives_the_probabilities_and_ranking_of_pytorch(
    torch_model: ResNetTorch, onnx_model: ResNetOnnx, images: list[np.ndarray]
) -> None:
    want, _, _ = torch_model.predict(images)
    got, _, _ = onnx_model.predict(images)
    for w, g in zip(want, got, strict=True):
        p = probabilities(w)
        np.testing.assert_allclose(probabilities(g), p, atol=BACKEND_TOL)
        # Rankings may only differ between classes closer than the tolerance.
        assert np.all(np.abs(np.diff(p[ranking(w)])) > BACKEND_TOL), "test data has ties"
        assert ranking(g) == ranking(w)


def test_results_name_every_label_most_probable_first(
    onnx_model: ResNetOnnx, images: list[np.ndarray]
) -> None:
    results, _, _ = onnx_model.predict(images)
    assert len(results) == len(images)
    for result in results:
        assert isinstance(result, ClassifyResult)
        probs = [entry.probability for entry in result.labels]
        assert probs == sorted(probs, reverse=True)
        assert sum(probs) == pytest.approx(1.0, abs=SUM_TOL)
        assert sorted((e.class_id, e.label) for e in result.labels) == list(enumerate(LABELS))


def test_postprocessing_orders_by_probability_and_keeps_ties_in_class_order() -> None:
    logits = np.array([[0.0, 2.0, 1.0, 2.0]], dtype=np.float32)
    [result] = to_results(logits, LABELS)
    assert ranking(result) == [1, 3, 2, 0]
    e = np.exp([0.0, 2.0, 1.0, 2.0])
    np.testing.assert_allclose(probabilities(result), e / e.sum(), rtol=1e-12)


def test_preprocessing_resizes_and_normalises() -> None:
    image = np.full((10, 30, 3), (255, 0, 128), dtype=np.uint8)
    batch = preprocess([image], 16, (0.5, 0.5, 0.5), (0.25, 0.5, 1.0))
    assert batch.shape == (1, 3, 16, 16) and batch.dtype == np.float32
    assert batch.flags.c_contiguous
    # float32 arithmetic: ~1e-7 per operation.
    np.testing.assert_allclose(batch[0, :, 0, 0], [2.0, -1.0, 128 / 255 - 0.5], atol=1e-6)


def test_exported_graph_runs_at_batch_1_and_8(onnx_manifest: ClassifyManifest) -> None:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_manifest.weights_path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["images"]
    assert [o.name for o in sess.get_outputs()] == ["logits"]
    side = onnx_manifest.input_size
    for n in (1, 8):
        x = np.random.default_rng(n).standard_normal((n, 3, side, side), dtype=np.float32)
        (logits,) = sess.run(None, {"images": x})
        assert logits.shape == (n, len(LABELS))


def test_exported_manifest_names_the_onnx_backend(
    torch_manifest: ClassifyManifest, onnx_manifest: ClassifyManifest
) -> None:
    assert onnx_manifest.backend == "onnx"
    assert onnx_manifest.name == f"{torch_manifest.name}-onnx"
    assert onnx_manifest.labels == torch_manifest.labels
    assert onnx_manifest.input_size == torch_manifest.input_size
    assert isinstance(load_model(onnx_manifest, RUNTIME), ResNetOnnx)


def test_safetensors_weights_load_the_same(
    torch_manifest: ClassifyManifest, torch_model: ResNetTorch, images: list[np.ndarray]
) -> None:
    import torch
    from safetensors.torch import save_file

    path = torch_manifest.weights_path.with_suffix(".safetensors")
    save_file(torch.load(torch_manifest.weights_path, weights_only=True), str(path))
    model = ResNetTorch(torch_manifest.model_copy(update={"weights": path}), RUNTIME)
    got, _, _ = model.predict(images[:2])
    want, _, _ = torch_model.predict(images[:2])
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(probabilities(g), probabilities(w))


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_missing_weights_are_refused(backend: str, tmp_path: Path) -> None:
    manifest = ClassifyManifest(
        name="absent", task="classify", backend=backend, weights=tmp_path / "nope", labels=["a"]
    )
    cls = ResNetTorch if backend == "torch" else ResNetOnnx
    with pytest.raises(ModelWeightsNotFound, match="not found"):
        cls(manifest, RUNTIME)


def test_onnx_backend_never_imports_torch(onnx_manifest: ClassifyManifest) -> None:
    assert onnx_manifest.source is not None
    script = f"""
import json, sys
import numpy as np
from hepato.common.manifest import load_manifest
from hepato.worker.backends.base import Runtime
from hepato.worker.backends.classify import ResNetOnnx
model = ResNetOnnx(load_manifest(__import__("pathlib").Path({str(onnx_manifest.source)!r})),
                   Runtime(device="cpu", threads=1))
model.predict([np.zeros((40, 50, 3), dtype=np.uint8)])
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision"))))
"""
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
