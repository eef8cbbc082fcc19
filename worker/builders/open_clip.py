"""A model in open_clip's layout as BiomedCLIP is published (a timm ViT image tower, a
BERT text tower from transformers, an MLP text projection), random seeded weights, built
from configuration with no download, with its zero-shot manifest.

Written as the open_clip backend reads it: ``open_clip_config.json`` (whose text tower
names a hub repository, as BiomedCLIP's does), ``open_clip_pytorch_model.bin`` (the
state dict open_clip's ``create_model`` makes) and ``text/`` (the BERT config and a small
WordPiece tokenizer: single characters and the prompts' words, so any prompt tokenizes).

"tiny" is for tests: timm's ``test_vit`` (160 px, 64 wide, 6 layers) and a 2-layer
32-wide BERT. "base" has BiomedCLIP's dimensions: ViT-B/16 at 224 px, BERT-base (768
wide, 12 layers, 30,522 ids, 256-token context), 512-d embeddings."""

from __future__ import annotations

import json
import os
import re
import string
from pathlib import Path
from typing import Any, Literal

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from hepato.common.manifest import dump_manifest
from hepato.worker.builders.zero_shot import DEFAULT_LABELS, zero_shot_manifest

SEED = 0
# open_clip's (and BiomedCLIP's) image normalisation: OpenAI CLIP's mean and std.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "embed_dim": 16,
        "timm_model_name": "test_vit",
        "image_size": 160,
        "context_length": 64,
        "hf_model_name": "hepato/tiny-bert-uncased",
        "bert": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 64,
        },
    },
    "base": {
        "embed_dim": 512,
        "timm_model_name": "vit_base_patch16_224",
        "image_size": 224,
        "context_length": 256,
        "hf_model_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
        "bert": {
            "vocab_size": 30522,
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "max_position_embeddings": 512,
        },
    },
}


def open_clip_config(size: Literal["tiny", "base"]) -> dict[str, Any]:
    """``open_clip_config.json`` as BiomedCLIP publishes it, at ``size``."""
    spec = _SIZES[size]
    return {
        "model_cfg": {
            "embed_dim": spec["embed_dim"],
            "vision_cfg": {
                "timm_model_name": spec["timm_model_name"],
                "timm_model_pretrained": False,
                # "": the ViT's own class-token pooling; then a linear projection.
                "timm_pool": "",
                "timm_proj": "linear",
                "image_size": spec["image_size"],
            },
            "text_cfg": {
                "hf_model_name": spec["hf_model_name"],
                "hf_tokenizer_name": spec["hf_model_name"],
                "hf_proj_type": "mlp",
                "hf_pooler_type": "cls_last_hidden_state_pooler",
                "context_length": spec["context_length"],
            },
        },
        "preprocess_cfg": {
            "mean": list(MEAN),
            "std": list(STD),
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        },
    }


def _vocabulary(prompts: list[str]) -> list[str]:
    """WordPiece: whole words of the prompts, then every character alone and as a
    continuation, so an unseen word still tokenizes (to characters)."""
    words = sorted({w for p in prompts for w in re.findall(r"[a-z0-9]+", p.lower())})
    chars = [*string.ascii_lowercase, *string.digits]
    singles = [c for c in [*chars, *string.punctuation] if c not in words]
    return [*SPECIAL_TOKENS, *words, *singles, *(f"##{c}" for c in chars)]


def _write_text_tower(target: Path, size: Literal["tiny", "base"], prompts: list[str]) -> None:
    from transformers import BertConfig, BertTokenizer

    vocab = _vocabulary(prompts)
    target.mkdir(parents=True, exist_ok=True)
    (target / "vocab.txt").write_text("".join(f"{t}\n" for t in vocab), encoding="utf-8")
    spec = _SIZES[size]
    bert = {"vocab_size": len(vocab), **spec["bert"]}
    BertConfig(**bert, pad_token_id=vocab.index("[PAD]")).save_pretrained(target)
    tokenizer = BertTokenizer(
        vocab={t: i for i, t in enumerate(vocab)},
        do_lower_case=True,
        model_max_length=spec["context_length"],
    )
    tokenizer.save_pretrained(target)


def build_open_clip(
    directory: Path,
    *,
    size: Literal["tiny", "base"] = "tiny",
    name: str | None = None,
    labels: tuple[str, ...] | list[str] = DEFAULT_LABELS,
    prompts: list[str] | None = None,
) -> Path:
    """Write ``directory/<name>/`` (the open_clip model) and ``directory/<name>.yaml``;
    return the manifest's path."""
    import torch

    from hepato.worker.backends.open_clip import CONFIG_FILE, TEXT_DIR, create

    spec = _SIZES[size]
    name = name or f"open-clip-zero-shot-{size}"
    directory = Path(directory)
    manifest = zero_shot_manifest(
        directory,
        name,
        "open_clip",
        f"open_clip model in BiomedCLIP's layout ({size}) with random weights, for tests "
        "and benchmarks",
        labels,
        prompts,
        spec["image_size"],
    )

    target = directory / name
    target.mkdir(parents=True, exist_ok=True)
    (target / CONFIG_FILE).write_text(
        json.dumps(open_clip_config(size), indent=2) + "\n", encoding="utf-8"
    )
    _write_text_tower(target / TEXT_DIR, size, manifest.options.prompts)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        # The structure open_clip itself builds from this config, so the keys are its own.
        model = create(target, load_weights=False)
    torch.save(model.state_dict(), target / "open_clip_pytorch_model.bin")
    path = directory / f"{name}.yaml"
    dump_manifest(manifest, path)
    return path
