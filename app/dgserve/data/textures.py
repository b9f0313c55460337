"""The colours and textures of generated scenes: two-colour patterns, and fills that stand out.

Every pattern is a per-pixel mixing weight between two colours, so the colours under an
object are known exactly before it is painted (``scenes.py`` says why that matters).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

__all__ = ["dilate", "pattern", "pick_fill"]

# The eight RGB cube corners are the fallback fills: whatever segment [A, B] of colour
# space a background spans, one of them is far from it, so a fill always exists.
_CORNERS = np.array(
    [[r, g, b] for r in (0.0, 255.0) for g in (0.0, 255.0) for b in (0.0, 255.0)],
    dtype=np.float32,
)


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation by a (2r+1)-square, separable so it costs 2(2r+1) slices."""
    if radius <= 0:
        return mask.copy()
    out = mask.copy()
    for axis in (0, 1):
        src = out.copy()
        n = src.shape[axis]
        for shift in range(1, radius + 1):
            if shift >= n:
                break
            lead = [slice(None)] * 2
            trail = [slice(None)] * 2
            lead[axis], trail[axis] = slice(shift, None), slice(None, n - shift)
            out[tuple(trail)] |= src[tuple(lead)]
            out[tuple(lead)] |= src[tuple(trail)]
    return out


def pattern(rng: np.random.Generator, kind: str, height: int, width: int, period: tuple[float, float]) -> np.ndarray:
    """Mixing weight in [0, 1] per pixel between a texture's two colours."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    theta = rng.uniform(0.0, math.pi)
    u = xx * math.cos(theta) + yy * math.sin(theta)
    v = -xx * math.sin(theta) + yy * math.cos(theta)
    if kind == "solid":
        return np.zeros((height, width), np.float32)
    if kind == "linear":
        return (u - u.min()) / max(float(u.max() - u.min()), 1e-6)
    if kind == "radial":
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        d = np.hypot(xx - cx, yy - cy)
        return d / max(float(d.max()), 1e-6)
    if kind == "stripes":
        p = rng.uniform(*period)
        return (((u / p + rng.uniform()) % 1.0) < 0.5).astype(np.float32)
    if kind == "checker":
        p = rng.uniform(*period)
        ph = rng.uniform(0.0, 1.0, 2)
        return ((np.floor(u / p + ph[0]) + np.floor(v / p + ph[1])) % 2).astype(np.float32)
    if kind == "clouds":
        cells = int(rng.integers(3, 7))
        grid = Image.fromarray(rng.random((cells, cells), dtype=np.float32))
        smooth = np.asarray(grid.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
        return (smooth - smooth.min()) / max(float(smooth.max() - smooth.min()), 1e-6)
    raise ValueError(f"unknown pattern {kind!r}")


def _second_tone(rng: np.random.Generator, colour: np.ndarray) -> np.ndarray:
    # A darker or lighter shade of the fill keeps the object one coherent colour family.
    if rng.random() < 0.5:
        return colour * rng.uniform(0.6, 0.8)
    return colour + (255.0 - colour) * rng.uniform(0.25, 0.45)


def pick_fill(
    rng: np.random.Generator, bg_pixels: np.ndarray, textured: bool, min_contrast: float
) -> tuple[np.ndarray, np.ndarray] | None:
    """Fill colour and second texture tone, both ``min_contrast`` from every pixel."""

    def clearance(colour: np.ndarray) -> float:
        return float(np.sqrt(((bg_pixels - colour) ** 2).sum(axis=1)).min())

    for _ in range(24):
        first = rng.uniform(0.0, 255.0, 3).astype(np.float32)
        second = _second_tone(rng, first) if textured else first
        if min(clearance(first), clearance(second)) >= min_contrast:
            return first, second
    scores = [clearance(c) for c in _CORNERS]
    best = int(np.argmax(scores))
    if scores[best] >= min_contrast:
        return _CORNERS[best], _CORNERS[best]
    return None
