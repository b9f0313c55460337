"""What a task is: everything that differs between classification, detection, and the next one.

A task is one module holding one ``Task`` subclass. It owns:

* the manifest rules for its models (how labels fit the head, which resize modes make sense);
* its per-request options (``Options``, e.g. ``top_k``) and the schema of one prediction;
* turning a decoded image into a model input (``prepare``, in the decode pool) and a
  batch of model outputs into predictions (``predict``, in the worker thread);
* the training hooks ``dgserve train`` calls: data sources, collate, loss, evaluation.

The server and the trainer look a task up by ``manifest.task`` with ``get_task``;
nothing outside a task's module branches on its name. Registering one is the single
import line in ``dgserve/tasks/__init__.py``.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from dgserve.imaging import IMAGENET_MEAN, IMAGENET_STD, resized_size
from dgserve.model_store.manifest import Manifest, Preprocessing, ResizeMode
from dgserve.serving.decode import ALLOWED_CONTENT_TYPES, decode_upload
from dgserve.serving.thumbnails import model_view_thumbnail

if TYPE_CHECKING:
    import torch

    from dgserve.data.sources import DataBundle
    from dgserve.settings import Settings
    from dgserve.training.config import Schedule, TrainConfig

__all__ = [
    "ImageInfo", "InferenceItem", "Options", "Task", "TensorSpec", "get_task", "register_task", "tasks",
]


class Options(BaseModel):
    """Per-request options of a task (none by default). Frozen: one object serves a whole request."""

    model_config = ConfigDict(frozen=True)


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """The uploaded image as the client sent it."""

    part: str | None  # the multipart part it came from, for messages and records
    width: int
    height: int
    # JPEG of what the model saw, only with DGSERVE_INSPECTION_THUMBNAILS on; never in to_dict.
    thumbnail: bytes | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"part": self.part, "width": self.width, "height": self.height}


@dataclass(frozen=True, slots=True)
class InferenceItem:
    """One prepared image: the model input, where it came from, and what its caller asked."""

    tensor: Tensor  # on the CPU, as ``Task.prepare`` made it
    image: ImageInfo
    options: Options
    context: Any = None  # whatever ``prepare`` needs ``predict`` to know (a resize scale, ...)


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One output tensor as tensor protocols (the Open Inference Protocol) describe it.

    ``datatype`` is the protocol's name (``FP32``, ``INT64``, ``BYTES``, ...); ``shape``
    starts with the batch dimension, and -1 marks a dimension that varies.
    """

    name: str
    datatype: str
    shape: tuple[int, ...]
    description: str = ""


ToDevice = Callable[[Tensor], Tensor]


class Task(abc.ABC):
    """One task. Subclasses set the class attributes and implement the hooks."""

    name: ClassVar[str]
    """The manifest's ``task`` value, e.g. ``"classification"``."""
    endpoint: ClassVar[str]
    """The verb of ``POST /v1/models/{name}/{endpoint}``."""
    summary: ClassVar[str]
    """One line for the API docs."""
    Options: ClassVar[type[Options]] = Options
    Prediction: ClassVar[type[BaseModel]]
    """The schema of one prediction (one label, one box, ...) in a response."""
    many: ClassVar[bool] = True
    """Whether a result's ``predictions`` is a list of ``Prediction`` (labels, boxes) or one
    ``Prediction`` for the whole image (a label map)."""
    default_input_size: ClassVar[int]
    default_resize: ClassVar[ResizeMode]
    data_sources: ClassVar[tuple[str, ...]]
    """``dgserve train --data`` values this task reads; ``generated`` is the shapes generator."""
    collate: ClassVar[Callable[[Sequence[Any]], Any] | None] = None
    """The training DataLoader's collate; ``None`` is torch's default (stacking)."""
    augmentation: ClassVar[str] = "random flips and 90° rotations"
    """What ``dgserve train --augment`` (the default) does, for the model card."""
    content_types: ClassVar[frozenset[str]] = ALLOWED_CONTENT_TYPES
    """The media types the task's route accepts (415 for others); ``prepare_upload`` decodes them."""
    whole_image_resized: ClassVar[bool] = False
    """Whether ``prepare`` only resizes the whole image to the manifest's input (``imaging.preprocess``)
    and maps nothing back onto the upload's pixels: then a JPEG may be decoded at a reduced scale that
    still covers the resize (``DGSERVE_JPEG_DRAFT``). A task that maps boxes or masks back needs the
    full-size image and leaves this off."""
    compiles: ClassVar[bool] = True
    """Whether torch.compile can serve the task's forward (DGSERVE_TORCH_COMPILE) with a few graphs
    compiled at load. A task whose model loops over a batch's images in Python, or whose shapes
    depend on the data, would compile anew for batch after batch while serving: it turns this off,
    and its models run eagerly whatever the setting says."""

    # --- manifest -----------------------------------------------------------------

    def head_size(self, labels: Sequence[str]) -> int:
        """``num_classes`` of the head for these labels."""
        return len(labels)

    def check_labels(self, labels: Sequence[str], num_classes: int) -> None:
        """Raise ``ValueError`` when the labels do not fit a head of ``num_classes``."""
        if len(labels) != num_classes:
            raise ValueError(f"{len(labels)} labels but arch_kwargs.num_classes={num_classes}")

    def check_preprocessing(self, pre: Preprocessing) -> None:
        """Raise ``ValueError`` for preprocessing this task cannot serve correctly."""

    def class_name(self, labels: Sequence[str], class_id: int) -> str:
        """The label of a model output index."""
        return labels[class_id]

    def default_preprocessing(self, size: int) -> Preprocessing:
        """What ``dgserve train`` writes into a new model's manifest."""
        # crop_fraction 1.0: a square image of the input size passes untouched.
        return Preprocessing(
            input_size=(size, size), mean=IMAGENET_MEAN, std=IMAGENET_STD,
            interpolation="bilinear", resize=self.default_resize, crop_fraction=1.0,
        )  # fmt: skip

    # --- serving --------------------------------------------------------------------

    def model_inputs_per_image(self, pre: Preprocessing) -> int:
        """The most inputs one model call of ``predict`` makes per image: the compiled warm-up
        (``serving.worker.warm_up_sizes``) must reach the largest batch the model will see."""
        return 1

    @abc.abstractmethod
    def prepare(self, img: Image.Image, pre: Preprocessing) -> tuple[Tensor, Any]:
        """A decoded RGB image to ``(model input, context for predict)``; runs in the decode pool."""

    def prepare_upload(
        self, data: bytes, part: str | None, pre: Preprocessing, settings: Settings
    ) -> tuple[Tensor, ImageInfo, Any]:
        """One upload's bytes to ``(model input, what was uploaded, context for predict)``; in the decode pool.

        The default decodes an image (``serving.decode``: the allowed formats, the pixel
        limit) and hands it to ``prepare``. A task whose uploads are not images (video)
        overrides this and ``content_types``: it owns its decoding and its limits.
        """
        # The thumbnail is at most the model's input size, so a reduced decode serves it too.
        reduce_to = partial(resized_size, pre=pre) if self.whole_image_resized and settings.jpeg_draft else None
        decoded = decode_upload(data, max_pixels=settings.max_image_pixels, part=part, reduce_to=reduce_to)
        img = decoded.image
        tensor, context = self.prepare(img, pre)
        thumbnail = None
        if settings.inspection_thumbnails:  # opt-in: an upload may be private
            thumbnail = model_view_thumbnail(img, pre, settings.inspection_thumbnail_px)
        return tensor, ImageInfo(part, decoded.width, decoded.height, thumbnail), context

    def input_shape(self, pre: Preprocessing) -> tuple[int, ...]:
        """The shape of one preprocessed input, as tensor protocols send it to ``prepare_tensor``."""
        return (3, *pre.input_size)

    def predictions_schema(self) -> Any:
        """The type of one result's ``predictions`` in a response: see ``many``."""
        return list[self.Prediction] if self.many else self.Prediction  # type: ignore[name-defined]

    @abc.abstractmethod
    def predict(
        self, model: nn.Module, items: Sequence[InferenceItem], manifest: Manifest, to_device: ToDevice
    ) -> list[Any]:
        """Run ``model`` on a batch and return each item's predictions, JSON-able, in order.

        Runs in the worker thread under ``torch.inference_mode``; ``to_device`` moves a
        CPU tensor to the worker's device.
        """

    def prepare_tensor(self, tensor: Tensor) -> tuple[Tensor, Any]:
        """An input a client already preprocessed (at the manifest's input size) to ``(input, context)``."""
        return tensor, None

    # --- tensor protocols -----------------------------------------------------------

    @abc.abstractmethod
    def tensor_outputs(self, manifest: Manifest) -> list[TensorSpec]:
        """The prediction tensors this task answers with, for a model's metadata."""

    @abc.abstractmethod
    def to_tensors(self, predictions: Sequence[Any], manifest: Manifest) -> dict[str, np.ndarray]:
        """A batch's ``predict`` output as the tensors ``tensor_outputs`` names (BYTES as object arrays)."""

    # --- training -------------------------------------------------------------------

    @abc.abstractmethod
    def datasets(self, config: TrainConfig, pre: Preprocessing) -> DataBundle:
        """The training and held-out sets for ``config.data``."""

    @abc.abstractmethod
    def loss(self, model: nn.Module, batch: Any, config: TrainConfig, gen: torch.Generator) -> tuple[Tensor, int]:
        """The training loss of one batch (augmented with ``gen`` when ``config.augment``) and its size."""

    @abc.abstractmethod
    def evaluate(self, model: nn.Module, batches: Iterable[Any], num_classes: int, progress: bool) -> dict[str, Any]:
        """Held-out figures; ``headline`` names the one that matters."""

    metric: ClassVar[tuple[str, str]]
    """The held-out figure that matters: its key in ``evaluate``'s dict, and its title."""
    schedule: ClassVar[Schedule] = "cosine"
    """The learning-rate decay after warm-up when ``dgserve train --schedule`` is not given."""
    routing_groups: ClassVar[str]
    """What the per-class routing figures group images by, for the model card."""

    def headline(self, metrics: dict[str, Any]) -> str:
        """The figure a model card and a description lead with, e.g. ``top-1 0.992``."""
        key, title = self.metric
        return f"{title} {metrics[key]:.3f}"

    @abc.abstractmethod
    def card_results(self, final: dict[str, Any], labels: Sequence[str]) -> list[str]:
        """The model card's "Final held-out metrics" lines."""

    def unsupported_source(self, source: str) -> ValueError:
        return ValueError(
            f"--data {source} is not a source for {self.name}; use one of: {', '.join(self.data_sources)}"
        )


_TASKS: dict[str, Task] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: one instance of ``cls`` serves every model of its task."""
    for other in _TASKS.values():
        if other.endpoint == cls.endpoint and other.name != cls.name:
            raise ValueError(f"endpoint {cls.endpoint!r} is taken by task {other.name!r}")
    _TASKS[cls.name] = cls()
    return cls


def get_task(name: str) -> Task:
    try:
        return _TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(sorted(_TASKS))}") from None


def tasks() -> tuple[Task, ...]:
    return tuple(_TASKS.values())
