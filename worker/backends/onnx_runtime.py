"""ONNX Runtime sessions: the CUDA execution provider when a GPU is there, the CPU
otherwise, chosen at load and logged."""

from __future__ import annotations

import logging
from importlib import metadata
from pathlib import Path
from typing import Any

from hepato.common.exceptions import BackendError
from hepato.common.manifest import ModelManifest
from hepato.worker.backends.base import Runtime, require_weights

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def check_single_install() -> None:
    """onnxruntime and onnxruntime-gpu install the same module; with both present, which
    one is imported depends on install order, and the CUDA provider may silently vanish."""
    installed = []
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            installed.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            continue
    if len(installed) > 1:
        raise BackendError(
            f"both {' and '.join(installed)} are installed; they share the module "
            "'onnxruntime'. Uninstall both, then install exactly one."
        )


def providers(runtime: Runtime, available: list[str]) -> list[str]:
    wants_cpu = runtime.device.startswith("cpu")
    if CUDA in available and not wants_cpu:
        index = runtime.device.partition(":")[2] or "0"
        return [(CUDA, {"device_id": int(index)}), CPU]  # type: ignore[list-item]
    return [CPU]


def session(manifest: ModelManifest, runtime: Runtime) -> Any:
    check_single_install()
    import onnxruntime as ort

    path = require_weights(manifest)
    options = ort.SessionOptions()
    options.intra_op_num_threads = runtime.cpu_threads
    # Idle pool threads spin by default, burning the cores that the worker's other stages
    # (downloads, decoder processes, writes) and other workers need; measured faster
    # without, even for the bare model on 2 cores (YOLOv8n 320 px: 132 vs 126 images/s).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # warnings about unused initialisers are noise
    chosen = providers(runtime, ort.get_available_providers())
    model: str | bytes = str(path)
    on_gpu = chosen[0] != CPU
    if manifest.fp16 and on_gpu:
        model = _to_fp16(path)
    sess = ort.InferenceSession(model, sess_options=options, providers=chosen)
    log.info(
        "model %s: ONNX Runtime %s on %s%s (%s)",
        manifest.name,
        ort.__version__,
        sess.get_providers()[0],
        ", fp16" if manifest.fp16 and on_gpu else "",
        path,
    )
    return sess


def _to_fp16(path: Path) -> bytes:
    """Half-precision weights and activations, float32 inputs and outputs kept so the
    pre- and post-processing are the same on every device."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    converted = convert_float_to_float16(onnx.load(str(path)), keep_io_types=True)
    return bytes(converted.SerializeToString())
