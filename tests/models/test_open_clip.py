"""The open_clip zero-shot backend on a tiny random model in BiomedCLIP's published layout,
built offline: it loads from disk only (never the hub), scores every prompt, gives each
image the same scores in any batch, matches open_clip's own preprocessing and forward,
and names the file that is missing from a model directory."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from hepato.common.exceptions import BackendError, ModelWeightsNotFound
from hepato.common.manifest import ZeroShotManifest, load_manifest, parse_manifest
from hepato.common.results import ZeroShotResult
from hepato.worker.backends.base import load_model
from hepato.worker.builders.open_clip import build_open_clip
from hepato.worker.builders.zero_shot import DEFAULT_LABELS, PROMPT_TEMPLATE

# Tolerances and helpers of the zero-shot tests, and those of its tests that hold for
# any backend (pytest runs the imported ones here, on this module's model).
from tests.models.test_zero_shot import (  # noqa: F401
    BATCH_TOL,
    RUNTIME,
    SUM_TOL,
    _flat,
    _scores,
    test_empty_batch,
    test_identical_images_get_identical_scores,
)

# The first size is the tiny tower's own input (160 px), so one image needs no resize.
SIZES = [(160, 160), (40, 60), (100, 30), (17, 23), (256, 256), (33, 200), (64, 48), (5, 9)]


@pytest.fixture(scope="module")
def manifest_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_open_clip(tmp_path_factory.mktemp("open_clip"), size="tiny")


@pytest.fixture(scope="module")
def model(manifest_path: Path) -> Any:
    from hepato.worker.backends.open_clip import OpenClipZeroShot

    loaded = load_model(load_manifest(manifest_path), RUNTIME)
    assert isinstance(loaded, OpenClipZeroShot)
    return loaded


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SIZES]


def _copy(manifest_path: Path, tmp_path: Path) -> tuple[ZeroShotManifest, Path]:
    """The built model in a folder of its own, to take files out of."""
    manifest = load_manifest(manifest_path)
    assert isinstance(manifest, ZeroShotManifest)
    target = tmp_path / "model"
    shutil.copytree(manifest.weights_path, target)
    data = manifest.model_dump(mode="json")
    copied = parse_manifest({**data, "weights": "model"}, tmp_path / "m.yaml")
    assert isinstance(copied, ZeroShotManifest)
    return copied, target


def test_manifest_and_directory_as_published(manifest_path: Path) -> None:
    manifest = load_manifest(manifest_path)
    assert isinstance(manifest, ZeroShotManifest)
    assert manifest.backend == "open_clip"
    assert manifest.labels == list(DEFAULT_LABELS)
    assert manifest.options.prompts == [PROMPT_TEMPLATE.format(label=x) for x in DEFAULT_LABELS]
    folder = manifest.weights_path
    assert folder == manifest_path.parent / manifest.name
    config = json.loads((folder / "open_clip_config.json").read_text())
    vision, text = config["model_cfg"]["vision_cfg"], config["model_cfg"]["text_cfg"]
    assert vision["timm_model_name"] == "test_vit"
    # The text tower names a hub repository, as BiomedCLIP's does; text/ stands in for it.
    assert text["hf_model_name"] == text["hf_tokenizer_name"] == "hepato/tiny-bert-uncased"
    assert text["hf_pooler_type"] == "cls_last_hidden_state_pooler"
    assert {"mean", "std"} <= set(config["preprocess_cfg"])
    assert (folder / "open_clip_pytorch_model.bin").is_file()
    assert {"config.json", "vocab.txt"} <= {p.name for p in (folder / "text").iterdir()}
    assert manifest.input_size == vision["image_size"] == 160


def test_checkpoint_loads_strictly_into_open_clips_own_model(manifest_path: Path) -> None:
    """The keys are open_clip's: the model open_clip builds from the config takes the
    state dict with strict=True, no conversion, and the backend runs those weights."""
    import open_clip

    from hepato.worker.backends.open_clip import local_config

    folder = load_manifest(manifest_path).weights_path
    text_cfg = local_config(folder)["model_cfg"]["text_cfg"]
    fresh = open_clip.create_model(f"local-dir:{folder}", load_weights=False, text_cfg=text_cfg)
    state = torch.load(folder / "open_clip_pytorch_model.bin", weights_only=True)
    incompatible = fresh.load_state_dict(state, strict=True)
    assert incompatible.missing_keys == incompatible.unexpected_keys == []
    assert type(fresh).__name__ == "CustomTextCLIP"
    assert {k.split(".")[0] for k in state} == {"visual", "text", "logit_scale"}
    assert any(k.startswith("visual.trunk.blocks.") for k in state)
    assert any(k.startswith("text.transformer.encoder.layer.") for k in state)
    assert any(k.startswith("text.proj.") for k in state)
    # cls_last_hidden_state_pooler: BERT's own pooler is not built, as in BiomedCLIP.
    assert not any(k.startswith("text.transformer.pooler") for k in state)
    loaded: Any = load_model(load_manifest(manifest_path), RUNTIME)
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_batch_equals_each_image_alone(model: Any, images: list[np.ndarray]) -> None:
    batch, sizes, ms = model.predict(images)
    assert sizes == [len(images)] * len(images) and ms > 0
    for image, got in zip(images, batch, strict=True):
        [alone], _, _ = model.predict([image])
        want = _scores(alone)
        for label, (probability, similarity) in _scores(got).items():
            assert probability == pytest.approx(want[label][0], abs=BATCH_TOL)
            assert similarity == pytest.approx(want[label][1], abs=BATCH_TOL)


def test_scores_cover_every_prompt_sorted_and_sum_to_one(
    model: Any, images: list[np.ndarray]
) -> None:
    results, _, _ = model.predict(images)
    assert len(results) == len(images)
    pairs = dict(zip(model.manifest.labels, model.manifest.options.prompts, strict=True))
    for result in results:
        assert isinstance(result, ZeroShotResult)
        assert len(result.scores) == len(pairs)
        assert {(s.label, s.prompt) for s in result.scores} == set(pairs.items())
        probabilities = [s.probability for s in result.scores]
        assert probabilities == sorted(probabilities, reverse=True)
        assert sum(probabilities) == pytest.approx(1.0, abs=SUM_TOL)
        assert all(-1.0 - SUM_TOL <= s.similarity <= 1.0 + SUM_TOL for s in result.scores)


def test_matches_open_clips_own_transform_and_forward(model: Any, images: list[np.ndarray]) -> None:
    """open_clip's eval transform per PIL image, then model(image, text) with the
    tokenizer: the same probabilities as the backend's batched path."""
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from PIL import Image

    from hepato.worker.backends.open_clip import tokenizer

    cfg = open_clip.get_model_preprocess_cfg(model.model)
    transform = image_transform_v2(PreprocessCfg(**cfg), is_train=False)
    want_pixels = torch.stack([transform(Image.fromarray(i)) for i in images])
    got_pixels = model.preprocess.normalise(model.preprocess.pixels(images))
    assert got_pixels.shape == want_pixels.shape == (len(images), 3, 160, 160)
    assert torch.allclose(got_pixels, want_pixels, atol=1e-6)

    results, _, _ = model.predict(images)
    tokens = tokenizer(model.manifest.weights_path)(model.manifest.options.prompts)
    with torch.inference_mode():
        image, text, scale = model.model(want_pixels, tokens)
        want = (scale * image @ text.T).softmax(-1).numpy()
    for result, row in zip(results, want, strict=True):
        got = _scores(result)
        for label, p in zip(model.manifest.labels, row, strict=True):
            assert got[label][0] == pytest.approx(float(p), abs=BATCH_TOL)


def test_text_tower_is_not_run_per_batch(
    model: Any, images: list[np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []

    def refuse(*args: object, **kwargs: object) -> None:
        calls.append("called")
        raise AssertionError("text tower used during predict")

    hook = model.model.text.register_forward_pre_hook(refuse)
    monkeypatch.setattr(model.model, "encode_text", refuse)
    try:
        results, _, _ = model.predict(images)
    finally:
        hook.remove()
    assert len(results) == len(images) and calls == []


def test_loads_without_network_or_hub(manifest_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every socket connection and every hub download entry point refuses; the model
    still loads and predicts, and none of them was tried."""
    import huggingface_hub
    import huggingface_hub.file_download
    import open_clip.factory
    import open_clip.pretrained

    tried: list[str] = []

    def refuse(what: str) -> Any:
        def call(*args: object, **kwargs: object) -> None:
            tried.append(what)
            raise AssertionError(f"{what} called while loading from disk")

        return call

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse("socket.connect"))
    monkeypatch.setattr(socket, "create_connection", refuse("socket.create_connection"))
    for module, name in [
        (huggingface_hub, "hf_hub_download"),
        (huggingface_hub, "snapshot_download"),
        (huggingface_hub.file_download, "hf_hub_download"),
        (open_clip.pretrained, "download_pretrained_from_hf"),
        (open_clip.factory, "download_pretrained_from_hf"),
        (open_clip.factory, "download_pretrained"),
    ]:
        monkeypatch.setattr(module, name, refuse(f"{module.__name__}.{name}"))
    loaded = load_model(load_manifest(manifest_path), RUNTIME)
    results, _, _ = loaded.predict([np.zeros((50, 70, 3), np.uint8)])
    assert len(results) == 1 and tried == []


@pytest.mark.parametrize(
    ("remove", "named"),
    [
        ("open_clip_config.json", "open_clip_config.json"),
        ("open_clip_pytorch_model.bin", "open_clip_pytorch_model.bin"),
        ("text/config.json", "text/config.json"),
        ("text", "text/config.json"),
    ],
)
def test_a_missing_file_is_named(
    manifest_path: Path, tmp_path: Path, remove: str, named: str
) -> None:
    manifest, folder = _copy(manifest_path, tmp_path)
    gone = folder / remove
    if gone.is_dir():
        shutil.rmtree(gone)
    else:
        gone.unlink()
    with pytest.raises(ModelWeightsNotFound, match=named.replace(".", r"\.")):
        load_model(manifest, RUNTIME)


def test_a_text_tower_without_vocabulary_is_refused(manifest_path: Path, tmp_path: Path) -> None:
    manifest, folder = _copy(manifest_path, tmp_path)
    for name in ("vocab.txt", "tokenizer.json"):
        (folder / "text" / name).unlink()
    with pytest.raises(ModelWeightsNotFound, match=r"text/tokenizer\.json or vocab\.txt"):
        load_model(manifest, RUNTIME)


def test_only_a_vocab_txt_is_enough(manifest_path: Path, tmp_path: Path) -> None:
    """BiomedBERT's repository has config.json and vocab.txt; a copy of just those two
    loads and scores as the full tokenizer files do."""
    manifest, folder = _copy(manifest_path, tmp_path)
    for extra in (folder / "text").iterdir():
        if extra.name not in ("config.json", "vocab.txt"):
            extra.unlink()
    image = np.random.default_rng(1).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    full = load_model(load_manifest(manifest_path), RUNTIME).predict([image])[0][0]
    bare = load_model(manifest, RUNTIME).predict([image])[0][0]
    assert _flat(bare) == pytest.approx(_flat(full), abs=BATCH_TOL)


def test_missing_directory_is_refused(manifest_path: Path, tmp_path: Path) -> None:
    data = load_manifest(manifest_path).model_dump(mode="json")
    manifest = parse_manifest({**data, "weights": "absent"}, tmp_path / "m.yaml")
    with pytest.raises(ModelWeightsNotFound, match="absent"):
        load_model(manifest, RUNTIME)


def test_build_is_reproducible(manifest_path: Path, tmp_path: Path) -> None:
    again = build_open_clip(tmp_path, size="tiny")
    first = load_manifest(manifest_path).weights_path / "open_clip_pytorch_model.bin"
    second = load_manifest(again).weights_path / "open_clip_pytorch_model.bin"
    a = torch.load(first, weights_only=True)
    b = torch.load(second, weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ({"embed_dim": 16}, "not an open_clip config with model_cfg.text_cfg"),
        (
            {"model_cfg": {"embed_dim": 16, "vision_cfg": {}, "text_cfg": {"width": 32}}},
            "Hugging Face text tower",
        ),
    ],
)
def test_a_config_the_backend_cannot_serve_is_refused(
    manifest_path: Path, tmp_path: Path, config: dict[str, Any], named: str
) -> None:
    manifest, folder = _copy(manifest_path, tmp_path)
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(BackendError, match=named):
        load_model(manifest, RUNTIME)


def test_weights_that_are_a_file_are_refused(manifest_path: Path, tmp_path: Path) -> None:
    manifest, folder = _copy(manifest_path, tmp_path)
    shutil.rmtree(folder)
    folder.write_bytes(b"")
    with pytest.raises(ModelWeightsNotFound, match="needs a directory"):
        load_model(manifest, RUNTIME)


def test_an_unexpected_transform_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The batch path relies on open_clip's eval transform ending in ToTensor, Normalize;
    should a release change that, loading fails rather than preprocessing differently."""
    from torchvision.transforms import CenterCrop, Compose, Resize, ToTensor

    from hepato.worker.backends import open_clip as backend

    monkeypatch.setattr(
        backend,
        "image_transform_v2",
        lambda cfg, is_train: Compose([Resize(cfg.size), CenterCrop(cfg.size), ToTensor()]),
    )
    with pytest.raises(BackendError, match="not \\(geometry, ToTensor, Normalize\\)"):
        backend.Preprocess({"size": 160})
