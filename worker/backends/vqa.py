"""Visual question answering with a vision-language model on transformers (MedGemma 4B,
Gemma3ForConditionalGeneration): a yes/no question about each image, answered with a
verdict and a sentence of explanation. Greedy decoding, one batched ``generate`` per
microbatch; prompts of different lengths are padded on the left so that every row's
answer starts in the same column."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from functools import partial
from importlib.util import find_spec
from typing import Any, Literal

import numpy as np
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from hepato.common.exceptions import BackendError
from hepato.common.manifest import VqaManifest
from hepato.common.results import TaskResult, VqaResult
from hepato.worker.backends.base import Runtime, require_weights
from hepato.worker.backends.calls import Prediction, predict_whole
from hepato.worker.backends.torch_runtime import place

log = logging.getLogger(__name__)

Verdict = Literal["yes", "no"]

# A leading yes/no, after any markdown (bold, headings, quotes, bullets) and an optional
# "Answer:" label, as a whole word; then the punctuation that separates it from the rest.
_VERDICT = re.compile(
    r"""^[\s*_#>`"'\-]*(?:answer\s*[:\-]?[\s*_`"']*)?(yes|no)\b[\s*_`"'.,:;!\-\u2013\u2014]*""",
    re.IGNORECASE,
)


def parse_answer(text: str) -> tuple[Verdict | None, str]:
    """Split an answer into its verdict and its explanation. Only a leading yes/no counts
    (a "no" later in the sentence is part of the explanation); with none, the verdict is
    None and the explanation is the whole (stripped) text."""
    match = _VERDICT.match(text)
    if match is None:
        return None, text.strip()
    verdict: Verdict = "yes" if match.group(1).lower() == "yes" else "no"
    return verdict, text[match.end() :].strip()


# What transformers needs to load a model in 8-bit with bitsandbytes (hepato[int8-gpu]).
EIGHT_BIT_PACKAGES = ("bitsandbytes", "accelerate")


def loads_in_8bit(manifest: VqaManifest, device: torch.device) -> bool:
    """8-bit weights are for a GPU: bitsandbytes' int8 matmul is CUDA's."""
    return manifest.load_in_8bit and device.type == "cuda"


def pretrained_kwargs(
    manifest: VqaManifest, device: torch.device, dtype: torch.dtype
) -> dict[str, Any]:
    """``from_pretrained``'s keyword arguments. In 8-bit, bitsandbytes quantizes the linear
    layers as they load and transformers places the model on ``device`` itself (an 8-bit
    model cannot be moved with ``.to`` afterwards); the other layers are in ``dtype``."""
    kwargs: dict[str, Any] = {"local_files_only": True, "dtype": dtype}
    if loads_in_8bit(manifest, device):
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        # The whole model on the one GPU: "cuda" alone means the first, as torch reads it.
        kwargs["device_map"] = {"": device.index or 0}
    return kwargs


def require_8bit_packages(manifest: VqaManifest) -> None:
    missing = [name for name in EIGHT_BIT_PACKAGES if find_spec(name) is None]
    if missing:
        raise BackendError(
            f"model {manifest.name!r} has load_in_8bit on a GPU, which needs "
            f"{' and '.join(missing)}: install hepato[int8-gpu]"
        )


class VisionLanguageQa:
    """A checkpoint directory loadable by AutoProcessor and AutoModelForImageTextToText."""

    def __init__(self, manifest: VqaManifest, runtime: Runtime) -> None:
        self.manifest = manifest
        self.options = manifest.options
        path = require_weights(manifest)
        self.device, self.dtype = place(manifest, runtime)
        eight_bit = loads_in_8bit(manifest, self.device)
        if manifest.load_in_8bit and not eight_bit:
            log.info(
                "model %s: load_in_8bit is for a GPU; ignored on %s", manifest.name, self.device
            )
        if eight_bit:
            require_8bit_packages(manifest)
        # 8-bit matmuls take half-precision activations, as float16 does.
        if self.dtype == torch.float16 or eight_bit:
            # Gemma 3 overflows in float16 (its activations exceed 65504); bfloat16 has
            # float32's range and is what MedGemma is trained and shipped in.
            self.dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.processor: Any = AutoProcessor.from_pretrained(path, local_files_only=True)
        # Batched generation appends to the right end of every row.
        self.processor.tokenizer.padding_side = "left"
        model: Any = AutoModelForImageTextToText.from_pretrained(
            path, **pretrained_kwargs(manifest, self.device, self.dtype)
        )
        self.model: Any = (model if eight_bit else model.to(self.device)).eval()
        generation = self.model.generation_config
        eos = generation.eos_token_id
        self.eos_ids: set[int] = set(eos if isinstance(eos, list) else [eos] if eos else [])
        self._prompts: dict[str, tuple[str, bool]] = {}
        log.info(
            "loaded %s: backend transformers (%s), device %s, dtype %s%s",
            manifest.name,
            type(self.model).__name__,
            self.device,
            str(self.dtype).removeprefix("torch."),
            ", 8-bit linear layers (bitsandbytes)" if eight_bit else "",
        )

    def question_text(self, question: str | None = None) -> str:
        """The question as put to the model (and recorded in the result)."""
        return self.options.question_template.format(question=question or self.options.question)

    def prompt(self, question: str | None = None) -> tuple[str, bool]:
        """The model's prompt for one image and whether the tokenizer must still add its
        special tokens (a chat template writes <bos> itself)."""
        text = self.question_text(question)
        if text not in self._prompts:
            if getattr(self.processor, "chat_template", None):
                content = [{"type": "image"}, {"type": "text", "text": text}]
                rendered = self.processor.apply_chat_template(
                    [{"role": "user", "content": content}],
                    add_generation_prompt=True,
                    tokenize=False,
                )
            else:
                image_token = getattr(self.processor, "image_token", None) or "<image>"
                rendered = f"{image_token}\n{text}"
            bos = self.processor.tokenizer.bos_token
            self._prompts[text] = (rendered, not (bos and rendered.startswith(bos)))
        return self._prompts[text]

    def predict(
        self, images: list[np.ndarray], questions: Sequence[str | None] | None = None
    ) -> Prediction[TaskResult]:
        """``questions``, when given, has one entry per image; None asks the manifest's."""
        asked: list[str | None] = [None] * len(images) if questions is None else list(questions)
        if len(asked) != len(images):
            raise ValueError(f"{len(asked)} questions for {len(images)} images")
        return predict_whole(images, partial(self._answer, questions=asked))

    def _answer(self, images: list[np.ndarray], questions: list[str | None]) -> list[TaskResult]:
        out: list[TaskResult] = []
        for tokens, question in zip(self.generate(images, questions), questions, strict=True):
            answer = self.processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()
            verdict, explanation = parse_answer(answer)
            out.append(
                VqaResult(
                    question=self.question_text(question),
                    answer=answer,
                    verdict=verdict,
                    explanation=explanation,
                )
            )
        return out

    def generate(
        self, images: list[np.ndarray], questions: Sequence[str | None] | None = None
    ) -> list[list[int]]:
        """The new token ids per image, up to and including the first end-of-answer
        token: one greedy ``generate`` call for the whole list."""
        if not images:
            return []
        asked: list[str | None] = [None] * len(images) if questions is None else list(questions)
        prompts = [self.prompt(q) for q in asked]
        # One flag for the batch: every prompt comes from the same template.
        add_special = prompts[0][1]
        inputs = self.processor(
            text=[p for p, _ in prompts],
            images=[[image] for image in images],
            padding=True,
            return_tensors="pt",
            add_special_tokens=add_special,
        ).to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        with torch.inference_mode():
            generated = self.model.generate(
                **inputs, do_sample=False, max_new_tokens=self.options.max_new_tokens
            )
        new = generated[:, inputs["input_ids"].shape[1] :].tolist()
        return [self._until_eos(row) for row in new]

    def _until_eos(self, row: list[int]) -> list[int]:
        # Rows that finish early are filled with padding up to the longest.
        for i, token in enumerate(row):
            if token in self.eos_ids:
                return row[: i + 1]
        return row
