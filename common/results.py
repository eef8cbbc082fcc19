"""Typed results, one shape per task. Workers produce them, Postgres stores them as JSON,
the API returns them; ``task`` says which shape a result has."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

from pydantic import BaseModel, Field, TypeAdapter


class Box(BaseModel):
    label: str
    class_id: int
    score: float = Field(description="Confidence, 0..1")
    x1: float = Field(description="Left edge, pixels of the original image")
    y1: float
    x2: float
    y2: float


def make_box(labels: Sequence[str], class_id: int, score: float, xyxy: Sequence[float]) -> Box:
    x1, y1, x2, y2 = (float(v) for v in xyxy)
    return Box(label=labels[class_id], class_id=class_id, score=score, x1=x1, y1=y1, x2=x2, y2=y2)


class DetectResult(BaseModel):
    task: Literal["detect"] = "detect"
    boxes: list[Box] = Field(description="Best first")


class LabelProbability(BaseModel):
    label: str
    class_id: int
    probability: float = Field(description="Softmax probability, 0..1")


class ClassifyResult(BaseModel):
    task: Literal["classify"] = "classify"
    labels: list[LabelProbability] = Field(description="Every class, most probable first")


class PromptScore(BaseModel):
    label: str
    prompt: str
    probability: float = Field(description="Softmax over the model's prompts, 0..1")
    similarity: float = Field(description="Cosine similarity of image and prompt, -1..1")


class ZeroShotResult(BaseModel):
    task: Literal["zero-shot"] = "zero-shot"
    scores: list[PromptScore] = Field(description="Every prompt, most probable first")


class VqaResult(BaseModel):
    task: Literal["vqa"] = "vqa"
    question: str
    answer: str = Field(description="The generated text, as the model wrote it")
    verdict: Literal["yes", "no"] | None = Field(
        description="The answer's yes/no, parsed; null when it gives neither"
    )
    explanation: str = Field(description="The answer after its yes/no")


TaskResult = Annotated[
    DetectResult | ClassifyResult | ZeroShotResult | VqaResult, Field(discriminator="task")
]
TASK_RESULT: TypeAdapter[TaskResult] = TypeAdapter(TaskResult)
