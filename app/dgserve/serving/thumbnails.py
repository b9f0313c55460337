"""Opt-in thumbnails of uploads, kept with their inspection records (``DGSERVE_INSPECTION_THUMBNAILS``).

A thumbnail is what the model saw, not the upload as sent: the preprocessing's
geometry (``dgserve.imaging``) applied to the decoded image, padding included for a
letterbox, the centre crop cut for ``center_crop``. A GloRe unit's projection map covers
exactly the model's input, so the record picture (``analysis/pictures.py``) can lay the
map over the thumbnail by stretching it to the thumbnail's size, whatever the resize mode,
with no manifest at hand. Stored as a small JPEG: at most ``max_side`` pixels a side.
"""

from __future__ import annotations

import io
from typing import Final

from PIL import Image

from dgserve.imaging import _cover_size, letterbox_geometry
from dgserve.model_store.manifest import Preprocessing

__all__ = ["model_view_thumbnail"]

_QUALITY: Final = 80  # a preview: small, and a projection map is drawn over it anyway
_PAD: Final = (0, 0, 0)  # the letterbox's padding, as a region of no image


def model_view_thumbnail(img: Image.Image, pre: Preprocessing, max_side: int) -> bytes:
    """``img`` (RGB) as the model's input frames it, at most ``max_side`` pixels a side, as JPEG."""
    height, width = pre.input_size
    if pre.resize == "stretch":
        view = img
        size = (width, height)
    elif pre.resize == "center_crop":
        cover_h, cover_w = _cover_size(img.height, img.width, height, width, pre.crop_fraction)
        # The crop's box in the upload's pixels: torchvision's centre crop of the covering size.
        sx, sy = img.width / cover_w, img.height / cover_h
        top, left = int(round((cover_h - height) / 2.0)), int(round((cover_w - width) / 2.0))
        view = img.crop((left * sx, top * sy, (left + width) * sx, (top + height) * sy))
        size = (width, height)
    else:  # letterbox: the image inside its padding, where the model had it
        (new_h, new_w), (pad_left, pad_top, _, _) = letterbox_geometry(img.height, img.width, height, width)
        scale = min(1.0, max_side / max(height, width))
        canvas = Image.new("RGB", (max(1, round(width * scale)), max(1, round(height * scale))), _PAD)
        inner = img.resize((max(1, round(new_w * scale)), max(1, round(new_h * scale))), Image.Resampling.BILINEAR)
        canvas.paste(inner, (round(pad_left * scale), round(pad_top * scale)))
        return _jpeg(canvas)
    scale = min(1.0, max_side / max(size))
    return _jpeg(view.resize((max(1, round(size[0] * scale)), max(1, round(size[1] * scale))), Image.Resampling.BILINEAR))


def _jpeg(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.convert("RGB").save(buffer, "JPEG", quality=_QUALITY)
    return buffer.getvalue()
