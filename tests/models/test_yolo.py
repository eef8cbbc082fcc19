"""YOLOv8 on both backends: the ONNX Runtime one (own letterbox and NMS) gives what
ultralytics on PyTorch gives for the same weights; a microbatch gives what each image
gives alone; `hepato models export` makes the ONNX model and its manifest."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pytest

from hepato.common.manifest import DetectManifest, load_manifest, load_registry
from hepato.common.results import DetectResult
from hepato.worker.backends.base import Runtime, load_model
from hepato.worker.backends.yolo_onnx import letterbox, nms, postprocess
from tests.conftest import DEMO_WEIGHTS, MODELS_DIR, REPO, SAMPLES

LABELS = ["fibrosis", "inflammation", "steatosis", "ballooning"]
IMGSZ, CONF, IOU = 320, 0.25, 0.5
# Float32 on two runtimes: boxes agree to a hundredth of a pixel, scores to 1e-4.
BOX_TOL, SCORE_TOL = 1e-2, 1e-4
RUNTIME = Runtime(device="cpu", config_dir=REPO / ".data" / "ultralytics")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> DetectManifest:
    """`hepato models export hepato-yolov8n-pt --to onnx` on a copy of the registry."""
    from typer.testing import CliRunner

    from hepato.cli.main import app

    folder = tmp_path_factory.mktemp("registry")
    (folder / "demo").mkdir()
    shutil.copy(DEMO_WEIGHTS, folder / "demo" / DEMO_WEIGHTS.name)
    (folder / "manifests").mkdir()
    shutil.copy(MODELS_DIR / "hepato-yolov8n-pt.yaml", folder / "manifests")
    result = CliRunner().invoke(
        app, ["models", "export", "hepato-yolov8n-pt", "--models-dir", str(folder / "manifests")]
    )
    assert result.exit_code == 0, result.output
    manifest = load_manifest(folder / "manifests" / "hepato-yolov8n-pt-onnx.yaml")
    assert isinstance(manifest, DetectManifest) and manifest.backend == "onnx"
    assert manifest.weights_path == folder / "demo" / "hepato-yolov8n.onnx"
    return manifest


def boxes(result: object) -> list[tuple[int, float, list[float]]]:
    assert isinstance(result, DetectResult)
    return [(b.class_id, b.score, [b.x1, b.y1, b.x2, b.y2]) for b in result.boxes]


def assert_same(got: object, want: object, name: str) -> None:
    g, w = boxes(got), boxes(want)
    assert [c for c, _, _ in g] == [c for c, _, _ in w], name
    for (_, gs, gb), (_, ws, wb) in zip(g, w, strict=True):
        assert gb == pytest.approx(wb, abs=BOX_TOL), name
        assert gs == pytest.approx(ws, abs=SCORE_TOL), name


def sample_images() -> tuple[list[str], list[np.ndarray]]:
    paths = sorted(SAMPLES.glob("*.png")) + sorted(SAMPLES.glob("*.jpg"))
    return [p.name for p in paths], [
        cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in paths
    ]


def test_exported_graph_has_a_dynamic_batch_axis(exported: DetectManifest) -> None:
    session = ort.InferenceSession(str(exported.weights_path), providers=["CPUExecutionProvider"])
    batch_dim = session.get_inputs()[0].shape[0]
    assert not isinstance(batch_dim, int), f"batch axis is fixed at {batch_dim}"
    for n in (1, 8):
        (out,) = session.run(None, {"images": np.zeros((n, 3, IMGSZ, IMGSZ), np.float32)})
        assert out.shape[0] == n


def test_onnx_equals_pytorch_on_every_sample(exported: DetectManifest) -> None:
    onnx_model = load_model(exported, RUNTIME)
    registry = load_registry(MODELS_DIR)
    torch_model = load_model(registry["hepato-yolov8n-pt"], RUNTIME)
    names, imgs = sample_images()
    got, sizes, _ = onnx_model.predict(imgs)
    want, _, _ = torch_model.predict(imgs)
    assert max(sizes) > 1, "equal-size images ran as one batch"
    assert sum(len(boxes(r)) for r in want) > 20
    for name, g, w in zip(names, got, want, strict=True):
        assert_same(g, w, name)


@pytest.mark.parametrize("backend", ["onnx", "ultralytics"])
def test_a_mixed_size_batch_equals_each_image_alone(backend: str) -> None:
    manifest = next(m for m in load_registry(MODELS_DIR).values() if m.backend == backend)
    model = load_model(manifest, RUNTIME)
    names, imgs = sample_images()
    assert len({im.shape for im in imgs}) >= 3
    forwards: list[int] = []  # the batch axis of each forward pass of the network
    if backend == "ultralytics":
        # The network itself, under ultralytics' predictor: what ran, not what was asked.
        net = model.model.predictor.model.model  # type: ignore[attr-defined]
        hook = net.register_forward_hook(lambda _m, x, _o: forwards.append(int(x[0].shape[0])))
    try:
        batched, sizes, _ = model.predict(imgs)
    finally:
        if backend == "ultralytics":
            hook.remove()
    # Each image reports the size of the call it ran in; equal sizes ran together.
    calls = sorted(n for n, count in Counter(sizes).items() for _ in range(count // n))
    assert max(sizes) > 1 and sum(calls) == len(imgs), sizes
    assert Counter(sizes) == Counter(
        n for shape, n in Counter(im.shape for im in imgs).items() for _ in range(n)
    ), "one call per image size"
    if backend == "ultralytics":
        assert sorted(forwards) == calls, f"ultralytics ran {forwards}, not batches {calls}"
    for name, image, result in zip(names, imgs, batched, strict=True):
        alone, sizes, _ = model.predict([image])
        assert sizes == [1]
        assert_same(result, alone[0], name)


def test_the_shipped_onnx_model_is_the_shipped_pt_exported() -> None:
    """models/demo/hepato-yolov8n.onnx serves the local stack; it must stay in step with
    the .pt the README's numbers come from."""
    registry = load_registry(MODELS_DIR)
    onnx_model = load_model(registry["hepato-yolov8n"], RUNTIME)
    torch_model = load_model(registry["hepato-yolov8n-pt"], RUNTIME)
    names, imgs = sample_images()
    for name, g, w in zip(
        names, onnx_model.predict(imgs)[0], torch_model.predict(imgs)[0], strict=True
    ):
        assert_same(g, w, name)


@pytest.mark.parametrize("shape", [(480, 640), (640, 480), (300, 300), (100, 1000)])
def test_boxes_map_back_through_the_letterbox(shape: tuple[int, int]) -> None:
    image = np.zeros((*shape, 3), dtype=np.uint8)
    boxed, scale, (left, top) = letterbox(image, IMGSZ, auto=True)
    assert boxed.shape[0] % 32 == 0 and boxed.shape[1] % 32 == 0
    assert max(boxed.shape[:2]) == IMGSZ
    # A box known in original pixels, as the model would see it after letterboxing.
    x1, y1, x2, y2 = 0.1 * shape[1], 0.2 * shape[0], 0.6 * shape[1], 0.9 * shape[0]
    cx, cy = (x1 + x2) / 2 * scale + left, (y1 + y2) / 2 * scale + top
    w, h = (x2 - x1) * scale, (y2 - y1) * scale
    raw = np.zeros((4 + len(LABELS), 1), dtype=np.float32)
    raw[:4, 0] = cx, cy, w, h
    raw[4 + 2, 0] = 0.9
    [(cls, score, box)] = postprocess(raw, CONF, IOU, scale, (left, top), shape)
    assert (cls, score) == (2, pytest.approx(0.9))
    assert box == pytest.approx((x1, y1, x2, y2), abs=1e-3)


def test_nms_suppresses_overlaps_of_one_class_only() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], dtype=np.float32)
    scores = np.array([0.8, 0.9, 0.7], dtype=np.float32)
    assert nms(boxes, scores, 0.5).tolist() == [1, 2]
    assert nms(boxes, scores, 0.9).tolist() == [1, 0, 2]


@pytest.mark.parametrize("backend", ["onnx", "ultralytics"])
def test_missing_weights_are_refused_not_downloaded(tmp_path: Path, backend: str) -> None:
    from hepato.common.exceptions import ModelWeightsNotFound

    manifest = next(m for m in load_registry(MODELS_DIR).values() if m.backend == backend)
    missing = manifest.model_copy(update={"weights": tmp_path / "nope.bin"})
    with pytest.raises(ModelWeightsNotFound, match="not found"):
        load_model(missing, RUNTIME)
