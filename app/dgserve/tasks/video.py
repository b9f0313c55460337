"""Video classification: one video in, its top-k labels out, averaged over the manifest's clips.

A video task differs from image classification in what it accepts, not in what it
answers, so it is image classification (``Classification``) with its own uploads:

* ``content_types`` and ``prepare_upload`` (the task seam): MP4/MOV, WebM/Matroska and
  GIF uploads are decoded with PyAV under the ``DGSERVE_MAX_VIDEO_*`` limits
  (``dgserve.video``), then cut into ``preprocessing.clips``: ``num_clips`` clips of
  ``frames_per_clip`` frames, every ``frame_stride``-th frame. An item's tensor is
  ``(clips, 3, T, H, W)``;
* ``predict`` averages each video's clip probabilities. Its centre clip runs last, so
  that the GloRe units' records of that last forward are one per video: a video's
  connectivity is its centre clip's, each 3-D unit's projection map per frame position
  (``frames`` = T of the unit's feature map);
* the Open Inference Protocol's preprocessed ``input`` is one clip per video,
  ``FP32 [N, 3, T, H, W]``; its encoded ``image`` input takes video files as it takes
  images.

Training reads generated motion clips (``dgserve.data.clips``) or class folders of
video files, cut exactly as the server cuts uploads. Flips would turn ``move_left``
into ``move_right``, so ``--augment`` means only that each generated training video
gives one clip from a random start frame.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Final

import torch
from PIL import Image
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from dgserve.data.clips import MOTIONS, MotionClips
from dgserve.data.sources import DataBundle, split
from dgserve.model_store.manifest import ClipSampling, Manifest, Preprocessing, ResizeMode
from dgserve.tasks.base import ImageInfo, InferenceItem, ToDevice, register_task
from dgserve.tasks.classification import Classification
from dgserve.video import VIDEO_CONTENT_TYPES, VideoLimits, clip_indices, clips_tensor, cover_size, decode_video

if TYPE_CHECKING:
    from dgserve.settings import Settings
    from dgserve.training.config import TrainConfig

__all__ = ["DEFAULT_CLIPS", "GENERATED_LENGTH", "VideoClassification", "VideoFolder", "VideoInfo"]

DEFAULT_CLIPS: Final = ClipSampling(frames_per_clip=8, frame_stride=2, num_clips=2)
"""What ``dgserve train`` writes into a new video model's manifest (edit it there to serve otherwise)."""
GENERATED_LENGTH: Final = 24
"""Frames of a generated training video: one clip spans 15 at the default sampling, leaving room to jitter."""
VIDEO_SUFFIXES: Final = (".mp4", ".m4v", ".mov", ".webm", ".mkv", ".gif")


@dataclass(frozen=True, slots=True)
class VideoInfo(ImageInfo):
    """The uploaded video: its frame size (``width``, ``height``), decoded frames and length."""

    frames: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**ImageInfo.to_dict(self), "frames": self.frames, "seconds": round(self.seconds, 3)}


@register_task
class VideoClassification(Classification):
    name: ClassVar[str] = "video_classification"
    endpoint: ClassVar[str] = "classify-video"
    summary: ClassVar[str] = (
        "Classify videos (MP4, WebM, GIF); each result carries its top-k labels, averaged over the "
        "manifest's clips, and the centre clip's path through the network."
    )
    content_types: ClassVar[frozenset[str]] = VIDEO_CONTENT_TYPES
    default_input_size: ClassVar[int] = 32
    default_resize: ClassVar[ResizeMode] = "center_crop"
    data_sources: ClassVar[tuple[str, ...]] = ("generated", "imagefolder")
    routing_groups: ClassVar[str] = "video's class"
    augmentation: ClassVar[str] = (
        "each training video gives one clip from a random start frame; no flips, which would swap move_left and move_right"
    )

    # --- manifest -----------------------------------------------------------------

    def check_preprocessing(self, pre: Preprocessing) -> None:
        if pre.clips is None:
            raise ValueError("a video model needs preprocessing.clips (frames_per_clip, frame_stride, num_clips)")

    def default_preprocessing(self, size: int) -> Preprocessing:
        return super().default_preprocessing(size).model_copy(update={"clips": DEFAULT_CLIPS})

    # --- serving --------------------------------------------------------------------

    def prepare_upload(
        self, data: bytes, part: str | None, pre: Preprocessing, settings: Settings
    ) -> tuple[Tensor, ImageInfo, Any]:
        limits = VideoLimits(settings.max_video_seconds, settings.max_video_frames, settings.max_video_frame_pixels)
        video = decode_video(data, limits, cover=cover_size(pre), part=part)
        tensor = clips_tensor(video.frames, clip_indices(len(video.frames), _sampling(pre)), pre)
        return tensor, VideoInfo(part, video.width, video.height, frames=len(video.frames), seconds=video.seconds), None

    def prepare(self, img: Image.Image, pre: Preprocessing) -> tuple[Tensor, Any]:
        """A still image as a one-frame video (the worker's warm-up sends one)."""
        return clips_tensor([img], clip_indices(1, _sampling(pre)), pre), None

    def input_shape(self, pre: Preprocessing) -> tuple[int, ...]:
        return (3, _sampling(pre).frames_per_clip, *pre.input_size)

    def prepare_tensor(self, tensor: Tensor) -> tuple[Tensor, Any]:
        return tensor.unsqueeze(0), None  # one clip

    def model_inputs_per_image(self, pre: Preprocessing) -> int:
        # predict runs the model on every video's other clips in one call.
        return max(1, _sampling(pre).num_clips - 1)

    def predict(
        self, model: nn.Module, items: Sequence[InferenceItem], manifest: Manifest, to_device: ToDevice
    ) -> list[list[dict[str, Any]]]:
        centres = [len(item.tensor) // 2 for item in items]
        others = [clip for item, c in zip(items, centres, strict=True) for j, clip in enumerate(item.tensor) if j != c]
        other_probs = _probs(model, to_device(torch.stack(others))) if others else None
        # Last, so that what the connectivity sources keep of it is one clip per video.
        centre_clips = [item.tensor[c] for item, c in zip(items, centres, strict=True)]
        centre_probs = _probs(model, to_device(torch.stack(centre_clips)))
        rows, used = [], 0
        for index, item in enumerate(items):
            more = len(item.tensor) - 1  # the video's other clips, in order in other_probs
            mine = centre_probs[index : index + 1]
            if more:
                assert other_probs is not None
                mine = torch.cat([mine, other_probs[used : used + more]])
                used += more
            rows.append(mine.mean(0))
        return self.top_k(torch.stack(rows), items, manifest)

    # --- training -------------------------------------------------------------------

    def datasets(self, config: TrainConfig, pre: Preprocessing) -> DataBundle:
        if config.data == "imagefolder":
            return _video_folders(config, pre)
        if config.data != "generated":
            raise self.unsupported_source(config.data)
        size, sampling = pre.input_size[0], _sampling(pre)
        description = (
            f"Procedurally generated motion clips (`dgserve.data.clips`; {size}x{size} px, {GENERATED_LENGTH} frames; "
            f"{len(MOTIONS)} classes: {', '.join(MOTIONS)}). Training: {config.train_size} videos, seed "
            f"{config.data_seed}{', one clip each from a random start' if config.augment else ', cut as served'}. "
            f"Held-out: {config.val_size} videos, seed "
            f"{config.val_seed}, {sampling.num_clips} clips of {sampling.frames_per_clip} frames at stride "
            f"{sampling.frame_stride}, averaged, as served."
        )
        return DataBundle(
            MotionClips(config.train_size, config.data_seed, pre, GENERATED_LENGTH, jitter=config.augment),
            MotionClips(config.val_size, config.val_seed, pre, GENERATED_LENGTH),
            list(MOTIONS),
            description,
        )

    def loss(self, model: nn.Module, batch: Any, config: TrainConfig, gen: torch.Generator) -> tuple[Tensor, int]:
        clips, labels = batch  # (B, K, 3, T, H, W): every clip of a video carries its label
        k = clips.shape[1]
        logits = model(clips.flatten(0, 1))
        return F.cross_entropy(logits, labels.repeat_interleave(k), label_smoothing=config.label_smoothing), len(labels)

    def scores(self, model: nn.Module, inputs: Tensor) -> Tensor:
        """A video's scores are its clips' probabilities, averaged, as ``predict`` serves them."""
        n, k = inputs.shape[:2]
        return torch.softmax(model(inputs.flatten(0, 1)).float(), dim=1).reshape(n, k, -1).mean(1)

    def card_results(self, final: dict[str, Any], labels: Sequence[str]) -> list[str]:
        per_class = ", ".join(f"{label} {acc:.3f}" for label, acc in zip(labels, final["per_class_top1"], strict=True))
        return [f"- Top-1: **{final['top1']:.4f}** on {final['images']} held-out videos.", f"- Per class: {per_class}."]


def _sampling(pre: Preprocessing) -> ClipSampling:
    if pre.clips is None:  # the manifest's validation has refused this already
        raise ValueError("a video model needs preprocessing.clips")
    return pre.clips


def _probs(model: nn.Module, clips: Tensor) -> Tensor:
    return torch.softmax(model(clips).float(), dim=1)


# --- class folders of video files ----------------------------------------------------------


class VideoFolder(Dataset[tuple[Tensor, int]]):
    """Video files in one folder per class (``root/<class>/<video>``), cut as the server cuts uploads.

    Files are decoded with the server's default limits; one that fails to decode fails
    the run, naming the file.
    """

    def __init__(self, root: Path, pre: Preprocessing) -> None:
        from dgserve.settings import Settings

        self.classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        self.files = [
            (path, label)
            for label, name in enumerate(self.classes)
            for path in sorted((root / name).iterdir())
            if path.suffix.lower() in VIDEO_SUFFIXES
        ]
        if not self.files:
            raise ValueError(f"{root} has no video files ({', '.join(VIDEO_SUFFIXES)}) in class folders")
        settings = Settings()
        self.limits = VideoLimits(settings.max_video_seconds, settings.max_video_frames, settings.max_video_frame_pixels)
        self.pre = pre

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path, label = self.files[index]
        video = decode_video(path.read_bytes(), self.limits, cover=cover_size(self.pre), part=str(path))
        clips = clip_indices(len(video.frames), sampling := _sampling(self.pre))
        # A video too short for num_clips gives one clip; repeating it keeps a batch stackable.
        clips += [clips[-1]] * (sampling.num_clips - len(clips))
        return clips_tensor(video.frames, clips, self.pre), label


def _video_folders(config: TrainConfig, pre: Preprocessing) -> DataBundle:
    assert config.data_path is not None  # TrainConfig.validate requires it
    train: Dataset[Any]
    val: Dataset[Any]
    train = folder = VideoFolder(config.data_path, pre)
    if config.val_path is not None:
        val = VideoFolder(config.val_path, pre)
        if val.classes != folder.classes:
            raise ValueError(f"{config.val_path} has classes {val.classes}, {config.data_path} has {folder.classes}")
        held_out = f"held-out: {len(val)} videos from `{config.val_path}`"
    else:
        train, val = split(folder, config.val_fraction, config.seed)
        held_out = f"held-out: a seeded {config.val_fraction:.0%} split ({len(val)} videos)"
    count = len(train)  # type: ignore[arg-type]
    description = f"Video folders `{config.data_path}`: {count} training videos, {len(folder.classes)} classes; {held_out}."
    return DataBundle(train, val, folder.classes, description)
