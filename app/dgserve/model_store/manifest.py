"""The typed manifest that sits next to every stored version's weights.

The server takes labels, input size, mean/std and its serving defaults from here and
nowhere else, so everything is validated up front: a typo in a key, a value out of
range or a label list that does not fit the head fails when the model is loaded,
not on the first request.

Label convention: ``arch_kwargs["num_classes"]`` is what the architecture's builder
receives; how the labels fit it is the task's rule (``dgserve.tasks``): a classifier
has one label per output, a detector's ``num_classes`` also counts the background
class. Use :meth:`Manifest.class_name` instead of indexing.
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING, Annotated, Any, Literal, Self

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    PositiveInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

if TYPE_CHECKING:
    from dgserve.tasks import Task

SCHEMA_VERSION = 1

StorageDtype = Literal["float32", "float16"]
# The dtype the forward computes in (torch.autocast); weights and outputs stay float32.
# fp16 needs CUDA: the worker refuses it at load on any other device.
Precision = Literal["fp32", "bf16", "fp16"]
Interpolation = Literal["bilinear", "bicubic", "nearest"]
# center_crop: shorter side to size / crop_fraction, then a centred crop (classification).
# stretch:     straight to input_size, aspect ratio not kept.
# letterbox:   fit inside input_size keeping the aspect ratio, pad with the mean
#              (zero after normalisation) -- boxes map back with one scale and offset.
ResizeMode = Literal["center_crop", "stretch", "letterbox"]

# A name becomes a directory and arrives in URLs: keep it to characters that are
# safe in both, and that cannot climb out of the store ("..", "/").
NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,63}$"

UnitFloat = Annotated[float, Field(ge=0.0, le=1.0)]
# mean/std are for pixels scaled to [0, 1]; the bound catches 0-255 statistics
# (123.675, ...) pasted from another framework, which would silently wreck accuracy.
StdFloat = Annotated[float, Field(gt=0.0, le=1.0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ClipSampling(_Strict):
    """How a video task cuts clips from a decoded video (``dgserve.video.clip_indices``)."""

    frames_per_clip: PositiveInt = Field(8, le=256, description="frames T of one clip, the model's temporal input")
    frame_stride: PositiveInt = Field(1, le=64, description="a clip takes every s-th decoded frame")
    num_clips: PositiveInt = Field(1, le=32, description="clips spread evenly over the video; their scores are averaged")


class Preprocessing(_Strict):
    input_size: tuple[PositiveInt, PositiveInt] = Field(description="(height, width) fed to the model")
    mean: tuple[UnitFloat, UnitFloat, UnitFloat] = Field(description="per-channel RGB mean, pixels in [0, 1]")
    std: tuple[StdFloat, StdFloat, StdFloat] = Field(description="per-channel RGB std, pixels in [0, 1]")
    interpolation: Interpolation = "bilinear"
    resize: ResizeMode = "center_crop"
    crop_fraction: float = Field(0.875, gt=0.0, le=1.0, description="used by resize=center_crop only")
    # Video tasks only; left out of an image model's manifest altogether, so image
    # manifests read and write exactly as before.
    clips: ClipSampling | None = Field(
        None, exclude_if=lambda v: v is None, description="video: frames per clip, stride and clips per video"
    )


class Thresholds(_Strict):
    # Not checked against the label count: the default of 5 must suit a 3-class model,
    # and the server returns at most all labels.
    top_k: PositiveInt = Field(5, description="classification: labels returned by default")
    score_threshold: UnitFloat = Field(0.5, description="detection: boxes below this are dropped")
    max_detections: PositiveInt = Field(100, description="detection: most boxes returned per image")


class Batching(_Strict):
    max_batch_size: PositiveInt = 8
    max_delay_ms: NonNegativeFloat = 5.0
    max_queue_size: PositiveInt = 256

    @model_validator(mode="after")
    def _queue_holds_a_batch(self) -> Self:
        if self.max_queue_size < self.max_batch_size:
            raise ValueError(
                f"max_queue_size ({self.max_queue_size}) is smaller than max_batch_size "
                f"({self.max_batch_size}); a full batch could never form"
            )
        return self


class WeightsInfo(_Strict):
    # A bare file name, so a manifest can never point the loader outside its own
    # directory, and .safetensors only: nothing in the store is ever unpickled.
    file: str = Field("model.safetensors", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*\.safetensors$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    dtype: StorageDtype = "float32"


class Manifest(_Strict):
    schema_version: Literal[1]
    name: str = Field(pattern=NAME_PATTERN)
    version: PositiveInt
    architecture: str = Field(min_length=1, description="name in dgserve.models.registry")
    task: str = Field(description="a task in dgserve.tasks: classification, detection, ...")
    arch_kwargs: dict[str, Any] = Field(default_factory=dict, description="passed to create_model")
    labels: list[str] = Field(min_length=1)
    preprocessing: Preprocessing
    thresholds: Thresholds = Field(default_factory=Thresholds)
    batching: Batching = Field(default_factory=Batching)
    weights: WeightsInfo
    # Left out when fp32, so manifests written before the field read and write as before.
    precision: Precision = Field(
        "fp32", exclude_if=lambda v: v == "fp32",
        description="forward dtype under torch.autocast: fp32, bf16 (CPU or CUDA) or fp16 (CUDA only)",
    )
    # Left out when off, for the same reason.
    torch_compile: bool = Field(
        False, exclude_if=lambda v: not v,
        description="run the forward through torch.compile (inductor), compiled while the model loads",
    )
    description: str = ""
    created_at: AwareDatetime

    # Field validators below read earlier fields from info.data, so the declaration
    # order above (task, arch_kwargs, labels, preprocessing) matters.

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str) -> str:
        _task(value)  # ValueError naming the known tasks
        return value

    @field_validator("arch_kwargs")
    @classmethod
    def _has_num_classes(cls, value: dict[str, Any]) -> dict[str, Any]:
        n = value.get("num_classes")
        # bool is an int subclass; `"num_classes": true` is a typo, not 1 class.
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError("num_classes must be a positive integer so labels can be checked against the head")
        return value

    @field_validator("labels")
    @classmethod
    def _labels_fit_head(cls, labels: list[str], info: ValidationInfo) -> list[str]:
        if any(not label.strip() for label in labels):
            raise ValueError("labels must be non-empty strings")
        if len(set(labels)) != len(labels):
            dupes = sorted({label for label in labels if labels.count(label) > 1})
            raise ValueError(f"duplicate labels: {dupes[:5]}")
        task, kwargs = info.data.get("task"), info.data.get("arch_kwargs")
        if task is None or kwargs is None:
            return labels  # already reported on its own field
        _task(task).check_labels(labels, kwargs["num_classes"])
        return labels

    @field_validator("preprocessing")
    @classmethod
    def _preprocessing_suits_task(cls, value: Preprocessing, info: ValidationInfo) -> Preprocessing:
        task = info.data.get("task")
        if task is not None:
            _task(task).check_preprocessing(value)
        return value

    def class_name(self, class_id: int) -> str:
        """The label of a model output index (what that index means is the task's rule)."""
        return _task(self.task).class_name(self.labels, class_id)


def _task(name: str) -> Task:
    # Imported here, not at the top: the tasks build on this module's Preprocessing.
    from dgserve.tasks import get_task

    return get_task(name)


def field_path(loc: tuple[int | str, ...]) -> str | None:
    """``("preprocessing", "mean", 1)`` -> ``"preprocessing.mean[1]"``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def describe_validation_error(exc: ValidationError) -> tuple[str | None, str]:
    """The first offending field and a one-line message covering every error."""
    errors = exc.errors(include_url=False)
    located: list[tuple[str | None, str]] = []
    for err in errors:
        loc = tuple(err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = f"unknown field {loc[-1]!r}" + _suggest(loc)
        elif err["type"] == "missing" and loc and isinstance(loc[-1], int):
            # A short tuple reports its first absent index; the list is what is wrong.
            loc, msg = loc[:-1], f"too few values (only {loc[-1]} given)"
        elif err["type"] == "value_error":
            msg = str(err["ctx"]["error"])  # our own validators' words, without pydantic's prefix
        elif err["type"] not in ("json_invalid", "missing") and "input" in err:
            msg += f" (got {_short(err['input'])})"
        located.append((field_path(loc), msg))
    if len(located) == 1:
        return located[0]
    return located[0][0], "; ".join(f"{where}: {msg}" if where else msg for where, msg in located)


def _suggest(loc: tuple[int | str, ...]) -> str:
    model: type[BaseModel] = Manifest
    for part in loc[:-1]:
        annotation = model.model_fields[str(part)].annotation if str(part) in model.model_fields else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ""
        model = annotation
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
