"""`hepato models quantize NAME --int8`: the demo YOLOv8 detector and a tiny ResNet become
INT8 (QDQ) graphs calibrated on sample images, whose manifests load through the registry
and whose models predict; the agreement with the float model is measured through the real
backends, and a model below the minimum is refused without a file left behind."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from hepato.cli.main import app
from hepato.common.manifest import (
    ClassifyManifest,
    DetectManifest,
    dump_manifest,
    load_manifest,
    load_registry,
)
from hepato.common.results import Box, ClassifyResult, DetectResult, LabelProbability
from hepato.worker import quantize
from hepato.worker.agreement import (
    Agreement,
    agreement,
    box_iou,
    classify_agreement,
    detect_agreement,
    matched_boxes,
)
from hepato.worker.backends.base import Runtime, load_model
from hepato.worker.backends.classify import export_onnx
from hepato.worker.builders.classify import build_classifier
from hepato.worker.quantize import (
    AgreementTooLow,
    NotQuantizable,
    Quantized,
    calibration_images,
    predict_all,
    quantize_model,
)
from tests.conftest import MODELS_DIR, REPO, SAMPLES

RUNTIME = Runtime(device="cpu", threads=2)
DETECTOR = "hepato-yolov8n"
# Few, small images: three demo-domain tiles (one JPEG) and a real IHC tile.
CALIBRATION = ("synthetic_00.png", "synthetic_01.jpg", "synthetic_03.png", "ihc_colon_tile_00.png")


def copy_detector(root: Path) -> Path:
    """The demo detector's ONNX weights and manifest in a registry of their own."""
    (root / "demo").mkdir(parents=True)
    shutil.copy(REPO / "models" / "demo" / "hepato-yolov8n.onnx", root / "demo")
    (root / "manifests").mkdir()
    shutil.copy(MODELS_DIR / f"{DETECTOR}.yaml", root / "manifests")
    return root / "manifests"


def files(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*")}


def int8_nodes(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node} & {
        "QuantizeLinear",
        "DequantizeLinear",
    }


@pytest.fixture(scope="module")
def calibration(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("calibration")
    for name in CALIBRATION:
        shutil.copy(SAMPLES / name, folder)
    # A TIFF too, and a file that is not an image (skipped).
    cv2.imwrite(str(folder / "synthetic_02.tif"), cv2.imread(str(SAMPLES / "synthetic_02.png")))
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.fixture(scope="module")
def two_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """For the command's own tests: a tile with boxes and one without the demo's domain."""
    folder = tmp_path_factory.mktemp("two")
    for name in ("synthetic_00.png", "ihc_colon_tile_00.png"):
        shutil.copy(SAMPLES / name, folder)
    return folder


@pytest.fixture(scope="module")
def images(calibration: Path) -> list[np.ndarray]:
    return calibration_images(calibration)


@pytest.fixture(scope="module")
def detector(
    tmp_path_factory: pytest.TempPathFactory, images: list[np.ndarray]
) -> tuple[Path, Quantized]:
    models_dir = copy_detector(tmp_path_factory.mktemp("yolo"))
    manifest = load_registry(models_dir)[DETECTOR]
    return models_dir, quantize_model(manifest, models_dir, images, RUNTIME)


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ResNet exported to ONNX, as tests/models/test_classify.py builds it."""
    folder = tmp_path_factory.mktemp("resnet")
    torch_manifest = load_manifest(build_classifier(folder, size="tiny"))
    assert isinstance(torch_manifest, ClassifyManifest)
    exported = export_onnx(torch_manifest, folder / "resnet18-tiny.onnx")
    dump_manifest(
        exported.model_copy(update={"weights": Path("resnet18-tiny.onnx")}),
        folder / f"{exported.name}.yaml",
    )
    return folder


def test_calibration_images_decode_png_jpeg_tiff_and_skip_the_rest(
    calibration: Path, images: list[np.ndarray]
) -> None:
    assert len(images) == len(CALIBRATION) + 1
    assert all(i.ndim == 3 and i.shape[2] == 3 and i.dtype == np.uint8 for i in images)
    # In name order, the TIFF (holding the PNG's pixels) is the fourth.
    names = sorted([*CALIBRATION, "synthetic_02.tif"])
    png = cv2.cvtColor(cv2.imread(str(SAMPLES / "synthetic_02.png")), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(images[names.index("synthetic_02.tif")], png)
    # A limit spreads over the folder rather than taking its first names.
    assert len(calibration_images(calibration, limit=2)) == 2


def test_detector_int8_is_qdq_and_loads_through_the_registry(
    detector: tuple[Path, Quantized], images: list[np.ndarray]
) -> None:
    models_dir, done = detector
    registry = load_registry(models_dir)
    int8 = registry[f"{DETECTOR}-int8"]
    original = registry[DETECTOR]
    assert isinstance(int8, DetectManifest) and isinstance(original, DetectManifest)
    assert done.path == models_dir / f"{DETECTOR}-int8.yaml"
    assert int8.weights_path == models_dir.parent / "demo" / f"{DETECTOR}-int8.onnx"
    assert int8_nodes(int8.weights_path) == {"QuantizeLinear", "DequantizeLinear"}
    # The head's last Concat (pixel boxes with 0..1 scores) takes float inputs.
    graph = onnx.load(str(int8.weights_path)).graph
    [last] = [n for n in graph.node if graph.output[0].name in n.output]
    producers = {o: n.op_type for n in graph.node for o in n.output}
    assert last.op_type == "Concat"
    assert "DequantizeLinear" not in {producers.get(i) for i in last.input}
    assert (int8.task, int8.backend, int8.labels) == ("detect", "onnx", original.labels)
    assert (int8.options, int8.input_size, int8.mpp) == (
        original.options,
        original.input_size,
        original.mpp,
    )
    assert int8.version == f"{original.version}-int8"
    assert "INT8" in int8.description and f"calibrated on {len(images)} images" in int8.description
    results, _, _ = load_model(int8, RUNTIME).predict(images[:2])
    assert all(isinstance(r, DetectResult) for r in results)
    assert sum(len(r.boxes) for r in results if isinstance(r, DetectResult)) > 0
    # Not a leftover of the staging folder next to the weights.
    assert not [p for p in (models_dir.parent / "demo").iterdir() if p.name.startswith(".")]


def test_reported_detector_agreement_is_the_backends_own(
    detector: tuple[Path, Quantized], images: list[np.ndarray]
) -> None:
    models_dir, done = detector
    registry = load_registry(models_dir)
    reference = predict_all(load_model(registry[DETECTOR], RUNTIME), images, 8)
    candidate = predict_all(load_model(registry[f"{DETECTOR}-int8"], RUNTIME), images, 8)
    assert done.agreement == detect_agreement(reference, candidate)
    assert done.agreement.compared == sum(
        len(r.boxes) for r in reference if isinstance(r, DetectResult)
    )
    assert done.threshold == quantize.MIN_BOX_AGREEMENT <= done.agreement.value <= 1.0
    assert done.images == len(images)


def test_classifier_int8_agrees_and_predicts(
    classifier_dir: Path, images: list[np.ndarray]
) -> None:
    name = "hepato-resnet18-tiny-onnx"
    manifest = load_registry(classifier_dir)[name]
    done = quantize_model(manifest, classifier_dir, images, RUNTIME)
    int8 = load_registry(classifier_dir)[f"{name}-int8"]
    assert isinstance(int8, ClassifyManifest)
    assert int8_nodes(int8.weights_path) == {"QuantizeLinear", "DequantizeLinear"}
    assert (int8.labels, int8.options, int8.input_size) == (
        manifest.labels,
        manifest.options,
        manifest.input_size,
    )
    reference = predict_all(load_model(manifest, RUNTIME), images, 8)
    candidate = predict_all(load_model(int8, RUNTIME), images, 8)
    assert all(isinstance(r, ClassifyResult) for r in candidate)
    assert done.agreement == classify_agreement(reference, candidate)
    assert done.agreement.value >= quantize.MIN_TOP1_AGREEMENT
    # Quantizing the INT8 model again is refused.
    with pytest.raises(NotQuantizable, match="quantized already"):
        quantize_model(int8, classifier_dir, images, RUNTIME)


def test_below_the_minimum_is_refused_and_writes_nothing(
    tmp_path: Path, detector: tuple[Path, Quantized], images: list[np.ndarray]
) -> None:
    models_dir = copy_detector(tmp_path)
    before = files(tmp_path)
    # Above what the same quantization achieved (even were that 100%).
    threshold = detector[1].agreement.value + 1e-3
    with pytest.raises(AgreementTooLow, match="nothing was written") as refused:
        quantize_model(load_registry(models_dir)[DETECTOR], models_dir, images, RUNTIME, threshold)
    assert refused.value.agreement == detector[1].agreement
    assert files(tmp_path) == before


def box(class_id: int, x1: float, y1: float, x2: float, y2: float, score: float = 0.9) -> Box:
    return Box(label=str(class_id), class_id=class_id, score=score, x1=x1, y1=y1, x2=x2, y2=y2)


def test_box_matching_on_hand_made_boxes() -> None:
    exact, shifted, missing = box(0, 0, 0, 10, 10), box(1, 20, 0, 30, 10), box(2, 40, 40, 50, 50)
    # Shifted by 6 of 10 px: IoU 4/16 = 0.25, below 0.5.
    moved = box(1, 26, 0, 36, 10)
    assert box_iou(shifted, moved) == pytest.approx(0.25)
    assert box_iou(exact, exact) == 1.0
    reference = [DetectResult(boxes=[exact, shifted, missing])]
    candidate = [DetectResult(boxes=[exact, moved])]
    assert matched_boxes(reference[0].boxes, candidate[0].boxes) == 1
    got = detect_agreement(reference, candidate)
    assert got.compared == 3
    # Recall 1/3, precision 1/2: the lower counts.
    assert got.value == pytest.approx(1 / 3)
    assert "recall 33.3%, precision 50.0%" in got.summary
    # The same box under another class, and one candidate for two reference boxes.
    assert matched_boxes([exact], [box(3, 0, 0, 10, 10)]) == 0
    assert matched_boxes([exact, box(0, 1, 0, 11, 10, score=0.5)], [exact]) == 1
    assert detect_agreement([DetectResult(boxes=[])], [DetectResult(boxes=[])]).value == 1.0
    assert detect_agreement(reference, reference).value == 1.0


def test_top1_agreement_on_hand_made_labels() -> None:
    def result(*probabilities: float) -> ClassifyResult:
        order = sorted(range(len(probabilities)), key=lambda c: -probabilities[c])
        return ClassifyResult(
            labels=[
                LabelProbability(label=str(c), class_id=c, probability=probabilities[c])
                for c in order
            ]
        )

    reference = [result(0.7, 0.3), result(0.4, 0.6), result(0.9, 0.1)]
    candidate = [result(0.7, 0.3), result(0.55, 0.45), result(0.8, 0.2)]
    got = classify_agreement(reference, candidate)
    assert got == Agreement(
        2 / 3, 3, "top-1 agreement 66.7% (2 of 3 images), largest probability difference 0.1500"
    )
    assert agreement("classify", reference, candidate) == got
    with pytest.raises(ValueError, match="zero-shot"):
        agreement("zero-shot", reference, candidate)


def test_cli_quantizes_and_reports_agreement_and_speed(tmp_path: Path, two_images: Path) -> None:
    models_dir = copy_detector(tmp_path)
    result = CliRunner().invoke(
        app,
        [
            "models", "quantize", DETECTOR, "--int8",
            "--calibrate", str(two_images),
            "--models-dir", str(models_dir),
            "--speed-batch", "2", "--speed-seconds", "0.1",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "box recall" in result.output and "passed" in result.output
    assert "images/s" in result.output and f"{DETECTOR}-int8" in result.output
    assert isinstance(load_manifest(models_dir / f"{DETECTOR}-int8.yaml"), DetectManifest)


def test_cli_refuses_below_the_default_minimum_with_exit_1(
    tmp_path: Path, two_images: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models_dir = copy_detector(tmp_path)
    before = files(tmp_path)
    monkeypatch.setitem(quantize.MIN_AGREEMENT, "detect", 1.01)
    result = CliRunner().invoke(
        app,
        ["models", "quantize", DETECTOR, "--int8", "--calibrate", str(two_images),
         "--models-dir", str(models_dir)],
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "INT8 model refused" in result.output and "below the minimum 101.0%" in result.output
    assert files(tmp_path) == before


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("torch model", "quantization takes detect and classify models on onnx"),
        ("no images", "no calibration images"),
        ("no --int8", "give --int8"),
        ("unknown model", "no model 'nope'"),
    ],
)
def test_cli_errors_exit_2(tmp_path: Path, classifier_dir: Path, case: str, message: str) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    args = {
        "torch model": ["hepato-resnet18-tiny", "--int8", "--calibrate", str(SAMPLES)],
        "no images": ["hepato-resnet18-tiny-onnx", "--int8", "--calibrate", str(empty)],
        "no --int8": ["hepato-resnet18-tiny-onnx"],
        "unknown model": ["nope", "--int8"],
    }[case]
    result = CliRunner().invoke(
        app, ["models", "quantize", *args, "--models-dir", str(classifier_dir)]
    )
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
