"""Model manifests: one YAML file per model, in the directory named by
``HEPATO_MODELS_DIR``. The gateway reads them to validate submissions; workers read them
to load models. Nothing here imports a model runtime."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from hepato.common.exceptions import InvalidManifest

# Model names end up in Redis keys and URLs.
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MANIFEST_SUFFIXES = (".yaml", ".yml")

Task = Literal["detect", "classify", "zero-shot", "vqa"]
TASKS: tuple[str, ...] = ("detect", "classify", "zero-shot", "vqa")
# The benchmark's model: a fixed result, no weights, no compute (worker/backends/null.py).
NULL_BACKEND = "null"
# A model served by a Triton Inference Server: its weights live in Triton's repository.
TRITON_BACKEND = "triton"
BACKENDS_WITHOUT_WEIGHTS = (NULL_BACKEND, TRITON_BACKEND)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DetectOptions(_Strict):
    score_threshold: float = Field(0.25, ge=0, le=1, description="Boxes below are dropped.")
    iou: float = Field(0.5, ge=0, le=1, description="NMS IoU threshold.")
    max_detections: int = Field(300, ge=1, description="Most boxes kept per image.")


class ClassifyOptions(_Strict):
    # Which torchvision ResNet the PyTorch backend builds before loading the state dict.
    architecture: Literal["resnet18", "resnet34", "resnet50"] = "resnet50"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


class ZeroShotOptions(_Strict):
    prompts: list[str] = Field(min_length=1, description="One text prompt per label.")


class VqaOptions(_Strict):
    question: str = Field(min_length=1, description="Asked of every image.")
    question_template: str = Field(
        "{question} Answer yes or no, then explain in one sentence.",
        description="How the question is put to the model; must contain {question}.",
    )
    max_new_tokens: int = Field(48, ge=1, le=512, description="Bound on generated tokens.")

    @model_validator(mode="after")
    def _has_placeholder(self) -> VqaOptions:
        if "{question}" not in self.question_template:
            raise ValueError("question_template must contain {question}")
        return self


class TritonOptions(_Strict):
    """Where a ``triton`` model is served. The worker keeps the pre- and post-processing of
    the task; Triton runs the graph (worker/backends/triton.py)."""

    url: str = Field(
        min_length=1, description="host:port of Triton's gRPC (default 8001) or HTTP (8000)."
    )
    model_name: str = Field(min_length=1, description="The model's name in Triton.")
    model_version: str = Field("", description="Empty: the version Triton's policy serves.")
    protocol: Literal["grpc", "http"] = "grpc"
    timeout_s: float = Field(30.0, gt=0, le=3600, description="Per model call, seconds.")


class _Manifest(_Strict):
    name: str = Field(pattern=NAME_PATTERN, description="Unique; jobs name it.")
    version: str = Field("1", min_length=1, description="Recorded with every result.")
    description: str = ""
    # Only the null backend (a benchmark model that computes nothing) and models served by
    # Triton (whose repository holds the graph) have no weights here.
    weights: Path | None = Field(
        None, description="File or directory, relative to the manifest's own."
    )
    labels: list[str] = Field(default_factory=list)
    input_size: int = Field(640, ge=16, le=8192, description="Model input side, pixels.")
    max_batch_size: int = Field(16, ge=1, le=4096, description="Most images per model call.")
    max_wait_ms: float = Field(10.0, ge=0, le=60_000, description="Wait for stragglers, ms.")
    fp16: bool = Field(False, description="Half precision on a GPU; ignored on the CPU.")
    # Whole slides: a model takes them only when it names the resolution it was trained at.
    mpp: float | None = Field(
        None, gt=0, le=100, description="µm per pixel of its training images; slides need it."
    )
    tile_overlap: int = Field(
        0, ge=0, description="Overlap of neighbouring slide tiles, model input px."
    )
    # Where the manifest was read from; set by the loader, not written in the file.
    source: Path | None = Field(None, exclude=True)

    @model_validator(mode="after")
    def _labels_unique(self) -> _Manifest:
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("labels must be unique")
        return self

    @model_validator(mode="after")
    def _weights_given(self) -> _Manifest:
        if self.weights is None and not self.needs_no_weights:
            raise ValueError(
                "weights: Field required (a file or directory; only backends "
                f"{' and '.join(map(repr, BACKENDS_WITHOUT_WEIGHTS))} have none)"
            )
        return self

    @model_validator(mode="after")
    def _overlap_below_tile(self) -> _Manifest:
        if self.tile_overlap >= self.input_size:
            raise ValueError(
                f"tile_overlap ({self.tile_overlap}) must be smaller than input_size "
                f"({self.input_size})"
            )
        return self

    @property
    def needs_no_weights(self) -> bool:
        return getattr(self, "backend", None) in BACKENDS_WITHOUT_WEIGHTS

    @property
    def weights_path(self) -> Path:
        """The weights' absolute path; a model without weights has none to give."""
        if self.weights is None:
            backend = getattr(self, "backend", "")
            raise InvalidManifest(f"model {self.name!r} (backend {backend}) has no weights")
        if self.weights.is_absolute() or self.source is None:
            return self.weights
        return (self.source.parent / self.weights).resolve()

    @property
    def weights_present(self) -> bool:
        return self.weights is None or self.weights_path.exists()


def _need_labels(m: _Manifest) -> None:
    if not m.labels:
        raise ValueError(f"a {getattr(m, 'task', '')} model needs labels")


def _triton_options_match(backend: str, triton: TritonOptions | None) -> None:
    if backend == TRITON_BACKEND and triton is None:
        raise ValueError("backend triton needs a triton section (url, model_name)")
    if backend != TRITON_BACKEND and triton is not None:
        raise ValueError(f"a triton section is for backend triton, not {backend}")


class DetectManifest(_Manifest):
    task: Literal["detect"]
    # ultralytics: YOLOv8 .pt on PyTorch; onnx: YOLOv8 on ONNX Runtime;
    # transformers: DETR checkpoint directory; null: no model at all, for `hepato bench`;
    # triton: the YOLOv8 ONNX graph served by Triton, our pre- and post-processing.
    backend: Literal["ultralytics", "onnx", "transformers", "null", "triton"]
    options: DetectOptions = DetectOptions()
    triton: TritonOptions | None = None

    @model_validator(mode="after")
    def _check(self) -> DetectManifest:
        _need_labels(self)
        _triton_options_match(self.backend, self.triton)
        return self


class ClassifyManifest(_Manifest):
    task: Literal["classify"]
    input_size: int = Field(224, ge=16, le=8192)
    # torch: torchvision ResNet state dict; onnx: exported graph; triton: that graph
    # served by Triton.
    backend: Literal["torch", "onnx", "triton"]
    options: ClassifyOptions = ClassifyOptions()
    triton: TritonOptions | None = None

    @model_validator(mode="after")
    def _check(self) -> ClassifyManifest:
        _need_labels(self)
        _triton_options_match(self.backend, self.triton)
        return self


class ZeroShotManifest(_Manifest):
    task: Literal["zero-shot"]
    input_size: int = Field(224, ge=16, le=8192)
    # transformers: a CLIP checkpoint directory; open_clip: open_clip's layout
    # (open_clip_config.json + open_clip_pytorch_model.bin, as BiomedCLIP is published).
    backend: Literal["transformers", "open_clip"]
    options: ZeroShotOptions

    @model_validator(mode="after")
    def _check(self) -> ZeroShotManifest:
        _need_labels(self)
        if len(self.options.prompts) != len(self.labels):
            raise ValueError(
                f"options.prompts has {len(self.options.prompts)} entries for "
                f"{len(self.labels)} labels; give one prompt per label"
            )
        return self


class VqaManifest(_Manifest):
    task: Literal["vqa"]
    input_size: int = Field(224, ge=16, le=8192)
    backend: Literal["transformers"]
    max_batch_size: int = Field(4, ge=1, le=4096)
    options: VqaOptions
    load_in_8bit: bool = Field(
        False, description="8-bit weights (bitsandbytes) on a GPU; ignored on the CPU."
    )


ModelManifest = Annotated[
    DetectManifest | ClassifyManifest | ZeroShotManifest | VqaManifest,
    Field(discriminator="task"),
]
_ADAPTER: TypeAdapter[ModelManifest] = TypeAdapter(ModelManifest)


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        # Drop the discriminator's tag ("detect", ...) from the location: the file has no
        # such level.
        loc = [str(p) for p in err["loc"] if p not in TASKS]
        where = ".".join(loc) or "(top level)"
        lines.append(f"  {where}: {err['msg']}")
    return "\n".join(lines)


def parse_manifest(data: Any, source: Path | None = None) -> ModelManifest:
    where = str(source) if source else "manifest"
    if not isinstance(data, dict):
        raise InvalidManifest(f"{where}: expected a mapping of fields, got {type(data).__name__}")
    if "task" in data and data["task"] not in TASKS:
        raise InvalidManifest(
            f"{where}:\n  task: {data['task']!r} is not a task; use one of {', '.join(TASKS)}"
        )
    try:
        manifest = _ADAPTER.validate_python({**data, "source": source})
    except ValidationError as exc:
        raise InvalidManifest(f"{where}:\n{_describe(exc)}") from None
    return manifest


def load_manifest(path: Path) -> ModelManifest:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise InvalidManifest(f"{path}: not valid YAML: {exc}") from None
    except OSError as exc:
        raise InvalidManifest(f"{path}: cannot read: {exc.strerror}") from None
    return parse_manifest(data, path.resolve())


def dump_manifest(manifest: ModelManifest, path: Path) -> None:
    data = manifest.model_dump(mode="json", exclude_defaults=False)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def load_registry(directory: Path) -> dict[str, ModelManifest]:
    """Every manifest in ``directory``, by name. All problems are reported at once."""
    if not directory.is_dir():
        raise InvalidManifest(f"models directory not found: {directory}")
    registry: dict[str, ModelManifest] = {}
    problems: list[str] = []
    for path in sorted(p for p in directory.iterdir() if p.suffix in MANIFEST_SUFFIXES):
        try:
            manifest = load_manifest(path)
        except InvalidManifest as exc:
            problems.append(str(exc))
            continue
        if manifest.name in registry:
            first = registry[manifest.name].source
            problems.append(f"{path}: model name {manifest.name!r} is also declared in {first}")
            continue
        registry[manifest.name] = manifest
    if problems:
        raise InvalidManifest("\n".join(problems))
    return registry
