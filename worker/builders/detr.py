"""A DETR checkpoint directory with random weights, laid out as a transformers
``save_pretrained`` of a real one (config, safetensors, image processor), with its detect
manifest.

The backbone is transformers' own ResNet, not timm's, so nothing is fetched and no timm is
needed. "base" is DETR-R50's architecture (ResNet-50, 6+6 layers, 100 queries) at 512 px
rather than DETR's 800, so that CPU benchmarks stay feasible."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from hepato.common.manifest import DetectManifest, dump_manifest, parse_manifest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DEFAULT_LABELS = ("fibrosis", "inflammation", "steatosis", "ballooning")
SEED = 0
# Random heads put every query's score near 1 / (classes + 1); a threshold this low keeps
# boxes from a random model, so tests have something to compare.
SCORE_THRESHOLD = 0.01

_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "input_size": 128,
        "backbone": {
            "embedding_size": 8,
            "hidden_sizes": [8, 16, 16, 32],
            "depths": [1, 1, 1, 1],
            "layer_type": "basic",
        },
        "detr": {
            "d_model": 32,
            "encoder_layers": 1,
            "decoder_layers": 1,
            "encoder_ffn_dim": 64,
            "decoder_ffn_dim": 64,
            "encoder_attention_heads": 2,
            "decoder_attention_heads": 2,
            "num_queries": 12,
        },
    },
    "base": {
        "input_size": 512,
        # ResNetConfig's defaults are ResNet-50.
        "backbone": {},
        # DetrConfig's defaults are DETR-R50's transformer.
        "detr": {"d_model": 256},
    },
}


def build_detr(
    directory: Path,
    *,
    size: Literal["tiny", "base"] = "tiny",
    name: str | None = None,
    labels: tuple[str, ...] | list[str] = DEFAULT_LABELS,
) -> Path:
    """Write ``directory/<name>/`` (the checkpoint) and ``directory/<name>.yaml``; return
    the manifest's path."""
    import torch
    from transformers import DetrConfig, DetrForObjectDetection, DetrImageProcessor, ResNetConfig

    from hepato.worker.backends.detr import resize_bounds

    spec = _SIZES[size]
    name = name or f"detr-{size}"
    directory = Path(directory)
    manifest = parse_manifest(
        {
            "name": name,
            "task": "detect",
            "backend": "transformers",
            "description": f"DETR ({size}) with random weights, for tests and benchmarks",
            "weights": name,
            "labels": list(labels),
            "input_size": spec["input_size"],
            "max_batch_size": 8,
            "options": {"score_threshold": SCORE_THRESHOLD, "max_detections": 100},
        },
        directory / f"{name}.yaml",
    )
    assert isinstance(manifest, DetectManifest)

    d_model = spec["detr"]["d_model"]
    # Passed as mappings: transformers 5 takes these through **kwargs (its stubs do not
    # list them), and writes them to config.json, where older readers look for them.
    backbone: dict[str, Any] = {**spec["backbone"], "out_features": ["stage4"]}
    detr: dict[str, Any] = {
        **spec["detr"],
        "use_timm_backbone": False,
        "use_pretrained_backbone": False,
        "id2label": dict(enumerate(labels)),
        "label2id": {label: i for i, label in enumerate(labels)},
        # With the default 0.02 the heads' outputs are nearly constant: every query gives
        # the same box and score for every image, which would make the tests vacuous.
        "init_std": d_model**-0.5,
    }
    config = DetrConfig(backbone_config=ResNetConfig(**backbone), **detr)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = DetrForObjectDetection(config).eval()
    processor = DetrImageProcessor(size=resize_bounds(spec["input_size"]))

    target = directory / name
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    processor.save_pretrained(target)
    path = directory / f"{name}.yaml"
    dump_manifest(manifest, path)
    return path
