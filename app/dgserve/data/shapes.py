"""The shape classes and their anti-aliased rasterisation.

Every class is a filled figure whose identity survives any rotation, reflection and
uniform scale, so flips and 90-degree rotations are label-preserving augmentations.
The figures were picked to stay tell-apart at ~12 px circumradius: no pair is a small
deformation of another (no hexagon-vs-circle, no pentagon-vs-star).

A shape is rendered as a *coverage* map: the fraction of each output pixel the figure
covers, measured by drawing at ``SUPERSAMPLE`` times the resolution and box-averaging.
Coverage drives both the anti-aliased compositing and the labels, so the mask a box is
computed from is the very thing that was painted.

This module depends on numpy and Pillow only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# Alphabetical on purpose: torchvision's ImageFolder numbers class folders in sorted
# order, so an ImageFolder export reproduces these indices without a mapping.
CLASSES: tuple[str, ...] = ("circle", "crescent", "cross", "heart", "ring", "square", "star", "triangle")

SUPERSAMPLE = 4

# Coverage at or above this counts as "object" for masks and boxes: the usual
# half-covered rasterisation rule, so a box edge is a pixel where the object dominates.
MASK_THRESHOLD = 0.5

# Per-class ranges for the one free proportion each class has, so a class is a family of
# figures rather than a single template; the ranges stop well short of other classes.
_PROPORTION_RANGES: dict[str, tuple[float, float]] = {
    "star": (0.38, 0.5),  # inner/outer radius: thinner tips vanish at small sizes, fatter look like a blob
    "cross": (0.22, 0.34),  # arm half-width / arm length
    "ring": (0.45, 0.6),  # hole radius / outer radius: the hole must stay several pixels wide
    "crescent": (0.4, 0.55),  # offset of the bite circle / outer radius
}
_CRESCENT_BITE_RADIUS = 0.8


def _heart_outline(points: int = 72) -> np.ndarray:
    t = np.linspace(0.0, 2.0 * math.pi, points, endpoint=False)
    x = 16.0 * np.sin(t) ** 3
    # The classic parametrisation has y pointing up; image rows point down.
    y = -(13.0 * np.cos(t) - 5.0 * np.cos(2 * t) - 2.0 * np.cos(3 * t) - np.cos(4 * t))
    xy = np.stack([x, y], axis=1)
    xy -= (xy.max(axis=0) + xy.min(axis=0)) / 2.0
    return xy / np.hypot(xy[:, 0], xy[:, 1]).max()


_HEART = _heart_outline()


@dataclass(frozen=True)
class ShapeSpec:
    """One object: class, pose and proportion. Lengths are in output pixels.

    ``radius`` is the circumradius: every point of the figure lies within ``radius`` of
    (``cx``, ``cy``), which is what placement uses to keep the figure inside the image.
    """

    label: int
    cx: float
    cy: float
    radius: float
    angle: float
    proportion: float


def sample_proportion(rng: np.random.Generator, label: int) -> float:
    lo, hi = _PROPORTION_RANGES.get(CLASSES[label], (0.0, 0.0))
    return float(rng.uniform(lo, hi)) if hi > lo else 0.0


def _polygon(label: int, proportion: float) -> np.ndarray | None:
    """Unit-circumradius outline of the polygonal classes; None for the round ones."""
    name = CLASSES[label]
    if name == "square":
        a = math.pi / 4 + np.arange(4) * math.pi / 2
        return np.stack([np.cos(a), np.sin(a)], axis=1)
    if name == "triangle":
        a = -math.pi / 2 + np.arange(3) * 2 * math.pi / 3
        return np.stack([np.cos(a), np.sin(a)], axis=1)
    if name == "star":
        a = -math.pi / 2 + np.arange(10) * math.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.0, proportion)
        return np.stack([r * np.cos(a), r * np.sin(a)], axis=1)
    if name == "cross":
        w = proportion
        quarter = np.array([[w, -w], [1.0, -w], [1.0, w]])
        pts = []
        for k in range(4):
            c, s = math.cos(k * math.pi / 2), math.sin(k * math.pi / 2)
            pts.append(quarter @ np.array([[c, s], [-s, c]]))
        return np.concatenate(pts) / math.hypot(1.0, w)
    if name == "heart":
        return _HEART
    return None


def rasterize(spec: ShapeSpec, height: int, width: int) -> tuple[np.ndarray, int, int]:
    """Coverage of ``spec`` as a float32 crop in [0, 1] plus the crop's (x0, y0) offset.

    Only the figure's bounding square is drawn, so the cost is independent of image size.
    """
    x0 = max(math.floor(spec.cx - spec.radius) - 1, 0)
    y0 = max(math.floor(spec.cy - spec.radius) - 1, 0)
    x1 = min(math.ceil(spec.cx + spec.radius) + 1, width)
    y1 = min(math.ceil(spec.cy + spec.radius) + 1, height)
    ss = SUPERSAMPLE
    canvas = Image.new("L", ((x1 - x0) * ss, (y1 - y0) * ss), 0)
    draw = ImageDraw.Draw(canvas)
    ox, oy = (spec.cx - x0) * ss, (spec.cy - y0) * ss
    r = spec.radius * ss
    c, s = math.cos(spec.angle), math.sin(spec.angle)

    def disc(dx: float, dy: float, radius: float, fill: int) -> None:
        px, py = ox + r * (c * dx - s * dy), oy + r * (s * dx + c * dy)
        draw.ellipse([px - radius * r, py - radius * r, px + radius * r, py + radius * r], fill=fill)

    name = CLASSES[spec.label]
    if name == "circle":
        disc(0.0, 0.0, 1.0, 255)
    elif name == "ring":
        disc(0.0, 0.0, 1.0, 255)
        disc(0.0, 0.0, spec.proportion, 0)
    elif name == "crescent":
        disc(0.0, 0.0, 1.0, 255)
        disc(spec.proportion, 0.0, _CRESCENT_BITE_RADIUS, 0)
    else:
        outline = _polygon(spec.label, spec.proportion)
        assert outline is not None
        rot = np.array([[c, s], [-s, c]])
        pts = outline @ rot * r + np.array([ox, oy])
        draw.polygon([(float(x), float(y)) for x, y in pts], fill=255)
    coverage = np.asarray(canvas.reduce(ss), dtype=np.float32) / 255.0
    return coverage, x0, y0
