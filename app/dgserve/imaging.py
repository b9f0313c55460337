"""Pixels to model inputs, the way every task and the trainer do it.

The manifest's preprocessing (resize mode, interpolation, mean/std) is applied here
with torchvision's resampling, the same kernels the weights were evaluated with, never
a hand-rolled one. Tasks build on ``preprocess``; training datasets use the very same
functions, so a model is trained on exactly the tensors it will be served.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from dgserve.model_store.manifest import Interpolation, Preprocessing

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "interpolation_mode", "letterbox_geometry", "preprocess", "preprocess_pixels",
    "resize", "resized_size", "to_rgb",
]

# The statistics torchvision's ImageNet weights were trained with, for pixels in [0, 1].
IMAGENET_MEAN: Final[tuple[float, float, float]] = (0.485, 0.456, 0.406)
IMAGENET_STD: Final[tuple[float, float, float]] = (0.229, 0.224, 0.225)

_INTERPOLATION: Final[dict[Interpolation, InterpolationMode]] = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    # NEAREST_EXACT is the one that matches PIL's nearest; plain NEAREST on tensors
    # reproduces an off-by-half-pixel legacy kernel.
    "nearest": InterpolationMode.NEAREST_EXACT,
}



def interpolation_mode(name: Interpolation) -> InterpolationMode:
    return _INTERPOLATION[name]


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; RGB images are returned as they are."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I"):
        # PIL's own conversion clips 16-bit values at 255, turning most of a 16-bit
        # greyscale image white. Mode I is taken to hold 16-bit data too: it is
        # what older PIL and some TIFF writers give for 16-bit greyscale.
        wide = np.asarray(img).astype(np.float64)
        narrow = np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(narrow).convert("RGB")  # 2-D uint8 is mode L
    if "transparency" in img.info:
        # Palette/L/RGB images with a transparent colour: going via RGBA avoids
        # PIL's "transparency expressed in bytes" warning, an error under -W error.
        img = img.convert("RGBA")
    return img.convert("RGB")


def preprocess(img: Image.Image, pre: Preprocessing) -> torch.Tensor:
    """A float32 ``(3, H, W)`` tensor at the manifest's input size, normalised with the manifest's mean/std.

    ``center_crop``: scale (keeping the aspect ratio) so the image covers
    ``input_size / crop_fraction``, then crop the centre -- for a square input this is
    torchvision's ``Resize(round(size / crop_fraction))`` + ``CenterCrop(size)``.
    ``stretch``: straight to ``input_size``. ``letterbox``: fit inside ``input_size``
    keeping the aspect ratio, centred, padded with the mean (zero once normalised).
    """
    return preprocess_pixels(F.pil_to_tensor(to_rgb(img)), pre)


def preprocess_pixels(pixels: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
    """:func:`preprocess` of uint8 ``(3, H, W)`` RGB pixels, on whatever device they are (a GPU-decoded JPEG)."""
    height, width = pre.input_size
    interpolation = _INTERPOLATION[pre.interpolation]
    src_h, src_w = pixels.shape[-2:]

    pad: list[int] | None = None
    if pre.resize == "stretch":
        pixels = resize(pixels, (height, width), interpolation)
    elif pre.resize == "center_crop":
        pixels = resize(pixels, _cover_size(src_h, src_w, height, width, pre.crop_fraction), interpolation)
        pixels = F.center_crop(pixels, [height, width])
    else:  # letterbox
        (new_h, new_w), pad = letterbox_geometry(src_h, src_w, height, width)
        pixels = resize(pixels, (new_h, new_w), interpolation)

    out = F.normalize(F.to_dtype(pixels, torch.float32, scale=True), mean=list(pre.mean), std=list(pre.std))
    if pad is not None and any(pad):
        out = F.pad(out, pad, fill=0.0)  # zero after normalising is the mean before
    return out


def resized_size(width: int, height: int, pre: Preprocessing) -> tuple[int, int]:
    """``(width, height)`` that ``preprocess`` resizes an upright ``width``×``height`` image to, before cropping or padding.

    Nothing finer than this reaches the model, so an image decoded at any size that
    covers it loses nothing the resize would have kept (``decode_image``'s ``reduce_to``).
    """
    out_h, out_w = pre.input_size
    if pre.resize == "center_crop":
        out_h, out_w = _cover_size(height, width, out_h, out_w, pre.crop_fraction)
    elif pre.resize == "letterbox":
        (out_h, out_w), _ = letterbox_geometry(height, width, out_h, out_w)
    return out_w, out_h


def letterbox_geometry(src_h: int, src_w: int, height: int, width: int) -> tuple[tuple[int, int], list[int]]:
    """Where ``resize="letterbox"`` puts an image: its scaled ``(h, w)`` and the padding ``[left, top, right, bottom]``.

    Shared by ``preprocess`` and by what must follow the image exactly (a label map in
    training, the model's output mapped back to the original pixels).
    """
    scale = min(height / src_h, width / src_w)
    new_h = min(height, max(1, round(src_h * scale)))
    new_w = min(width, max(1, round(src_w * scale)))
    left, top = (width - new_w) // 2, (height - new_h) // 2
    return (new_h, new_w), [left, top, width - new_w - left, height - new_h - top]


def _cover_size(src_h: int, src_w: int, height: int, width: int, crop_fraction: float) -> tuple[int, int]:
    """Smallest aspect-preserving size covering ``(height, width) / crop_fraction``."""
    target_h, target_w = round(height / crop_fraction), round(width / crop_fraction)
    # Integer cross-multiplication picks the binding side without float ties; the
    # free side is truncated exactly as torchvision's Resize(int) truncates it.
    if target_h * src_w >= target_w * src_h:
        return target_h, max(target_w, int(target_h * src_w / src_h))
    return max(target_h, int(target_w * src_h / src_w)), target_w


def resize(pixels: torch.Tensor, size: tuple[int, int], interpolation: InterpolationMode) -> torch.Tensor:
    if tuple(pixels.shape[-2:]) == size:
        return pixels
    # antialias only means something for the filtering modes; torchvision ignores
    # it for nearest, so passing it unconditionally is safe.
    return F.resize(pixels, list(size), interpolation=interpolation, antialias=True)
