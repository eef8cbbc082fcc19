"""A small vision-language model of MedGemma's own architecture (Gemma 3: a SigLIP vision
tower, an average-pooling projector and a Gemma 3 decoder), random weights, with a
tokenizer, image processor and chat template laid out as the real checkpoint has them, so
that AutoProcessor and AutoModelForImageTextToText load it offline the same way."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessor,
    Gemma3Processor,
    Gemma3TextConfig,
    GemmaTokenizer,
    GenerationConfig,
    SiglipVisionConfig,
)

from hepato.common.manifest import VqaManifest, VqaOptions, dump_manifest

QUESTION = "Is there steatosis in this liver biopsy?"

# Gemma's ids for the first five; the rest as named in Gemma 3's tokenizer.
SPECIAL_TOKENS = (
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<mask>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
)
IMAGE_TOKENS = {
    "boi_token": "<start_of_image>",
    "eoi_token": "<end_of_image>",
    "image_token": "<image_soft_token>",
}

# Gemma 3's chat template, reduced to what a user turn with images and text needs.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

# What the BPE merges are learnt from: the kind of text the prompts and answers hold.
CORPUS = (
    "Is there steatosis in this liver biopsy? Answer yes or no, then explain in one sentence.",
    "Is there fibrosis in this liver biopsy? Is there inflammation? Is there ballooning?",
    "Yes, the hepatocytes contain large fat droplets that push the nucleus aside.",
    "No, because the lobules look normal and the portal tracts are not expanded.",
    "Yes. Macrovesicular steatosis involves more than a third of the hepatocytes.",
    "No. The sinusoids, central veins and bile ducts show no abnormality.",
    "Yes - bridging fibrosis links portal tracts with collagen on the trichrome stain.",
    "No, there is no lymphocytic infiltrate, necrosis or Mallory-Denk bodies.",
    "The image shows a hematoxylin and eosin stained section of liver tissue at low power.",
    "Zone 3 hepatocytes are swollen with clear cytoplasm, suggesting ballooning degeneration.",
)


@dataclass(frozen=True)
class _Size:
    image: int
    patch: int
    image_tokens: int  # a square; the projector average-pools patches down to it
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    text_hidden: int
    text_layers: int
    text_heads: int
    head_dim: int
    max_new_tokens: int
    dtype: torch.dtype


SIZES: dict[str, _Size] = {
    "tiny": _Size(
        image=32,
        patch=8,
        image_tokens=4,
        vision_hidden=32,
        vision_layers=1,
        vision_heads=2,
        text_hidden=32,
        text_layers=2,
        text_heads=2,
        head_dim=16,
        max_new_tokens=8,
        dtype=torch.float32,
    ),
    # About 150M parameters: a SigLIP-B/14 tower at 224 px and a 12-layer decoder of Gemma
    # 3 270M's width. Stored in bfloat16 as MedGemma is.
    "base": _Size(
        image=224,
        patch=14,
        image_tokens=64,
        vision_hidden=768,
        vision_layers=12,
        vision_heads=12,
        text_hidden=640,
        text_layers=12,
        text_heads=4,
        head_dim=256,
        max_new_tokens=48,
        dtype=torch.bfloat16,
    ),
}


def build_tokenizer() -> GemmaTokenizer:
    """A byte-fallback BPE tokenizer of Gemma's kind, its merges learnt from CORPUS (the
    trainer is deterministic for a given corpus)."""
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.normalizer = normalizers.Replace(" ", "▁")
    # Learnt within words only, so that tokens are words and pieces of words, as in Gemma.
    bpe.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=600, show_progress=False))
    learnt = json.loads(bpe.to_str())["model"]
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    # Byte tokens let any text (accents, emoji) through without <unk>.
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for token in sorted(learnt["vocab"], key=learnt["vocab"].get):
        vocab.setdefault(token, len(vocab))
    # The BPE model takes merges as pairs (the annotation says strings).
    merges: Any = [tuple(pair) for pair in learnt["merges"]]
    tokenizer = GemmaTokenizer(
        vocab=vocab,
        merges=merges,
        extra_special_tokens=IMAGE_TOKENS,
        padding_side="left",
    )
    tokenizer.add_special_tokens(
        {"extra_special_tokens": ["<start_of_turn>", "<end_of_turn>"]},
        replace_extra_special_tokens=False,
    )
    return tokenizer


def token_ids(tokenizer: GemmaTokenizer) -> dict[str, int]:
    ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    assert isinstance(ids, list)
    return dict(zip(SPECIAL_TOKENS, ids, strict=True))


def _config(size: _Size, tokenizer: GemmaTokenizer) -> Gemma3Config:
    ids = token_ids(tokenizer)
    text = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.text_hidden,
        intermediate_size=size.text_hidden * 4,
        num_hidden_layers=size.text_layers,
        num_attention_heads=size.text_heads,
        num_key_value_heads=1,
        head_dim=size.head_dim,
        query_pre_attn_scalar=size.head_dim,
        # Wider than any prompt here: a window shorter than a left-padded prompt would
        # see different tokens in a batch than alone.
        sliding_window=1024,
        layer_types=[
            "full_attention" if (i + 1) % 2 == 0 else "sliding_attention"
            for i in range(size.text_layers)
        ],
        max_position_embeddings=4096,
        pad_token_id=ids["<pad>"],
        eos_token_id=ids["<eos>"],
        bos_token_id=ids["<bos>"],
    )
    vision = SiglipVisionConfig(
        hidden_size=size.vision_hidden,
        intermediate_size=size.vision_hidden * 4,
        num_hidden_layers=size.vision_layers,
        num_attention_heads=size.vision_heads,
        image_size=size.image,
        patch_size=size.patch,
        vision_use_head=False,
    )
    return Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=size.image_tokens,
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
    )


def build_vqa(
    directory: Path,
    *,
    size: Literal["tiny", "base"] = "tiny",
    name: str | None = None,
    seed: int = 0,
) -> Path:
    """Write directory/<name>/ (a Gemma 3 checkpoint with its processor) and
    directory/<name>.yaml; return the manifest's path."""
    spec = SIZES[size]
    name = name or f"vqa-{size}"
    target = directory / name
    target.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer()
    config = _config(spec, tokenizer)
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).eval()
    # The projector starts at zero in transformers (to be trained); random weights there
    # keep the answer dependent on the image.
    with torch.no_grad():
        projector = model.model.multi_modal_projector.mm_input_projection_weight
        projector.normal_(0.0, 0.02)  # transformers' initializer_range
    ids = token_ids(tokenizer)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<bos>"],
        pad_token_id=ids["<pad>"],
        # As MedGemma: a turn ends generation as well as <eos>.
        eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]],
        do_sample=False,
    )
    model.to(spec.dtype).save_pretrained(target)

    image_processor = Gemma3ImageProcessor(
        size={"height": spec.image, "width": spec.image},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
        image_seq_length=spec.image_tokens,
    )
    processor.save_pretrained(target)

    manifest = VqaManifest(
        name=name,
        task="vqa",
        backend="transformers",
        description=f"Gemma 3 vision-language model, {size}, random weights (seed {seed})",
        weights=Path(name),
        input_size=spec.image,
        options=VqaOptions(question=QUESTION, max_new_tokens=spec.max_new_tokens),
    )
    path = directory / f"{name}.yaml"
    dump_manifest(manifest, path)
    return path
