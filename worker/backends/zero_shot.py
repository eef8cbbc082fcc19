"""Zero-shot classification with a CLIP-style model from a transformers checkpoint
directory: each image is scored against the manifest's prompts, one per label.

The prompts never change between batches, so their embeddings are computed once at load;
a batch runs the image tower only."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from transformers import AutoModel, AutoProcessor

from hepato.common.manifest import ZeroShotManifest
from hepato.common.results import PromptScore, ZeroShotResult
from hepato.worker.backends.base import Runtime, require_weights
from hepato.worker.backends.calls import Prediction, predict_whole
from hepato.worker.backends.torch_runtime import place, to_device

log = logging.getLogger(__name__)


def _embeddings(output: Any) -> torch.Tensor:
    """transformers 4.x returns the projected embeddings; 5.x an output object that holds
    them as ``pooler_output``."""
    if isinstance(output, torch.Tensor):
        return output
    return output.pooler_output


def log_loaded(manifest: ZeroShotManifest, model: Any, device: Any, dtype: Any) -> None:
    log.info(
        "loaded %s (backend %s, %s) on %s, %s, %d prompts",
        manifest.name,
        manifest.backend,
        type(model).__name__,
        device,
        str(dtype).removeprefix("torch."),
        len(manifest.options.prompts),
    )


def prompt_matrix(text: torch.Tensor) -> torch.Tensor:
    """The prompts' embeddings (prompts, embedding) as the unit columns (embedding,
    prompts) that every batch multiplies by: similarities are then one matmul."""
    return torch.nn.functional.normalize(text.float(), dim=-1).T.contiguous()


def score_images(
    image: torch.Tensor,
    text: torch.Tensor,
    scale: float,
    labels: list[str],
    prompts: list[str],
) -> list[ZeroShotResult]:
    """One result per row of ``image`` (image embeddings, any norm) against the
    ``prompt_matrix``: cosine similarities and their softmax at the model's logit scale,
    every prompt, most probable first. Shared by every zero-shot backend."""
    image = torch.nn.functional.normalize(image.float(), dim=-1)
    similarity = image @ text
    probability = torch.softmax(scale * similarity, dim=-1)
    return [
        _result(p, s, labels, prompts)
        for p, s in zip(probability.cpu().numpy(), similarity.cpu().numpy(), strict=True)
    ]


def _result(
    probability: np.ndarray, similarity: np.ndarray, labels: list[str], prompts: list[str]
) -> ZeroShotResult:
    order = np.argsort(-probability, kind="stable")
    return ZeroShotResult(
        scores=[
            PromptScore(
                label=labels[i],
                prompt=prompts[i],
                probability=float(probability[i]),
                similarity=float(similarity[i]),
            )
            for i in order
        ]
    )


class ClipZeroShot:
    def __init__(self, manifest: ZeroShotManifest, runtime: Runtime) -> None:
        self.manifest = manifest
        path = require_weights(manifest)
        self.device, self.dtype = place(manifest, runtime)
        # Explicit: transformers 5 otherwise loads in the checkpoint's own dtype.
        self.processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True, dtype=self.dtype)
        self.model.to(self.device).eval()
        self.prompts = list(manifest.options.prompts)
        self.labels = list(manifest.labels)
        with torch.inference_mode():
            tokens = self.processor.tokenizer(
                self.prompts,
                padding=True,
                truncation=True,
                max_length=self.model.config.text_config.max_position_embeddings,
                return_tensors="pt",
            ).to(self.device)
            self.text = prompt_matrix(_embeddings(self.model.get_text_features(**tokens)))
            self.scale = float(self.model.logit_scale.float().exp())
        log_loaded(manifest, self.model, self.device, self.dtype)

    def predict(self, images: list[np.ndarray]) -> Prediction[ZeroShotResult]:
        # Every image is resized and cropped to one input, so a batch is one call.
        return predict_whole(images, self._run)

    def _run(self, images: list[np.ndarray]) -> list[ZeroShotResult]:
        if not images:
            return []
        pixels = self.processor.image_processor(
            images=images, return_tensors="pt", input_data_format="channels_last"
        )["pixel_values"]
        with torch.inference_mode():
            pixels = to_device(pixels, self.device, self.dtype)
            image = _embeddings(self.model.get_image_features(pixel_values=pixels))
            return score_images(image, self.text, self.scale, self.labels, self.prompts)
