"""Procedural scenes of coloured shapes on varied backgrounds, with exact labels.

Scene ``index`` of a dataset with ``seed`` is a pure function of ``(seed, index)``: its
random numbers come from a generator seeded by ``(stream, seed, index)``. Datasets can
therefore be rendered lazily, in any order, in parallel, and a held-out set is simply
another seed. Classification and detection use different streams so the same seed
does not give correlated draws across the two tasks.

Why labels are exact by construction:

* every background is a per-pixel mix of two colours A and B (solid, linear or radial
  gradient, stripes, checkerboard, smooth clouds), so the colours under an object are
  known exactly before it is painted;
* an object's fill colour (and its optional second texture colour) is accepted only if
  it is at least ``min_contrast`` (Euclidean RGB, 0-255) away from *every* background
  pixel under the object and one pixel around it;
* masks and boxes come from the same anti-aliased coverage that was painted
  (coverage >= ``MASK_THRESHOLD``), boxes being the mask's pixel extent in xyxy with
  exclusive right/bottom edges (``[x_min, y_min, x_max + 1, y_max + 1]``);
* objects never touch: each keeps ``gap`` pixels of bare background from the others,
  so nothing is occluded and the full mask is the visible mask;
* distractors are thin open strokes (a segment or a shallow arc, 1-2 px wide) that no
  class resembles, and they are erased within ``gap + 1`` pixels of every object so
  they cannot extend an outline;
* the final per-pixel grain is bounded so that, even on both sides of an edge at
  once, it cannot close the ``min_contrast`` gap.

What keeps it learnable yet beyond a linear probe: position, scale, rotation, colours
and background all vary independently of the class, so no pixel's value correlates
with the label (a raw-pixel probe stays near chance); meanwhile stripe and check
backgrounds swing by at most ``texture_contrast`` so an object's outline is always the
strongest edge in its neighbourhood, which is what lets a small convnet find it fast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from .shapes import CLASSES, MASK_THRESHOLD, SUPERSAMPLE, ShapeSpec, rasterize, sample_proportion
from .textures import dilate, pattern, pick_fill

NUM_CLASSES = len(CLASSES)

BACKGROUNDS: tuple[str, ...] = ("solid", "linear", "radial", "stripes", "checker", "clouds")

_CLASSIFICATION_STREAM = 1
_DETECTION_STREAM = 2
_SEGMENTATION_STREAM = 3

# Objects smaller than this (circumradius, px) are always plain: see ``_place``.
_MIN_TEXTURED_RADIUS = 12.0

@dataclass(frozen=True)
class SceneConfig:
    """Knobs of the generator. Sizes are fractions of the image side so one config
    serves any resolution; ``min_contrast`` and ``grain`` are in 0-255 RGB units."""

    radius: tuple[float, float]
    """Range of an object's circumradius as a fraction of the image side."""
    distractors: tuple[int, int] = (0, 2)
    """Inclusive range of the number of thin distractor strokes."""
    texture_probability: float = 0.25
    """Chance that an object is filled with a two-tone stripe or check pattern."""
    texture_period: tuple[float, float] = (3.0, 8.0)
    """Period in pixels of background stripes and checks: below the smallest object so
    they read as texture, never as a shape. Object textures scale with the object."""
    texture_contrast: float = 80.0
    """Largest RGB distance between the two colours of a stripe or check background."""
    grain: float = 10.0
    """Upper bound on the amplitude of the uniform per-pixel noise added last."""
    min_contrast: float = 96.0
    gap: int = 2
    """Pixels of bare background kept between objects; distractors keep one more."""
    placement_attempts: int = 40

    def __post_init__(self) -> None:
        lo, hi = self.radius
        if not 0.0 < lo <= hi < 0.5:
            raise ValueError(f"radius range must satisfy 0 < lo <= hi < 0.5, got {self.radius}")
        # Grain is per channel, so its RGB norm reaches sqrt(3) * grain on each side of an edge.
        if 2.0 * math.sqrt(3.0) * self.grain >= self.min_contrast:
            raise ValueError("grain must stay well below min_contrast or labels stop being exact")


# Objects span 48-88 % of the image width: large enough that the class is obvious at
# 64 px, varied enough in scale, pose and colour that raw pixels do not linearly separate.
CLASSIFICATION_CONFIG = SceneConfig(radius=(0.24, 0.44))
# Diameters of ~20-51 px at 128 px: inside the range Faster R-CNN's smallest FPN
# anchors (32 px) cover, with room for up to five objects.
DETECTION_CONFIG = SceneConfig(radius=(0.08, 0.2), distractors=(0, 3))
# Diameters of ~31-61 px at 96 px: four to eight cells of an output-stride-8 FCN, so
# a shape's outline is resolvable, with room for up to three objects.
SEGMENTATION_CONFIG = SceneConfig(radius=(0.16, 0.32), distractors=(0, 3))


class DetectionScene(NamedTuple):
    image: Image.Image
    boxes: np.ndarray
    """float32 [K, 4] xyxy, exclusive right/bottom: the extent of ``masks[k]``."""
    labels: np.ndarray
    """int64 [K], 0-based indices into ``CLASSES``."""
    masks: np.ndarray
    """bool [K, H, W], coverage >= ``MASK_THRESHOLD``."""


def _rng(stream: int, seed: int, index: int) -> np.random.Generator:
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed}, index={index}")
    return np.random.default_rng([stream, seed, index])


def _background(rng: np.random.Generator, size: int, config: SceneConfig) -> np.ndarray:
    kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    a, b = rng.uniform(0.0, 255.0, (2, 3)).astype(np.float32)
    if kind in ("stripes", "checker"):
        # Hard-edged textures get a bounded colour swing: their edges must stay weaker
        # than an object's outline, or figure/ground separation is what a net spends
        # its training budget on instead of shape.
        step = b - a
        swing = rng.uniform(0.25, 1.0) * config.texture_contrast
        b = np.clip(a + step * (swing / max(float(np.linalg.norm(step)), 1e-6)), 0.0, 255.0)
    w = pattern(rng, kind, size, size, config.texture_period)
    return a + w[..., None] * (b - a)


@dataclass
class _Placed:
    spec: ShapeSpec
    coverage: np.ndarray
    x0: int
    y0: int
    fill: np.ndarray


def _sample_spec(rng: np.random.Generator, label: int, size: int, config: SceneConfig) -> ShapeSpec:
    radius = rng.uniform(*config.radius) * size
    # One pixel of margin beyond the circumradius so anti-aliasing never clips.
    lo, hi = radius + 1.0, size - radius - 1.0
    return ShapeSpec(
        label=label,
        cx=float(rng.uniform(lo, hi)),
        cy=float(rng.uniform(lo, hi)),
        radius=float(radius),
        angle=float(rng.uniform(0.0, 2.0 * math.pi)),
        proportion=sample_proportion(rng, label),
    )


def _fill_image(
    rng: np.random.Generator, first: np.ndarray, second: np.ndarray, h: int, w: int, radius: float
) -> np.ndarray:
    if np.array_equal(first, second):
        return np.broadcast_to(first, (h, w, 3))
    kind = "stripes" if rng.random() < 0.5 else "checker"
    # The pattern scales with the object so a small object keeps several periods across
    # it and its outline is not swallowed by one or two big checks.
    period = (max(2.5, 0.2 * radius), max(3.0, 0.4 * radius))
    t = pattern(rng, kind, h, w, period)
    return first + t[..., None] * (second - first)


def _place(
    rng: np.random.Generator,
    label: int,
    size: int,
    background: np.ndarray,
    blocked: np.ndarray,
    config: SceneConfig,
) -> _Placed | None:
    """Try poses until one clears ``blocked`` and admits a contrasting fill."""
    for _ in range(config.placement_attempts):
        spec = _sample_spec(rng, label, size, config)
        coverage, x0, y0 = rasterize(spec, size, size)
        h, w = coverage.shape
        touched = coverage > 0.0
        if not (coverage >= MASK_THRESHOLD).any() or (blocked[y0 : y0 + h, x0 : x0 + w] & touched).any():
            continue
        # Contrast is checked against the background one pixel around the figure too,
        # so its outline is visible from both sides of every edge.
        halo = np.zeros((size, size), bool)
        halo[y0 : y0 + h, x0 : x0 + w] = touched
        halo = dilate(halo, 1)
        # A pattern needs several periods across an object to read as texture rather than
        # as a ragged outline, so small objects stay plain.
        textured = rng.random() < config.texture_probability and spec.radius >= _MIN_TEXTURED_RADIUS
        picked = pick_fill(rng, background[halo], textured, config.min_contrast)
        if picked is None:
            continue
        fill = _fill_image(rng, picked[0], picked[1], h, w, spec.radius)
        return _Placed(spec, coverage, x0, y0, fill)
    return None


def _distractors(rng: np.random.Generator, image: np.ndarray, keep_out: np.ndarray, config: SceneConfig) -> None:
    size = image.shape[0]
    ss = SUPERSAMPLE
    count = int(rng.integers(config.distractors[0], config.distractors[1] + 1))
    for _ in range(count):
        canvas = Image.new("L", (size * ss, size * ss), 0)
        draw = ImageDraw.Draw(canvas)
        width = int(rng.integers(1, 3)) * ss
        if rng.random() < 0.5:
            p = rng.uniform(0.0, size * ss, 4)
            length = float(np.hypot(p[2] - p[0], p[3] - p[1]))
            if length < 0.25 * size * ss:
                continue
            draw.line([(float(p[0]), float(p[1])), (float(p[2]), float(p[3]))], fill=255, width=width)
        else:
            # A shallow arc (at most 150 degrees) so it can never be read as a ring.
            r = rng.uniform(0.15, 0.4) * size * ss
            cx, cy = rng.uniform(0.0, size * ss, 2)
            start = rng.uniform(0.0, 360.0)
            draw.arc([cx - r, cy - r, cx + r, cy + r], start, start + rng.uniform(50.0, 150.0), fill=255, width=width)
        alpha = np.asarray(canvas.reduce(ss), dtype=np.float32) / 255.0
        alpha[keep_out] = 0.0
        colour = rng.uniform(0.0, 255.0, 3).astype(np.float32)
        image += alpha[..., None] * (colour - image)


def _compose(
    rng: np.random.Generator, size: int, labels: list[int], config: SceneConfig
) -> tuple[np.ndarray, list[_Placed]]:
    """Paint ``labels`` in order; the first must be placed, later ones may not fit."""
    for _ in range(8):
        background = _background(rng, size, config)
        occupied = np.zeros((size, size), bool)
        blocked = np.zeros((size, size), bool)
        placed: list[_Placed] = []
        for k, label in enumerate(labels):
            obj = _place(rng, label, size, background, blocked, config)
            if obj is None:
                if k == 0:
                    break
                continue
            h, w = obj.coverage.shape
            occupied[obj.y0 : obj.y0 + h, obj.x0 : obj.x0 + w] |= obj.coverage > 0.0
            blocked = dilate(occupied, config.gap)
            placed.append(obj)
        if not placed:
            # The first object always fits an empty canvas, so only a background with no
            # contrasting colour anywhere near it gets here; a fresh background drawn
            # from the same generator keeps the scene deterministic.
            continue
        image = background.copy()
        _distractors(rng, image, dilate(occupied, config.gap + 1), config)
        for obj in placed:
            h, w = obj.coverage.shape
            region = image[obj.y0 : obj.y0 + h, obj.x0 : obj.x0 + w]
            region += obj.coverage[..., None] * (obj.fill - region)
        amplitude = rng.uniform(0.0, config.grain)
        image += rng.uniform(-amplitude, amplitude, image.shape).astype(np.float32)
        return image, placed
    raise RuntimeError("could not compose a scene with contrasting colours; min_contrast is too high")


def _to_pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(image), 0, 255).astype(np.uint8))


def render_classification(
    seed: int, index: int, size: int = 64, config: SceneConfig = CLASSIFICATION_CONFIG
) -> tuple[Image.Image, int]:
    """One object, anywhere in the frame, on a random background: (RGB image, label).

    Labels cycle through the classes (``index % NUM_CLASSES``) so every prefix of a
    dataset is balanced; the image itself is random given ``(seed, index)``.
    """
    label = index % NUM_CLASSES
    rng = _rng(_CLASSIFICATION_STREAM, seed, index)
    image, _ = _compose(rng, size, [label], config)
    return _to_pil(image), label


def render_detection_scene(
    seed: int, index: int, size: int = 128, max_objects: int = 5, config: SceneConfig = DETECTION_CONFIG
) -> DetectionScene:
    """A scene of 1..``max_objects`` non-touching objects with masks, boxes and labels.

    The object count is drawn first; an object that finds no free, contrasting spot in
    ``placement_attempts`` tries is left out, so crowded draws may hold fewer (never 0).
    """
    return _render_scene(_DETECTION_STREAM, seed, index, size, max_objects, config)


def render_segmentation(
    seed: int, index: int, size: int = 96, max_objects: int = 3, config: SceneConfig = SEGMENTATION_CONFIG
) -> tuple[Image.Image, np.ndarray]:
    """A scene of 1..``max_objects`` objects and its label map: (RGB image, uint8 [H, W]).

    The label map holds 0 for background and ``k + 1`` where ``CLASSES[k]`` covers the
    pixel (the same masks detection's boxes come from; objects never touch, so no
    pixel has two labels). Its own random stream: not the detection scenes' draws.
    """
    scene = _render_scene(_SEGMENTATION_STREAM, seed, index, size, max_objects, config)
    label_map = np.zeros((size, size), np.uint8)
    for mask, label in zip(scene.masks, scene.labels, strict=True):
        label_map[mask] = label + 1
    return scene.image, label_map


def _render_scene(
    stream: int, seed: int, index: int, size: int, max_objects: int, config: SceneConfig
) -> DetectionScene:
    if max_objects < 1:
        raise ValueError(f"max_objects must be >= 1, got {max_objects}")
    rng = _rng(stream, seed, index)
    count = int(rng.integers(1, max_objects + 1))
    labels = [int(c) for c in rng.integers(0, NUM_CLASSES, count)]
    image, placed = _compose(rng, size, labels, config)
    masks = np.zeros((len(placed), size, size), bool)
    boxes = np.zeros((len(placed), 4), np.float32)
    for k, obj in enumerate(placed):
        h, w = obj.coverage.shape
        masks[k, obj.y0 : obj.y0 + h, obj.x0 : obj.x0 + w] = obj.coverage >= MASK_THRESHOLD
        ys, xs = np.nonzero(masks[k])
        boxes[k] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    out_labels = np.array([obj.spec.label for obj in placed], dtype=np.int64)
    return DetectionScene(_to_pil(image), boxes, out_labels, masks)


def render_detection(
    seed: int, index: int, size: int = 128, max_objects: int = 5, config: SceneConfig = DETECTION_CONFIG
) -> tuple[Image.Image, np.ndarray, np.ndarray]:
    """(RGB image, float32 [K, 4] xyxy boxes, int64 [K] 0-based labels); see
    ``render_detection_scene`` for the masks the boxes are computed from."""
    scene = render_detection_scene(seed, index, size, max_objects, config)
    return scene.image, scene.boxes, scene.labels
