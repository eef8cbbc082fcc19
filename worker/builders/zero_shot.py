"""A CLIP checkpoint directory with random weights, laid out as a transformers
``save_pretrained`` of a real one (config, safetensors, tokenizer, image processor), with
its zero-shot manifest.

"base" has BiomedCLIP's image tower shape (ViT-B/16 at 224 px, 512-d embeddings); its text
tower is CLIP ViT-B/16's, which runs only once at load, so its size does not matter to
throughput. The tokenizer is byte-level BPE with single-character tokens and no merges:
any prompt tokenizes, without a downloaded vocabulary."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from hepato.common.manifest import ZeroShotManifest, dump_manifest, parse_manifest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DEFAULT_LABELS = ("fibrosis", "inflammation", "steatosis", "ballooning")
PROMPT_TEMPLATE = "an H&E liver biopsy showing {label}"
SEED = 0
# CLIP's context length; prompts are far shorter.
CONTEXT_LENGTH = 77

_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "image_size": 32,
        "projection_dim": 16,
        "text": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
        },
        "vision": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "patch_size": 8,
        },
    },
    "base": {
        "image_size": 224,
        "projection_dim": 512,
        "text": {
            "hidden_size": 512,
            "intermediate_size": 2048,
            "num_hidden_layers": 12,
            "num_attention_heads": 8,
        },
        "vision": {
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "patch_size": 16,
        },
    },
}


def _tokenizer() -> Any:
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    # CLIP's BPE marks a word's last symbol with </w>, so every byte needs both forms.
    symbols = [*chars, *(c + "</w>" for c in chars), "<|startoftext|>", "<|endoftext|>"]
    vocab = {s: i for i, s in enumerate(symbols)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CONTEXT_LENGTH)


def zero_shot_manifest(
    directory: Path,
    name: str,
    backend: str,
    description: str,
    labels: tuple[str, ...] | list[str],
    prompts: list[str] | None,
    input_size: int,
) -> ZeroShotManifest:
    """A built model's manifest (one prompt per label by default), validated before any
    weights are written: a prompt/label mismatch fails here, not at load."""
    manifest = parse_manifest(
        {
            "name": name,
            "task": "zero-shot",
            "backend": backend,
            "description": description,
            "weights": name,
            "labels": list(labels),
            "input_size": input_size,
            "options": {
                "prompts": list(prompts)
                if prompts is not None
                else [PROMPT_TEMPLATE.format(label=label) for label in labels]
            },
        },
        directory / f"{name}.yaml",
    )
    assert isinstance(manifest, ZeroShotManifest)
    return manifest


def build_clip(
    directory: Path,
    *,
    size: Literal["tiny", "base"] = "tiny",
    name: str | None = None,
    labels: tuple[str, ...] | list[str] = DEFAULT_LABELS,
    prompts: list[str] | None = None,
) -> Path:
    """Write ``directory/<name>/`` (the checkpoint) and ``directory/<name>.yaml``; return
    the manifest's path."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    spec = _SIZES[size]
    name = name or f"clip-zero-shot-{size}"
    directory = Path(directory)
    manifest = zero_shot_manifest(
        directory,
        name,
        "transformers",
        f"CLIP ({size}) with random weights, for tests and benchmarks",
        labels,
        prompts,
        spec["image_size"],
    )

    tokenizer = _tokenizer()
    side = spec["image_size"]
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side}
    )
    config = CLIPConfig(
        text_config={
            **spec["text"],
            "vocab_size": len(tokenizer),
            "max_position_embeddings": CONTEXT_LENGTH,
            "projection_dim": spec["projection_dim"],
            # The text tower pools at the first EOS token; it must be our tokenizer's.
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            **spec["vision"],
            "image_size": side,
            "projection_dim": spec["projection_dim"],
        },
        projection_dim=spec["projection_dim"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = CLIPModel(config).eval()

    target = directory / name
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(target)
    path = directory / f"{name}.yaml"
    dump_manifest(manifest, path)
    return path
