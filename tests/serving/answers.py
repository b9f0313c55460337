"""What the worker tests feed every bundled model, and how they compare two workers' answers."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from dgserve.model_store import ModelStore
from dgserve.settings import default_model_store
from dgserve.tasks import ImageInfo, InferenceItem, get_task

__all__ = ["BUNDLED", "STORE", "assert_close", "photo_items"]

STORE = ModelStore(default_model_store())
BUNDLED = STORE.names()


def photo_items(model: str, n: int = 2) -> list[InferenceItem]:
    """``n`` crops of one scene, prepared as the model's task prepares uploads."""
    manifest = STORE.resolve(model).manifest
    task = get_task(manifest.task)
    # A noisy scene with a few shapes: the two workers must agree on it, whatever it shows.
    pixels = np.random.default_rng(0).integers(0, 256, (300, 420, 3), dtype=np.uint8)
    photo = Image.fromarray(pixels)
    draw = ImageDraw.Draw(photo)
    draw.ellipse((60, 60, 200, 200), fill=(220, 40, 40))
    draw.rectangle((230, 90, 330, 190), fill=(40, 40, 220))
    items = []
    for k in range(n):
        crop = photo.crop((40 * k, 0, 40 * k + 300, 300))
        tensor, context = task.prepare(crop, manifest.preprocessing)
        items.append(InferenceItem(tensor, ImageInfo(None, *crop.size), task.Options(), context))
    return items


def assert_close(a: Any, b: Any, path: str = "") -> None:
    """Equal JSON values, floats within 1e-4 (another memory layout rounds the convolutions differently)."""
    if isinstance(a, float) or isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-4), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_close(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_close(x, y, f"{path}[{i}]")
    else:
        assert a == b, path
