"""A torchvision ResNet classifier with seeded random weights and its torch-backend
manifest: resnet18 at 64 px for tests, resnet50 at 224 px (the issue's "ResNet-50
classifier with 4 classes") for benchmarks."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from hepato.common.manifest import ClassifyManifest, ClassifyOptions, dump_manifest

LABELS = ("fibrosis", "inflammation", "steatosis", "ballooning")
SIZES: dict[str, tuple[Literal["resnet18", "resnet34", "resnet50"], int]] = {
    "tiny": ("resnet18", 64),
    "base": ("resnet50", 224),
}


def build_classifier(
    directory: Path,
    *,
    size: Literal["tiny", "base"] = "tiny",
    name: str | None = None,
    labels: tuple[str, ...] | list[str] = LABELS,
    seed: int = 0,
) -> Path:
    """Write ``<name>.pt`` (a state dict) and ``<name>.yaml`` into ``directory``; return
    the manifest's path."""
    import torch
    import torchvision

    architecture, input_size = SIZES[size]
    name = name or f"hepato-{architecture}-{size}"
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / f"{name}.pt"
    # A private generator state: building a model must not shift the caller's random draws.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(torchvision.models, architecture)(weights=None, num_classes=len(labels))
    torch.save(model.state_dict(), weights)
    manifest = ClassifyManifest(
        name=name,
        task="classify",
        backend="torch",
        description=f"{architecture}, random weights (seed {seed}), for {size} runs",
        weights=Path(weights.name),
        labels=list(labels),
        input_size=input_size,
        options=ClassifyOptions(architecture=architecture),
    )
    path = directory / f"{name}.yaml"
    dump_manifest(manifest, path)
    return path
