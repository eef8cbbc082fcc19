"""Zero-shot classification with a model in open_clip's layout (BiomedCLIP as published),
loaded from disk only: a timm vision tower and a Hugging Face text tower whose hub names
are replaced by a local copy inside the model's directory.

The directory (the manifest's ``weights``)::

    open_clip_config.json          model_cfg (+ preprocess_cfg), as published
    open_clip_pytorch_model.bin    the whole model's state dict (or .safetensors)
    text/                          the text tower's Hugging Face files, no weights needed:
        config.json                the tower's config (BiomedBERT's, for BiomedCLIP)
        vocab.txt or tokenizer.json + tokenizer_config.json ...

``text_cfg.hf_model_name`` and ``hf_tokenizer_name`` name hub repositories; the loader
points both at ``text/`` and never asks the hub for anything. The prompts' embeddings are
computed once at load; a batch runs the image tower only."""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path
from typing import Any

# Only effective if nothing imported huggingface_hub before this module; the real guard
# is that every path handed to transformers below is a local directory.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import open_clip
import torch
from open_clip.tokenizer import DEFAULT_CONTEXT_LENGTH, HFTokenizer
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image
from torchvision.transforms import Normalize, ToTensor

from hepato.common.exceptions import BackendError, ModelWeightsNotFound
from hepato.common.manifest import ZeroShotManifest
from hepato.common.results import ZeroShotResult
from hepato.worker.backends.base import Runtime, require_weights
from hepato.worker.backends.calls import Prediction, predict_whole
from hepato.worker.backends.torch_runtime import place, to_device
from hepato.worker.backends.zero_shot import log_loaded, prompt_matrix, score_images

log = logging.getLogger(__name__)

CONFIG_FILE = "open_clip_config.json"
# open_clip's own preference among the names a published checkpoint has.
WEIGHTS_FILES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
)
TEXT_DIR = "text"
TEXT_CONFIG = "config.json"
# Either makes AutoTokenizer work offline (vocab.txt: a BERT WordPiece vocabulary).
TEXT_VOCABULARIES = ("tokenizer.json", "vocab.txt")


def weights_file(directory: Path) -> Path:
    """The checkpoint open_clip would pick in ``directory``."""
    for name in WEIGHTS_FILES:
        if (directory / name).is_file():
            return directory / name
    raise ModelWeightsNotFound(f"{directory}: no open_clip weights ({' or '.join(WEIGHTS_FILES)})")


def local_config(directory: Path) -> dict[str, Any]:
    """``open_clip_config.json`` with the text tower's hub names replaced by the local
    ``text/`` directory; every file the load needs checked first, so a missing one is
    named here rather than sent to the hub as a download."""
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise ModelWeightsNotFound(f"{directory}: no {CONFIG_FILE} (open_clip's layout)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        text_cfg = config["model_cfg"]["text_cfg"]
    except (ValueError, KeyError, TypeError) as exc:
        raise BackendError(f"{path}: not an open_clip config with model_cfg.text_cfg") from exc
    if not text_cfg.get("hf_model_name"):
        raise BackendError(
            f"{path}: the open_clip backend serves models with a Hugging Face text tower "
            "(text_cfg.hf_model_name, as BiomedCLIP has); this one has none"
        )
    text = directory / TEXT_DIR
    if not (text / TEXT_CONFIG).is_file():
        raise ModelWeightsNotFound(
            f"{directory}: no {TEXT_DIR}/{TEXT_CONFIG}: the text tower "
            f"{text_cfg['hf_model_name']!r} is read from {text}/ (its config.json and "
            "tokenizer files), never from the hub"
        )
    if not any((text / name).is_file() for name in TEXT_VOCABULARIES):
        raise ModelWeightsNotFound(
            f"{directory}: no {TEXT_DIR}/{' or '.join(TEXT_VOCABULARIES)}: the tokenizer "
            f"{text_cfg.get('hf_tokenizer_name') or text_cfg['hf_model_name']!r} is read "
            f"from {text}/, never from the hub"
        )
    config = copy.deepcopy(config)
    local = config["model_cfg"]["text_cfg"]
    local["hf_model_name"] = str(text)
    local["hf_tokenizer_name"] = str(text)
    # The checkpoint holds the text tower's weights; text/ needs none of its own.
    local["hf_model_pretrained"] = False
    return config


def create(directory: Path, *, load_weights: bool = True) -> torch.nn.Module:
    """The model as open_clip's ``create_model`` builds it from a local directory, with
    the local text tower; with ``load_weights`` its checkpoint loaded strictly."""
    config = local_config(directory)
    if load_weights:
        weights_file(directory)
    return open_clip.create_model(
        f"local-dir:{directory}",
        load_weights=load_weights,
        require_pretrained=load_weights,
        pretrained_image=False,
        pretrained_text=False,
        text_cfg=config["model_cfg"]["text_cfg"],
        device="cpu",
        precision="fp32",
    )


def tokenizer(directory: Path) -> HFTokenizer:
    """open_clip's tokenizer for the text tower, as ``get_tokenizer`` makes it, from
    ``text/``."""
    text_cfg = local_config(directory)["model_cfg"]["text_cfg"]
    return HFTokenizer(
        text_cfg["hf_tokenizer_name"],
        context_length=text_cfg.get("context_length", DEFAULT_CONTEXT_LENGTH),
        tokenizer_mode=text_cfg.get("tokenizer_mode"),
        local_files_only=True,
        **(text_cfg.get("tokenizer_kwargs") or {}),
    )


class Preprocess:
    """open_clip's eval transform for the model's preprocess config, split so that only
    the resize and crop run per image (PIL, as open_clip does); scaling and normalising
    run once on the whole batch, on the model's device."""

    def __init__(self, preprocess_cfg: dict[str, Any]) -> None:
        steps = list(image_transform_v2(PreprocessCfg(**preprocess_cfg), is_train=False).transforms)
        cut = next((i for i, t in enumerate(steps) if isinstance(t, ToTensor)), None)
        if cut is None or cut != len(steps) - 2 or not isinstance(steps[-1], Normalize):
            raise BackendError(
                f"open_clip's eval transform is not (geometry, ToTensor, Normalize): {steps}"
            )
        self.geometry = steps[:cut]
        self.mean = torch.tensor(steps[-1].mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(steps[-1].std, dtype=torch.float32).view(1, 3, 1, 1)

    def pixels(self, images: list[np.ndarray]) -> torch.Tensor:
        """RGB uint8 arrays (H, W, 3) of any sizes -> one uint8 batch (N, 3, S, S)."""
        resized = []
        for image in images:
            picture: Any = Image.fromarray(np.ascontiguousarray(image))
            for step in self.geometry:
                picture = step(picture)
            resized.append(np.asarray(picture, dtype=np.uint8))
        return torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2)

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """The uint8 batch as ToTensor and Normalize make it, in float32."""
        mean, std = self.mean.to(pixels.device), self.std.to(pixels.device)
        return (pixels.float() / 255.0 - mean) / std


class OpenClipZeroShot:
    def __init__(self, manifest: ZeroShotManifest, runtime: Runtime) -> None:
        self.manifest = manifest
        directory = require_weights(manifest)
        if not directory.is_dir():
            raise ModelWeightsNotFound(
                f"model {manifest.name!r}: backend open_clip needs a directory "
                f"({CONFIG_FILE}, weights, {TEXT_DIR}/), not the file {directory}"
            )
        self.device, self.dtype = place(manifest, runtime)
        # Any: open_clip's model classes are untyped (encode_image, logit_scale).
        model: Any = create(directory).eval()
        self.model = model.to(self.device, self.dtype)
        self.preprocess = Preprocess(open_clip.get_model_preprocess_cfg(model))
        size = self.preprocess_size
        if size != manifest.input_size:
            # Slides are tiled at input_size; the model resizes each tile to its own size.
            log.warning(
                "model %s: input_size %d but the model's own input is %d px",
                manifest.name,
                manifest.input_size,
                size,
            )
        self.prompts = list(manifest.options.prompts)
        self.labels = list(manifest.labels)
        with torch.inference_mode():
            tokens = tokenizer(directory)(self.prompts).to(self.device)
            self.text = prompt_matrix(self.model.encode_text(tokens))
            # A logit_bias (SigLIP) would not change a softmax over prompts.
            self.scale = float(self.model.logit_scale.float().exp())
        log_loaded(manifest, self.model, self.device, self.dtype)

    @property
    def preprocess_size(self) -> int:
        size = open_clip.get_model_preprocess_cfg(self.model)["size"]
        return int(size if isinstance(size, int) else size[0])

    def predict(self, images: list[np.ndarray]) -> Prediction[ZeroShotResult]:
        # Every image is resized and cropped to one input, so a batch is one call.
        return predict_whole(images, self._run)

    def _run(self, images: list[np.ndarray]) -> list[ZeroShotResult]:
        if not images:
            return []
        pixels = self.preprocess.pixels(images)
        with torch.inference_mode():
            # uint8 crosses to the device (a quarter of float32's bytes), then is scaled.
            batch = self.preprocess.normalise(to_device(pixels, self.device)).to(self.dtype)
            image = self.model.encode_image(batch)
            return score_images(image, self.text, self.scale, self.labels, self.prompts)
