"""The vision-language backend answers each image in a batch as it would alone (left
padding, per-image questions), stops at its token bound, parses yes/no answers and never
downloads. Runs a tiny random Gemma 3 (MedGemma's architecture) built offline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hepato.common.exceptions import ModelWeightsNotFound
from hepato.common.manifest import VqaManifest, load_manifest
from hepato.common.results import VqaResult
from hepato.worker.backends.base import Runtime
from hepato.worker.backends.vqa import VisionLanguageQa, parse_answer
from hepato.worker.builders.vqa import build_vqa

# Batched rows differ from single runs only by float32 summation order (padded columns
# get zero attention weight): observed <= 2e-7 on logits of order 0.3, whose top-two
# margins are >= 1e-3, so greedy ids are compared exactly and logits within this.
LOGIT_ATOL = 1e-4
# Different images must move the first-step logits by far more than that, or the
# equality tests would pass with the image ignored.
IMAGE_EFFECT_MIN = 1e-2

SHAPES = [(32, 32), (64, 48), (100, 200), (17, 23)]
QUESTIONS = [
    "Is there steatosis?",
    None,
    "Is there bridging fibrosis with portal inflammation in this liver biopsy section?",
    "Fat?",
]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> VqaManifest:
    path = build_vqa(tmp_path_factory.mktemp("vqa"), size="tiny")
    loaded = load_manifest(path)
    assert isinstance(loaded, VqaManifest)
    return loaded


@pytest.fixture(scope="module")
def backend(manifest: VqaManifest) -> VisionLanguageQa:
    return VisionLanguageQa(manifest, Runtime(device="cpu", threads=2))


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SHAPES]


def first_step_logits(
    backend: VisionLanguageQa, images: list[np.ndarray], questions: list[str | None]
) -> torch.Tensor:
    prompts = [backend.prompt(q) for q in questions]
    inputs = backend.processor(
        text=[p for p, _ in prompts],
        images=[[image] for image in images],
        padding=True,
        return_tensors="pt",
        add_special_tokens=prompts[0][1],
    )
    with torch.inference_mode():
        logits: torch.Tensor = backend.model(**inputs).logits[:, -1]
    return logits


@pytest.mark.parametrize(
    ("text", "verdict", "explanation"),
    [
        ("Yes.", "yes", ""),
        ("No", "no", ""),
        ("no, because the lobules look normal.", "no", "because the lobules look normal."),
        (
            "**Yes** - large fat droplets fill the cells.",
            "yes",
            "large fat droplets fill the cells.",
        ),
        ("  \n**No.** The tissue is normal.", "no", "The tissue is normal."),
        ("YES: macrovesicular steatosis.", "yes", "macrovesicular steatosis."),
        ("## Answer: No\nNo fat is seen.", "no", "No fat is seen."),
        ("**Answer:** yes, steatosis.", "yes", "steatosis."),
        ("- yes; zone 3 ballooning", "yes", "zone 3 ballooning"),
        ("Yes\u2014fat droplets.", "yes", "fat droplets."),
        ("The biopsy shows no steatosis.", None, "The biopsy shows no steatosis."),
        ("Nothing abnormal, yes.", None, "Nothing abnormal, yes."),
        ("Yesterday's stain is faint.", None, "Yesterday's stain is faint."),
        ("  ", None, ""),
    ],
)
def test_parse_answer(text: str, verdict: str | None, explanation: str) -> None:
    assert parse_answer(text) == (verdict, explanation)


def test_prompt_is_the_chat_template_with_one_bos(backend: VisionLanguageQa) -> None:
    prompt, add_special = backend.prompt()
    assert prompt.endswith("<start_of_turn>model\n")
    assert backend.question_text() in prompt
    tokenizer = backend.processor.tokenizer
    inputs = backend.processor(
        text=[prompt],
        images=[[np.zeros((8, 8, 3), np.uint8)]],
        return_tensors="pt",
        add_special_tokens=add_special,
    )
    ids = inputs["input_ids"][0].tolist()
    assert ids[0] == tokenizer.bos_token_id
    assert ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.padding_side == "left"


def test_batch_of_sizes_equals_each_image_alone(
    backend: VisionLanguageQa, images: list[np.ndarray]
) -> None:
    results, sizes, ms = backend.predict(images)
    assert sizes == [len(images)] * len(images) and ms > 0
    for image, result in zip(images, results, strict=True):
        [alone], _, _ = backend.predict([image])
        assert isinstance(result, VqaResult)
        assert result == alone
        assert result.question == backend.question_text()
        assert (result.verdict, result.explanation) == parse_answer(result.answer)
    batched = backend.generate(images)
    assert batched == [backend.generate([image])[0] for image in images]


def test_per_image_questions_equal_each_alone(
    backend: VisionLanguageQa, images: list[np.ndarray]
) -> None:
    # Prompts of different lengths: the short ones are left-padded in the batch.
    lengths = {
        len(backend.processor.tokenizer(backend.prompt(q)[0])["input_ids"]) for q in QUESTIONS
    }
    assert len(lengths) == len(set(QUESTIONS))
    batched = backend.generate(images, QUESTIONS)
    alone = [backend.generate([image], [q])[0] for image, q in zip(images, QUESTIONS, strict=True)]
    assert batched == alone
    results, _, _ = backend.predict(images, QUESTIONS)
    for result, question in zip(results, QUESTIONS, strict=True):
        assert isinstance(result, VqaResult)
        assert result.question == backend.question_text(question)

    logits = first_step_logits(backend, images, QUESTIONS)
    for i, (image, question) in enumerate(zip(images, QUESTIONS, strict=True)):
        single = first_step_logits(backend, [image], [question])[0]
        torch.testing.assert_close(logits[i], single, atol=LOGIT_ATOL, rtol=0)


def test_answer_depends_on_the_image(backend: VisionLanguageQa, images: list[np.ndarray]) -> None:
    logits = first_step_logits(backend, images[:2], [None, None])
    assert (logits[0] - logits[1]).abs().max() > IMAGE_EFFECT_MIN


@pytest.mark.parametrize("bound", [1, 3])
def test_generation_stops_at_max_new_tokens(
    manifest: VqaManifest, images: list[np.ndarray], bound: int
) -> None:
    options = manifest.options.model_copy(update={"max_new_tokens": bound})
    bounded = VisionLanguageQa(
        manifest.model_copy(update={"options": options}), Runtime(device="cpu", threads=2)
    )
    generated = bounded.generate(images, QUESTIONS)
    assert all(1 <= len(tokens) <= bound for tokens in generated)
    # The decoded answer is those ids only, not the prompt echoed before them.
    results, _, _ = bounded.predict(images, QUESTIONS)
    for result, tokens in zip(results, generated, strict=True):
        assert isinstance(result, VqaResult)
        decoded = bounded.processor.tokenizer.decode(tokens, skip_special_tokens=True)
        assert result.answer == decoded.strip()


def test_question_count_must_match_images(
    backend: VisionLanguageQa, images: list[np.ndarray]
) -> None:
    with pytest.raises(ValueError, match="2 questions for 4 images"):
        backend.predict(images, ["a?", "b?"])


def test_missing_weights_are_refused_not_downloaded(manifest: VqaManifest, tmp_path: Path) -> None:
    missing = manifest.model_copy(update={"weights": Path("nope"), "source": tmp_path / "vqa.yaml"})
    with pytest.raises(ModelWeightsNotFound, match="not found"):
        VisionLanguageQa(missing, Runtime(device="cpu"))
