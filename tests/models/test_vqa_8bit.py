"""load_in_8bit for the vision-language models: on a GPU, bitsandbytes' 8-bit weights placed
by transformers; on the CPU, ignored (the model loads and answers as without it). The GPU
path is checked through the arguments it gives from_pretrained, without a GPU."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import BitsAndBytesConfig

from hepato.common.exceptions import BackendError, InvalidManifest, ModelWeightsNotFound
from hepato.common.manifest import VqaManifest, load_manifest, parse_manifest
from hepato.common.results import VqaResult
from hepato.worker.backends import vqa
from hepato.worker.backends.base import Runtime
from hepato.worker.backends.vqa import VisionLanguageQa, pretrained_kwargs
from hepato.worker.builders.vqa import build_vqa

CPU = Runtime(device="cpu", threads=2)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> VqaManifest:
    loaded = load_manifest(build_vqa(tmp_path_factory.mktemp("vqa8"), size="tiny"))
    assert isinstance(loaded, VqaManifest)
    return loaded


def eight_bit(manifest: VqaManifest) -> VqaManifest:
    return manifest.model_copy(update={"load_in_8bit": True})


def fields(**extra: Any) -> dict[str, Any]:
    return {
        "name": "medgemma",
        "task": "vqa",
        "backend": "transformers",
        "weights": "medgemma-4b-it",
        "options": {"question": "Is there steatosis?"},
        **extra,
    }


def test_manifest_parses_load_in_8bit() -> None:
    parsed = parse_manifest(fields(load_in_8bit=True))
    assert isinstance(parsed, VqaManifest) and parsed.load_in_8bit
    default = parse_manifest(fields())
    assert isinstance(default, VqaManifest) and not default.load_in_8bit
    with pytest.raises(InvalidManifest, match="load_in_8bit"):
        parse_manifest(fields(load_in_8bit="sometimes"))
    # Only vision-language models have it.
    with pytest.raises(InvalidManifest, match="load_in_8bit"):
        parse_manifest(
            {"name": "d", "task": "detect", "backend": "onnx", "weights": "d.onnx",
             "labels": ["a"], "load_in_8bit": True}
        )  # fmt: skip


@pytest.mark.parametrize(("device", "index"), [("cuda", 0), ("cuda:1", 1)])
def test_gpu_kwargs_ask_bitsandbytes_for_8bit_on_that_gpu(
    manifest: VqaManifest, device: str, index: int
) -> None:
    kwargs = pretrained_kwargs(eight_bit(manifest), torch.device(device), torch.bfloat16)
    config = kwargs.pop("quantization_config")
    assert isinstance(config, BitsAndBytesConfig)
    assert config.load_in_8bit and not config.load_in_4bit
    assert kwargs == {"local_files_only": True, "dtype": torch.bfloat16, "device_map": {"": index}}


@pytest.mark.parametrize(("flag", "device"), [(False, "cuda"), (True, "cpu"), (False, "cpu")])
def test_no_quantization_without_the_flag_or_on_the_cpu(
    manifest: VqaManifest, flag: bool, device: str
) -> None:
    m = manifest.model_copy(update={"load_in_8bit": flag})
    assert pretrained_kwargs(m, torch.device(device), torch.float32) == {
        "local_files_only": True,
        "dtype": torch.float32,
    }


def test_cpu_ignores_the_flag_and_answers_as_without_it(
    manifest: VqaManifest, caplog: pytest.LogCaptureFixture
) -> None:
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (40, 56, 3), dtype=np.uint8) for _ in range(2)]
    with caplog.at_level(logging.INFO, logger=vqa.__name__):
        model = VisionLanguageQa(eight_bit(manifest), CPU)
    assert "load_in_8bit is for a GPU; ignored on cpu" in caplog.text
    assert model.dtype == torch.float32
    assert not getattr(model.model, "is_loaded_in_8bit", False)
    results, _, _ = model.predict(images)
    assert all(isinstance(r, VqaResult) and r.answer for r in results)
    assert model.generate(images) == VisionLanguageQa(manifest, CPU).generate(images)


def test_gpu_without_bitsandbytes_is_a_clear_backend_error(
    manifest: VqaManifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As on a GPU worker installed without hepato[int8-gpu] (whatever this machine has).
    monkeypatch.setattr(vqa, "find_spec", lambda name: None)
    with pytest.raises(
        BackendError, match=r"needs bitsandbytes and accelerate: install hepato\[int8-gpu\]"
    ):
        VisionLanguageQa(eight_bit(manifest), Runtime(device="cuda"))


def test_missing_weights_still_refused_before_anything_loads(
    manifest: VqaManifest, tmp_path: Path
) -> None:
    missing = eight_bit(manifest).model_copy(
        update={"weights": Path("nope"), "source": tmp_path / "vqa.yaml"}
    )
    with pytest.raises(ModelWeightsNotFound, match="not found"):
        VisionLanguageQa(missing, Runtime(device="cuda"))
