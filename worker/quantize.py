"""INT8 post-training static quantization of the ONNX detectors (YOLOv8) and classifiers
(ResNet) with ONNX Runtime, calibrated on images prepared by the model's own
pre-processing, and written only when the INT8 model agrees with the float one."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from hepato.common.exceptions import HepatoError, InvalidImage, InvalidManifest
from hepato.common.manifest import (
    ModelManifest,
    dump_manifest,
    load_manifest,
    load_registry,
    parse_manifest,
)
from hepato.common.results import TaskResult
from hepato.worker.agreement import Agreement, agreement
from hepato.worker.backends.base import Model, Runtime, load_model, require_weights
from hepato.worker.decode import decode_rgb

log = logging.getLogger(__name__)

MIN_BOX_AGREEMENT = 0.9
"""Detectors: the least box agreement, a fraction (0..1) of boxes: both the float model's
boxes found again by the INT8 model (recall) and the INT8 model's boxes that the float
model has too (precision), same class, IoU >= 0.5, over the calibration images."""
MIN_TOP1_AGREEMENT = 0.9
"""Classifiers: the least top-1 agreement, a fraction (0..1) of calibration images on
which the INT8 model's most probable class is the float model's."""
# A sound INT8 model differs only where the float one is on the edge: a box whose score is
# near the score threshold, an image whose top two classes are near-tied. On the demo
# YOLOv8n that is 1 to 3 boxes in 50 (94-99% over subsets of samples/), and a folder of a
# dozen images makes one flip worth several percent. A broken quantization falls far below
# (the YOLO head quantized whole, pixel boxes and scores sharing one scale: 0%).
MIN_AGREEMENT = {"detect": MIN_BOX_AGREEMENT, "classify": MIN_TOP1_AGREEMENT}

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
MAX_CALIBRATION_IMAGES = 100  # spread evenly over a larger folder
CALIBRATION_BATCH = 8
INT8_SUFFIX = "-int8"
# A graph holding these is quantized already.
QUANTIZED_OPS = frozenset(
    {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "ConvInteger", "MatMulInteger"}
)
# Left in float in a YOLO head, as ultralytics' own INT8 exports do: the box decoding
# (the DFL, and the Add/Sub/Mul/Div that turn distances into pixel boxes), the Sigmoid,
# and the Concat that joins pixel boxes (0..input size) with class scores (0..1). With one
# INT8 scale for both, scores move in steps of input_size/255: measured, no box at all.
HEAD_FLOAT_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Sigmoid", "Concat"})


class NotQuantizable(HepatoError):
    """The model or the calibration images cannot be used; the message says why."""


class AgreementTooLow(HepatoError):
    """The INT8 model disagrees with the float one more than allowed; nothing was written."""

    def __init__(self, agreed: Agreement, threshold: float) -> None:
        super().__init__(
            f"INT8 model refused: {agreed.summary}; below the minimum {threshold:.1%} "
            "(--min-agreement); nothing was written"
        )
        self.agreement, self.threshold = agreed, threshold


@dataclass(frozen=True)
class Quantized:
    manifest: ModelManifest  # the INT8 model's, as read back from its file
    path: Path  # that file
    agreement: Agreement
    threshold: float
    images: int  # calibration images


def calibration_images(directory: Path, limit: int = MAX_CALIBRATION_IMAGES) -> list[np.ndarray]:
    """The PNG, JPEG and TIFF images in ``directory`` (not its subfolders), RGB, in name
    order: at most ``limit``, spread evenly over the names. Files that do not decode are
    skipped."""
    if not directory.is_dir():
        raise NotQuantizable(f"calibration folder not found: {directory}")
    paths = sorted(
        p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    spread = [paths[i * len(paths) // limit] for i in range(min(limit, len(paths)))]
    chosen = set(spread)
    decoded: dict[Path, np.ndarray] = {}
    unreadable: list[str] = []
    # The spread first; files that do not decode are replaced by the others in order.
    for path in [*spread, *(p for p in paths if p not in chosen)]:
        if len(decoded) == limit:
            break
        try:
            decoded[path] = decode_rgb(path.read_bytes())
        except InvalidImage:
            unreadable.append(path.name)
    images = [decoded[p] for p in sorted(decoded)]
    if unreadable:
        log.warning("skipped %d files that do not decode: %s", len(unreadable), unreadable)
    if not images:
        found = f" ({len(unreadable)} did not decode)" if unreadable else ""
        raise NotQuantizable(
            f"no calibration images in {directory}{found}: it needs PNG, JPEG or TIFF "
            "files like those the model serves"
        )
    return images


def check_quantizable(manifest: ModelManifest) -> None:
    if manifest.task not in MIN_AGREEMENT or manifest.backend != "onnx":
        raise NotQuantizable(
            f"{manifest.name} is a {manifest.task} model on {manifest.backend}; INT8 "
            "quantization takes detect and classify models on onnx (export a PyTorch one "
            "first: hepato models export NAME)"
        )
    import onnx

    graph = onnx.load(str(require_weights(manifest)), load_external_data=False).graph
    if any(node.op_type in QUANTIZED_OPS for node in graph.node):
        raise NotQuantizable(f"{manifest.name} is quantized already ({manifest.weights_path})")


def model_inputs(model: Model, images: Sequence[np.ndarray], batch: int) -> Iterator[np.ndarray]:
    """The tensors the model itself feeds its graph for ``images``, ``batch`` at a time:
    the detector's letterbox (one tensor per equal-shape group), the classifier's resize
    and normalisation."""
    from hepato.worker.backends.classify import ResNetOnnx, preprocess
    from hepato.worker.backends.yolo_onnx import YoloOnnx

    for start in range(0, len(images), batch):
        chunk = list(images[start : start + batch])
        if isinstance(model, YoloOnnx):
            for _, group in model.prepare(chunk).groups:
                yield group.tensor
        elif isinstance(model, ResNetOnnx):
            m = model.manifest
            yield preprocess(chunk, m.input_size, m.options.mean, m.options.std)
        else:
            raise NotQuantizable(f"no calibration input for {type(model).__name__}")


def head_nodes(graph: Any) -> list[str]:
    """The nodes of a YOLO head to keep in float (see HEAD_FLOAT_OPS): in the module that
    writes the graph's output (ultralytics names nodes /model.22/...), and that node."""
    outputs = {o.name for o in graph.output}
    last = [n for n in graph.node if outputs & set(n.output)]
    prefixes = tuple(n.name.rpartition("/")[0] + "/" for n in last if "/" in n.name)
    names = {n.name for n in last}
    if prefixes:
        names.update(
            node.name
            for node in graph.node
            if node.name.startswith(prefixes)
            and (node.op_type in HEAD_FLOAT_OPS or "/dfl/" in node.name)
        )
    return sorted(names)


def pre_process(source: Path, out: Path) -> None:
    """ONNX Runtime's recommended step before quantizing: shape inference (a tensor of
    unknown shape cannot be quantized) and graph optimisation."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # ONNX's own shape inference, not ONNX Runtime's symbolic one (meant for transformers,
    # it says): on YOLOv8n the symbolic one takes 4-6 s here and changes nothing, measured
    # (the same 212 QuantizeLinear nodes and the same agreement; ResNet likewise).
    quant_pre_process(str(source), str(out), skip_symbolic_shape=True)


class _Batches:
    """An ONNX Runtime CalibrationDataReader (which it recognises by ``get_next``): one
    input dict per call, None at the end."""

    def __init__(self, input_name: str, batches: Iterator[np.ndarray]) -> None:
        self.input_name, self.batches = input_name, batches

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {self.input_name: batch}


def quantize_graph(float_model: Model, images: Sequence[np.ndarray], out: Path) -> None:
    """Write the INT8 (QDQ) graph of an ONNX model to ``out``, calibrated by min/max on
    ``images``. Temporary files go beside ``out``."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    manifest = float_model.manifest
    pre = out.with_name(f"{out.stem}.pre.onnx")
    pre_process(manifest.weights_path, pre)
    graph = onnx.load(str(pre)).graph
    excluded = head_nodes(graph) if manifest.task == "detect" else []
    reader = _Batches(graph.input[0].name, model_inputs(float_model, images, CALIBRATION_BATCH))
    quantize_static(
        str(pre),
        str(out),
        reader,
        quant_format=QuantFormat.QDQ,
        # uint8 activations with int8 weights: the pair x86's VNNI instruction multiplies
        # (vpdpbusd); int8 activations measured slower than float32 on this CPU.
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        # Weights in 7 bits: x86 CPUs without VNNI (AVX2 only, like the AMD EPYC of CI)
        # multiply u8 x s8 with vpmaddubsw, whose 16-bit sums saturate with full-range
        # weights: the detector's boxes there agreed 69-82 % with the float model, against
        # 90 % and more with VNNI. ONNX Runtime's advice for per-channel on such CPUs; the
        # graph runs wherever it is copied, so it is made safe for both.
        reduce_range=True,
        nodes_to_exclude=excluded,
        calibrate_method=CalibrationMethod.MinMax,
    )
    log.info("%s: quantized to %s (%d head nodes kept in float)", manifest.name, out, len(excluded))


def predict_all(model: Model, images: Sequence[np.ndarray], batch: int) -> list[TaskResult]:
    out: list[TaskResult] = []
    for start in range(0, len(images), batch):
        results, _, _ = model.predict(list(images[start : start + batch]))
        out.extend(results)
    return out


def int8_manifest(
    manifest: ModelManifest, weights: Path, images: int, summary: str
) -> ModelManifest:
    """The float manifest's task, labels and options, under its own name and version."""
    fields = manifest.model_dump(exclude={"source"})
    fields.update(
        name=f"{manifest.name}{INT8_SUFFIX}",
        version=f"{manifest.version}{INT8_SUFFIX}",
        description=(
            f"{manifest.description or manifest.name}; INT8 (ONNX Runtime static "
            f"quantization: QDQ, uint8 activations, per-channel int8 weights), calibrated "
            f"on {images} images; {summary}"
        ),
        weights=weights,
        # Half precision of an INT8 graph is not a thing session() can make.
        fp16=False,
    )
    try:
        return parse_manifest(fields)
    except (InvalidManifest, ValidationError) as exc:
        raise NotQuantizable(f"cannot name the INT8 model of {manifest.name}: {exc}") from None


def quantize_model(
    manifest: ModelManifest,
    models_dir: Path,
    images: Sequence[np.ndarray],
    runtime: Runtime,
    min_agreement: float | None = None,
) -> Quantized:
    """Quantize, check the INT8 model against the float one through the real backends on
    ``images``, and only then write ``<name>-int8.onnx`` beside the float weights and
    ``<name>-int8.yaml`` in ``models_dir``. A refusal (AgreementTooLow) writes nothing."""
    check_quantizable(manifest)
    if not images:
        raise NotQuantizable("no calibration images")
    threshold = MIN_AGREEMENT[manifest.task] if min_agreement is None else min_agreement
    name = f"{manifest.name}{INT8_SUFFIX}"
    target = (models_dir / f"{name}.yaml").resolve()
    weights = manifest.weights_path.with_name(f"{name}.onnx")
    other = load_registry(models_dir).get(name)
    if other is not None and other.source != target:
        raise NotQuantizable(f"model name {name!r} is taken by {other.source}")
    # Staged beside the final file: the move into place is a rename, and a refusal or an
    # error leaves nothing behind.
    work = Path(tempfile.mkdtemp(prefix=".quantize-", dir=weights.parent))
    try:
        float_model = load_model(manifest, runtime)
        staged = work / weights.name
        quantize_graph(float_model, images, staged)
        int8_model = load_model(int8_manifest(manifest, staged, len(images), ""), runtime)
        agreed = agreement(
            manifest.task,
            predict_all(float_model, images, CALIBRATION_BATCH),
            predict_all(int8_model, images, CALIBRATION_BATCH),
        )
        if manifest.task == "detect" and agreed.compared == 0:
            raise NotQuantizable(
                f"the float model finds no box on the {len(images)} calibration images, so "
                "agreement cannot be measured: calibrate on images like those it serves"
            )
        if agreed.value < threshold:
            raise AgreementTooLow(agreed, threshold)
        relative = Path(os.path.relpath(weights, target.parent))
        final = int8_manifest(manifest, relative, len(images), agreed.summary)
        os.replace(staged, weights)
        dump_manifest(final, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return Quantized(load_manifest(target), target, agreed, threshold, len(images))
