"""Turning uploaded bytes into the tensors a model takes: decode, check, preprocess.

Everything here is synchronous and CPU-bound; the server runs it in a thread pool,
never on the event loop. Uploaded bytes are hostile until proven otherwise, so:

* the declared content type is checked, but never trusted: the bytes must decode as
  one of the allowed formats (a mislabelled JPEG sent as ``image/png`` is accepted,
  text sent as ``image/png`` is not);
* only the allowed formats' decoders are ever tried, so an upload cannot reach
  PIL's rarer plugins (EPS, which shells out to Ghostscript, among them);
* the pixel count is read from the header and refused *before* any pixel is
  decoded, so a tiny file that inflates to gigabytes costs nothing.

Preprocessing follows the model's manifest and uses torchvision's resampling (the
same kernels the weights were evaluated with), never a hand-rolled one.
"""

from __future__ import annotations

import io
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Final

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from dgserve.errors import (
    ImageTooLargeError,
    InvalidImageError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
)
from dgserve.serving.threads import pin_torch_threads
from dgserve.store.manifest import Interpolation, Preprocessing

__all__ = [
    "ALLOWED_CONTENT_TYPES",
    "DETECTION_HEADROOM",
    "boxes_to_original",
    "check_content_type",
    "decode_image",
    "new_decode_pool",
    "preprocess_classification",
    "preprocess_detection",
    "to_rgb",
]

log = logging.getLogger(__name__)

ALLOWED_CONTENT_TYPES: Final[frozenset[str]] = frozenset(
    {"image/jpeg", "image/png", "image/webp", "image/bmp", "image/gif", "image/tiff"}
)

# Non-standard spellings that real clients and older browsers still send.
_CONTENT_TYPE_ALIASES: Final[dict[str, str]] = {
    "image/jpg": "image/jpeg",
    "image/pjpeg": "image/jpeg",
    "image/x-png": "image/png",
    "image/x-ms-bmp": "image/bmp",
    "image/x-bmp": "image/bmp",
}

# PIL format names for the allowed types. JPEG's opener may hand back an MPO (a
# JPEG carrying extra pictures); that is still a JPEG decoder and the first picture.
_PIL_FORMATS: Final[tuple[str, ...]] = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")

_INTERPOLATION: Final[dict[Interpolation, InterpolationMode]] = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    # NEAREST_EXACT is the one that matches PIL's nearest; plain NEAREST on tensors
    # reproduces an off-by-half-pixel legacy kernel.
    "nearest": InterpolationMode.NEAREST_EXACT,
}

DETECTION_HEADROOM: Final[float] = 2.0
"""Detection inputs keep at least this multiple of ``max(input_size)`` on their longer side.

torchvision's detector resizes every image itself and never lets the longer side
exceed its ``max_size``; anything beyond a comfortable margin over that is decoded
pixels it would throw away, so larger photos are downscaled here, where it is cheap.
"""


# --- the pool -------------------------------------------------------------------


def new_decode_pool(threads: int) -> ThreadPoolExecutor:
    """A pool for :func:`decode_image` and the preprocessing, ``threads`` wide.

    Each of its threads keeps torch to one intra-op thread. The pool runs beside the
    model workers, and a torch op in a decode thread would otherwise start an OpenMP
    team as wide as the machine: on a small host that oversubscribes the cores and
    stalls the workers' own teams at their barriers, slowing the model more than the
    decode gains. One image's resize gains little from a team anyway.
    """
    return ThreadPoolExecutor(threads, thread_name_prefix="dgserve-decode", initializer=pin_torch_threads,
                              initargs=(1,))


# --- content type ---------------------------------------------------------------


def check_content_type(content_type: str | None, part: str | None = None) -> str:
    """The canonical media type of an upload, or ``UnsupportedMediaTypeError`` (415).

    Parameters (``image/png; charset=binary``) and case are ignored. Passing this
    only means the client *claims* an image; :func:`decode_image` checks the bytes.
    """
    where = f"part {part!r}: " if part else ""
    if not content_type or not content_type.strip():
        raise UnsupportedMediaTypeError(
            f"{where}no content type given; send one of {_allowed_list()}"
        )
    media_type = content_type.split(";", 1)[0].strip().lower()
    media_type = _CONTENT_TYPE_ALIASES.get(media_type, media_type)
    if media_type not in ALLOWED_CONTENT_TYPES:
        raise UnsupportedMediaTypeError(
            f"{where}content type {media_type!r} is not supported; send one of {_allowed_list()}"
        )
    return media_type


def _allowed_list() -> str:
    return ", ".join(sorted(ALLOWED_CONTENT_TYPES))


# --- decoding ---------------------------------------------------------------------


def decode_image(
    data: bytes,
    *,
    max_pixels: int,
    part: str | None = None,
    max_bytes: int | None = None,
) -> Image.Image:
    """Decode an upload into a fully loaded, upright RGB image.

    Raises ``PayloadTooLargeError`` (413) when ``max_bytes`` is given and exceeded,
    ``ImageTooLargeError`` (422) when the header announces more than ``max_pixels``
    pixels -- before any pixel is decoded -- and ``InvalidImageError`` (422) for
    anything that is not a complete image in an allowed format. Each names ``part``.

    PIL's own bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``) stays in force as a
    ceiling: an image above it is refused as too large whatever ``max_pixels``
    says, and the same way whether or not warnings are configured as errors.

    Animated GIF/WebP and multi-page TIFF give their first frame. EXIF orientation is
    applied. Alpha is dropped rather than composited, as ``img.convert("RGB")`` in
    a training loader does; 16-bit greyscale is scaled to 8 bits.
    """
    if max_bytes is not None and len(data) > max_bytes:
        where = f"part {part!r}: " if part else ""
        raise PayloadTooLargeError(f"{where}{len(data)} bytes exceeds the limit of {max_bytes}")
    if not data:
        raise InvalidImageError("empty upload", part)

    img = _open_checked(data, max_pixels=max_pixels, part=part)
    try:
        img.load()
    except Exception as exc:
        # Truncated or corrupt pixel data; under warnings-as-errors also PIL's
        # warnings about malformed files, which are just as much a bad upload.
        raise InvalidImageError(f"could not decode image data ({_describe(exc)})", part) from exc

    _apply_exif_orientation(img, part)
    try:
        return to_rgb(img)
    except Exception as exc:
        # A decodable but exotic pixel format with no RGB conversion (LAB TIFF, ...).
        raise InvalidImageError(
            f"unsupported pixel format {img.mode!r} ({_describe(exc)})", part
        ) from exc


def _open_checked(data: bytes, *, max_pixels: int, part: str | None) -> Image.Image:
    """Identify the format and read the size from the header; no pixels yet."""
    try:
        img = Image.open(io.BytesIO(data), formats=_PIL_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # PIL checks its own limit inside open(). Its warning only arrives here as
        # an exception when warnings are errors; either way it is a bomb, not a crash.
        raise ImageTooLargeError(
            f"image exceeds the pixel limit ({_describe(exc)})", part
        ) from exc
    except Exception as exc:
        # UnidentifiedImageError, but also the struct/Syntax/Value errors a crafted
        # header can provoke, and PIL's "could not identify" warnings when they are errors.
        raise InvalidImageError(
            f"not a decodable image in an allowed format "
            f"({', '.join(f.lower() for f in _PIL_FORMATS)})",
            part,
        ) from exc

    width, height = img.size
    if width < 1 or height < 1:
        raise InvalidImageError(f"image has no pixels ({width}x{height})", part)
    limit = max_pixels
    if Image.MAX_IMAGE_PIXELS is not None:
        # Without this, an image between PIL's limit and ours would be refused when
        # warnings are errors and merely warned about otherwise.
        limit = min(limit, Image.MAX_IMAGE_PIXELS)
    if width * height > limit:
        raise ImageTooLargeError(
            f"image is {width}x{height} = {width * height} pixels, more than the limit of {limit}",
            part,
        )
    return img


def _apply_exif_orientation(img: Image.Image, part: str | None) -> None:
    try:
        # in_place: the non-in-place form copies the whole image even when upright.
        ImageOps.exif_transpose(img, in_place=True)
    except Exception as exc:
        # The pixels are fine and a broken metadata block is common in the wild;
        # serving the image unrotated beats refusing it.
        log.debug("part %r: ignoring unreadable EXIF orientation: %r", part, exc)


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


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


# --- preprocessing -------------------------------------------------------------------


def preprocess_classification(img: Image.Image, pre: Preprocessing) -> torch.Tensor:
    """A float32 ``(3, H, W)`` tensor for a classifier, normalised with the manifest's mean/std.

    ``center_crop``: scale (keeping the aspect ratio) so the image covers
    ``input_size / crop_fraction``, then crop the centre -- for a square input this is
    torchvision's ``Resize(round(size / crop_fraction))`` + ``CenterCrop(size)``.
    ``stretch``: straight to ``input_size``. ``letterbox``: fit inside ``input_size``
    keeping the aspect ratio, centred, padded with the mean (zero once normalised).
    """
    height, width = pre.input_size
    interpolation = _INTERPOLATION[pre.interpolation]
    pixels = F.pil_to_tensor(to_rgb(img))
    src_h, src_w = pixels.shape[-2:]

    pad: list[int] | None = None
    if pre.resize == "stretch":
        pixels = _resize(pixels, (height, width), interpolation)
    elif pre.resize == "center_crop":
        pixels = _resize(pixels, _cover_size(src_h, src_w, height, width, pre.crop_fraction), interpolation)
        pixels = F.center_crop(pixels, [height, width])
    else:  # letterbox
        scale = min(height / src_h, width / src_w)
        new_h = min(height, max(1, round(src_h * scale)))
        new_w = min(width, max(1, round(src_w * scale)))
        pixels = _resize(pixels, (new_h, new_w), interpolation)
        left, top = (width - new_w) // 2, (height - new_h) // 2
        pad = [left, top, width - new_w - left, height - new_h - top]

    out = F.normalize(F.to_dtype(pixels, torch.float32, scale=True), mean=list(pre.mean), std=list(pre.std))
    if pad is not None and any(pad):
        out = F.pad(out, pad, fill=0.0)  # zero after normalising is the mean before
    return out


def _cover_size(src_h: int, src_w: int, height: int, width: int, crop_fraction: float) -> tuple[int, int]:
    """Smallest aspect-preserving size covering ``(height, width) / crop_fraction``."""
    target_h, target_w = round(height / crop_fraction), round(width / crop_fraction)
    # Integer cross-multiplication picks the binding side without float ties; the
    # free side is truncated exactly as torchvision's Resize(int) truncates it.
    if target_h * src_w >= target_w * src_h:
        return target_h, max(target_w, int(target_h * src_w / src_h))
    return max(target_h, int(target_w * src_h / src_w)), target_w


def _resize(pixels: torch.Tensor, size: tuple[int, int], interpolation: InterpolationMode) -> torch.Tensor:
    if tuple(pixels.shape[-2:]) == size:
        return pixels
    # antialias only means something for the filtering modes; torchvision ignores
    # it for nearest, so passing it unconditionally is safe.
    return F.resize(pixels, list(size), interpolation=interpolation, antialias=True)


def preprocess_detection(img: Image.Image, pre: Preprocessing) -> tuple[torch.Tensor, float]:
    """A float32 ``(3, H, W)`` tensor in [0, 1] for a torchvision detector, and its scale.

    The detector normalises and resizes by itself and reports boxes in the
    coordinates of the tensor it was given, so nothing else is done here -- except
    that an image whose longer side exceeds ``DETECTION_HEADROOM * max(input_size)``
    is first downscaled to that, keeping its aspect ratio. ``scale`` is
    ``tensor size / original size`` (1.0 when untouched); pass it to
    :func:`boxes_to_original` to get boxes in the uploaded image's pixels.
    """
    pixels = F.pil_to_tensor(to_rgb(img))
    src_h, src_w = pixels.shape[-2:]
    longest = max(src_h, src_w)
    limit = int(DETECTION_HEADROOM * max(pre.input_size))
    scale = 1.0
    if longest > limit:
        scale = limit / longest
        size = (max(1, round(src_h * scale)), max(1, round(src_w * scale)))
        pixels = _resize(pixels, size, _INTERPOLATION[pre.interpolation])
    return F.to_dtype(pixels, torch.float32, scale=True), scale


def boxes_to_original(
    boxes: torch.Tensor, scale: float, image_size: tuple[int, int] | None = None
) -> torch.Tensor:
    """Map ``(N, 4)`` xyxy boxes from the detector's input back to the original image.

    ``image_size`` is the original ``(height, width)``; given, boxes are clamped to it,
    since rounding the downscaled size can push an edge box a fraction past the border.
    """
    out = boxes.to(torch.float32) if scale == 1.0 else boxes.to(torch.float32) / scale
    if image_size is not None:
        height, width = image_size
        out = torch.stack(
            (
                out[..., 0].clamp(0, width),
                out[..., 1].clamp(0, height),
                out[..., 2].clamp(0, width),
                out[..., 3].clamp(0, height),
            ),
            dim=-1,
        )
    return out
