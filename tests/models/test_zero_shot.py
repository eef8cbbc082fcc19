"""The CLIP zero-shot backend on a tiny random CLIP built offline: it scores every prompt,
gives each image the same scores in any batch, and never runs the text tower per batch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hepato.common.exceptions import InvalidManifest, ModelWeightsNotFound
from hepato.common.manifest import ZeroShotManifest, load_manifest, parse_manifest
from hepato.common.results import ZeroShotResult
from hepato.worker.backends.base import Runtime, load_model
from hepato.worker.builders.zero_shot import DEFAULT_LABELS, PROMPT_TEMPLATE, build_clip

RUNTIME = Runtime(device="cpu", threads=2)
# float32 through a different batch size changes matmul blocking, hence rounding, by a
# few ulps of values of order 1; 1e-5 is well above that and far below any real change.
BATCH_TOL = 1e-5
# Softmax of float32 logits sums to 1 within float32 rounding over a handful of terms.
SUM_TOL = 1e-5
SIZES = [(32, 32), (40, 60), (100, 30), (17, 23), (256, 256), (33, 200), (64, 48), (5, 9)]


@pytest.fixture(scope="module")
def manifest_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_clip(tmp_path_factory.mktemp("clip"), size="tiny")


@pytest.fixture(scope="module")
def model(manifest_path: Path) -> Any:
    from hepato.worker.backends.zero_shot import ClipZeroShot

    loaded = load_model(load_manifest(manifest_path), RUNTIME)
    assert isinstance(loaded, ClipZeroShot)
    return loaded


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SIZES]


def _scores(result: ZeroShotResult) -> dict[str, tuple[float, float]]:
    return {s.label: (s.probability, s.similarity) for s in result.scores}


def _flat(result: ZeroShotResult) -> list[float]:
    return [x for s in result.scores for x in (s.probability, s.similarity)]


def test_manifest_has_one_prompt_per_label(manifest_path: Path) -> None:
    manifest = load_manifest(manifest_path)
    assert isinstance(manifest, ZeroShotManifest)
    assert manifest.weights_path == manifest_path.parent / manifest.name
    assert manifest.labels == list(DEFAULT_LABELS)
    assert manifest.options.prompts == [PROMPT_TEMPLATE.format(label=x) for x in DEFAULT_LABELS]


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
    pairs = dict(zip(model.manifest.labels, model.manifest.options.prompts, strict=True))
    for result in results:
        assert {(s.label, s.prompt) for s in result.scores} == set(pairs.items())
        probabilities = [s.probability for s in result.scores]
        assert probabilities == sorted(probabilities, reverse=True)
        assert sum(probabilities) == pytest.approx(1.0, abs=SUM_TOL)
        assert all(-1.0 - SUM_TOL <= s.similarity <= 1.0 + SUM_TOL for s in result.scores)


def test_matches_the_full_clip_forward(model: Any, images: list[np.ndarray]) -> None:
    """The cached text embeddings and logit scale give what CLIPModel.forward gives."""
    import torch

    results, _, _ = model.predict(images[:3])
    tokens = model.processor.tokenizer(model.manifest.options.prompts, padding=True)
    pixels = model.processor.image_processor(images=images[:3], return_tensors="pt")
    with torch.inference_mode():
        out = model.model(
            input_ids=torch.tensor(tokens["input_ids"]),
            attention_mask=torch.tensor(tokens["attention_mask"]),
            pixel_values=pixels["pixel_values"],
        )
    want = out.logits_per_image.softmax(-1).numpy()
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

    hook = model.model.text_model.register_forward_pre_hook(refuse)
    monkeypatch.setattr(model.model, "get_text_features", refuse)
    monkeypatch.setattr(model.processor, "tokenizer", refuse)
    try:
        results, _, _ = model.predict(images)
    finally:
        hook.remove()
    assert len(results) == len(images) and calls == []


def test_identical_images_get_identical_scores(model: Any, images: list[np.ndarray]) -> None:
    first, other, again = model.predict([images[1], images[2], images[1].copy()])[0]
    assert _flat(again) == pytest.approx(_flat(first), abs=BATCH_TOL)
    assert _flat(other) != pytest.approx(_flat(first), abs=BATCH_TOL)


def test_empty_batch(model: Any) -> None:
    assert model.predict([])[0] == []


def test_prompt_label_mismatch_is_rejected(manifest_path: Path) -> None:
    manifest = load_manifest(manifest_path)
    data = manifest.model_dump(mode="json")
    data["options"] = {"prompts": data["options"]["prompts"][:-1]}
    with pytest.raises(InvalidManifest, match="one prompt per label"):
        parse_manifest(data, manifest_path)
    with pytest.raises(InvalidManifest):
        build_clip(manifest_path.parent, name="mismatch", prompts=["only one"])


def test_missing_weights_are_refused(manifest_path: Path, tmp_path: Path) -> None:
    data = load_manifest(manifest_path).model_dump(mode="json")
    manifest = parse_manifest({**data, "weights": "absent"}, tmp_path / "m.yaml")
    with pytest.raises(ModelWeightsNotFound, match="absent"):
        load_model(manifest, RUNTIME)
