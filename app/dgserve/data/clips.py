"""Procedural videos of one shape in motion, labelled by how it moves.

The classes are motions a single frame cannot tell apart: the same shape, on the same
kind of background, at the same kinds of positions and sizes, either moves left,
right, up or down, grows, shrinks, or rotates in place. Only the change between
frames carries the label, so a model has to look across time.

Video ``index`` of a draw with ``seed`` is a pure function of ``(seed, index)`` (its
random numbers come from a generator seeded by ``(stream, seed, index)``, as the
scenes' are), so datasets render lazily and a held-out draw is another seed.

Why the label is unambiguous:

* circles and rings are left out: a rotating disc looks still. Every other shape has
  at most 4-fold symmetry (the cross), and no rotation is fast enough to alias: even
  at a clip stride of 4 frames, consecutive sampled frames turn < 40°, under half of
  the smallest symmetry angle (90°);
* moves keep the whole shape inside the frame (the start point is drawn so that the
  end point is inside too), and grow/shrink change the radius by a factor of at
  least 1.6, far beyond the grain;
* the background never moves, and the shape's colour keeps the scenes' contrast from
  every background pixel (``scenes.CLASSIFICATION_CONFIG.min_contrast``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Final

import numpy as np
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from dgserve.model_store.manifest import ClipSampling, Preprocessing
from dgserve.video import clip_indices, clips_tensor

from .scenes import CLASSIFICATION_CONFIG, _background, _rng
from .textures import pick_fill
from .shapes import CLASSES, ShapeSpec, rasterize, sample_proportion

__all__ = ["MOTIONS", "SHAPES", "MotionClips", "render_clip"]

# Alphabetical, like the shape classes, so a folder export numbers them the same.
MOTIONS: Final[tuple[str, ...]] = ("grow", "move_down", "move_left", "move_right", "move_up", "rotate", "shrink")

SHAPES: Final[tuple[str, ...]] = tuple(name for name in CLASSES if name not in ("circle", "ring"))
"""The shapes a clip draws: every class whose rotation is visible."""

_CLIP_STREAM = 5  # scenes use 1-3 (classification, detection, segmentation)
_JITTER_STREAM = 6  # training clips' start frames

# Per-frame motion, as fractions of the frame side (moves) or degrees (rotation). At the
# bundled model's sampling (stride 2), a move covers 1-2 px per sampled frame at 32 px.
_SPEED = (0.015, 0.028)
_TURN_DEG = (4.0, 9.0)
_RADIUS = (0.12, 0.2)
_SCALE_CHANGE = (1.6, 2.1)
_GRAIN = 6.0


def render_clip(
    seed: int, index: int, size: int = 32, frames: int = 16, keep: Sequence[int] | None = None
) -> tuple[np.ndarray, int]:
    """One video, ``(uint8 [frames, size, size, 3], motion label)``.

    Labels cycle through the motions (``index % len(MOTIONS)``), so every prefix of a
    draw is balanced; everything else is random given ``(seed, index)``. ``keep``
    renders only those frames, in that order (a clip sampler needs a few of them): the
    motion is the same, only the per-frame grain differs from a full render's.
    """
    if frames < 2 or size < 8:
        raise ValueError(f"need at least 2 frames of 8 px, got {frames} frames of {size} px")
    label = index % len(MOTIONS)
    rng = _rng(_CLIP_STREAM, seed, index)
    motion = MOTIONS[label]
    shape = CLASSES.index(SHAPES[int(rng.integers(len(SHAPES)))])
    background, fill = _colours(rng, size)
    specs = _trajectory(rng, motion, shape, size, frames)
    grain = rng.uniform(0.0, _GRAIN)
    wanted = range(frames) if keep is None else keep
    out = np.empty((len(wanted), size, size, 3), np.uint8)
    for t, frame in enumerate(wanted):
        spec = specs[frame]
        image = background.copy()
        coverage, x0, y0 = rasterize(spec, size, size)
        h, w = coverage.shape
        region = image[y0 : y0 + h, x0 : x0 + w]
        region += coverage[..., None] * (fill - region)
        image += rng.uniform(-grain, grain, image.shape).astype(np.float32)
        out[t] = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return out, label


def _colours(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    # The shape may pass over any pixel, so its fill must contrast with all of them.
    for _ in range(16):
        background = _background(rng, size, CLASSIFICATION_CONFIG).astype(np.float32)
        picked = pick_fill(rng, background.reshape(-1, 3), False, CLASSIFICATION_CONFIG.min_contrast)
        if picked is not None:
            return background, picked[0].astype(np.float32)
    raise RuntimeError("no contrasting fill found for 16 backgrounds in a row")


def _trajectory(rng: np.random.Generator, motion: str, shape: int, size: int, frames: int) -> list[ShapeSpec]:
    """The shape's pose in every frame."""
    proportion = sample_proportion(rng, shape)
    angle = float(rng.uniform(0.0, 2.0 * math.pi))
    steps = np.arange(frames, dtype=np.float64)
    if motion in ("grow", "shrink"):
        change = rng.uniform(*_SCALE_CHANGE)
        small = rng.uniform(_RADIUS[0] * 0.75, _RADIUS[1] * 1.25 / change) * size
        ratio = change ** (steps / (frames - 1))
        radii = small * (ratio if motion == "grow" else ratio[::-1])
        cx, cy = _point(rng, size, float(radii.max()), 0.0, 0.0)
        return [ShapeSpec(shape, cx, cy, float(r), angle, proportion) for r in radii]
    radius = rng.uniform(*_RADIUS) * size
    if motion == "rotate":
        turn = math.radians(rng.uniform(*_TURN_DEG)) * (1 if rng.random() < 0.5 else -1)
        cx, cy = _point(rng, size, radius, 0.0, 0.0)
        return [ShapeSpec(shape, cx, cy, radius, angle + turn * float(t), proportion) for t in steps]
    dx, dy = {"move_left": (-1, 0), "move_right": (1, 0), "move_up": (0, -1), "move_down": (0, 1)}[motion]
    speed = rng.uniform(*_SPEED) * size
    travel_x, travel_y = dx * speed * (frames - 1), dy * speed * (frames - 1)
    cx, cy = _point(rng, size, radius, travel_x, travel_y)
    return [ShapeSpec(shape, cx + dx * speed * t, cy + dy * speed * t, radius, angle, proportion) for t in steps]


def _point(rng: np.random.Generator, size: int, radius: float, travel_x: float, travel_y: float) -> tuple[float, float]:
    """A start point from which the shape, moved by ``travel``, stays inside the frame."""

    def axis(travel: float) -> float:
        lo, hi = radius + 1.0 - min(travel, 0.0), size - radius - 1.0 - max(travel, 0.0)
        if hi < lo:  # the path is longer than the frame allows: centre it
            return (lo + hi) / 2.0
        return float(rng.uniform(lo, hi))

    return axis(travel_x), axis(travel_y)


# --- as a torch Dataset ------------------------------------------------------------


class MotionClips(Dataset[tuple[Tensor, int]]):
    """``n`` generated videos of ``length`` frames as ``(clips (K, 3, T, H, W), label)``.

    The clips are cut and preprocessed exactly as the server cuts an upload
    (``dgserve.video``), so a model trains on the tensors it will be served. With
    ``jitter`` (training) an item is one clip from a random start instead of the
    manifest's ``num_clips``: a temporal crop, drawn from ``(seed, index)``.
    """

    def __init__(self, n: int, seed: int, pre: Preprocessing, length: int = 24, jitter: bool = False) -> None:
        if n < 0 or seed < 0:
            raise ValueError(f"n and seed must be non-negative, got n={n}, seed={seed}")
        if pre.clips is None or pre.input_size[0] != pre.input_size[1]:
            raise ValueError("generated clips need square frames and preprocessing.clips")
        self.n, self.seed, self.pre, self.length, self.jitter = n, seed, pre, length, jitter
        self.sampling: ClipSampling = pre.clips

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} clips")
        if self.jitter:
            t, stride = self.sampling.frames_per_clip, self.sampling.frame_stride
            room = max(0, self.length - (t - 1) * stride - 1)
            start = int(np.random.default_rng([_JITTER_STREAM, self.seed, index]).integers(room + 1))
            clips = [[min(start + i * stride, self.length - 1) for i in range(t)]]
        else:
            clips = clip_indices(self.length, self.sampling)
        keep = sorted({i for clip in clips for i in clip})
        frames, label = render_clip(self.seed, index, self.pre.input_size[0], self.length, keep)
        images = dict(zip(keep, (Image.fromarray(f) for f in frames), strict=True))
        return clips_tensor(images, clips, self.pre), label
