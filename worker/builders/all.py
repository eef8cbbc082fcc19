"""One model per task and backend, built from configuration with random weights: the
classifier on PyTorch and its ONNX export, DETR, CLIP (transformers and open_clip's
layout) and the vision-language model.
(The YOLOv8 detector needs no build: its trained demo weights ship in models/demo.)"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from hepato.common.manifest import ClassifyManifest, dump_manifest, load_manifest


def build_all(directory: Path, *, size: Literal["tiny", "base"]) -> list[Path]:
    from hepato.worker.backends.classify import export_onnx
    from hepato.worker.builders.classify import build_classifier
    from hepato.worker.builders.detr import build_detr
    from hepato.worker.builders.open_clip import build_open_clip
    from hepato.worker.builders.vqa import build_vqa
    from hepato.worker.builders.zero_shot import build_clip

    directory.mkdir(parents=True, exist_ok=True)
    paths = [build_classifier(directory, size=size)]
    classifier = load_manifest(paths[0])
    assert isinstance(classifier, ClassifyManifest)
    exported = export_onnx(classifier, directory / f"{classifier.name}.onnx")
    onnx_manifest = directory / f"{exported.name}.yaml"
    # Weights relative to the manifest, like every built model's, so the folder can move.
    dump_manifest(
        exported.model_copy(update={"weights": Path(f"{classifier.name}.onnx")}), onnx_manifest
    )
    paths.append(onnx_manifest)
    paths.append(build_detr(directory, size=size))
    paths.append(build_clip(directory, size=size))
    paths.append(build_open_clip(directory, size=size))
    paths.append(build_vqa(directory, size=size))
    return paths
