"""Turning uploaded bytes into images: check the content type, decode, refuse bombs.

Everything here is synchronous and CPU-bound; the server runs it in a thread pool,
never on the event loop. Uploaded bytes are hostile until proven otherwise, so:

* the declared content type is checked, but never trusted: the bytes must decode as
  one of the allowed formats (a mislabelled JPEG sent as ``image/png`` is accepted,
  text sent as ``image/png`` is not);
* only the allowed formats' decoders are ever tried, so an upload cannot reach
  PIL's rarer plugins (EPS, which shells out to Ghostscript, among them);
* the pixel count is read from the header and refused *before* any pixel is
  decoded, so a tiny file that inflates to gigabytes costs nothing.

What an image becomes next is its task's business (``dgserve.tasks``).
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Final

import torch
from PIL import ExifTags, Image, ImageOps
from torchvision.io import ImageReadMode, decode_jpeg

from dgserve.errors import (
    ImageTooLargeError,
    InvalidImageError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
)
from dgserve.imaging import to_rgb
from dgserve.serving.threads import compute_thread

__all__ = [
    "ALLOWED_CONTENT_TYPES", "Decoded", "check_content_type", "decode_image", "decode_jpeg_pixels",
    "decode_jpegs_pixels", "decode_upload", "new_decode_pool",
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

# --- the pool -------------------------------------------------------------------


def new_decode_pool(threads: int, nice: int = 0) -> ThreadPoolExecutor:
    """A pool for :func:`decode_image` and the preprocessing, ``threads`` wide.

    Each of its threads keeps torch to one intra-op thread. The pool runs beside the
    model workers, and a torch op in a decode thread would otherwise start an OpenMP
    team as wide as the machine: on a small host that oversubscribes the cores and
    stalls the workers' own teams at their barriers, slowing the model more than the
    decode gains. One image's resize gains little from a team anyway. ``nice``: how much
    lower their CPU priority is than the event loop's (``serving/threads.py``).
    """
    return ThreadPoolExecutor(threads, thread_name_prefix="dgserve-decode", initializer=compute_thread,
                              initargs=(1, nice))


# --- content type ---------------------------------------------------------------


def check_content_type(
    content_type: str | None, part: str | None = None, allowed: frozenset[str] = ALLOWED_CONTENT_TYPES
) -> str:
    """The canonical media type of an upload, or ``UnsupportedMediaTypeError`` (415).

    Parameters (``image/png; charset=binary``) and case are ignored. Passing this
    only means the client *claims* an image; :func:`decode_image` checks the bytes.
    ``allowed`` is what the task takes (``Task.content_types``): images by default.
    """
    where = f"part {part!r}: " if part else ""
    if not content_type or not content_type.strip():
        raise UnsupportedMediaTypeError(
            f"{where}no content type given; send one of {_allowed_list(allowed)}"
        )
    media_type = content_type.split(";", 1)[0].strip().lower()
    media_type = _CONTENT_TYPE_ALIASES.get(media_type, media_type)
    if media_type not in allowed:
        raise UnsupportedMediaTypeError(
            f"{where}content type {media_type!r} is not supported; send one of {_allowed_list(allowed)}"
        )
    return media_type


def _allowed_list(allowed: frozenset[str]) -> str:
    return ", ".join(sorted(allowed))


# --- decoding ---------------------------------------------------------------------


def decode_image(
    data: bytes,
    *,
    max_pixels: int,
    part: str | None = None,
    max_bytes: int | None = None,
) -> Image.Image:
    """Decode an upload into a fully loaded, upright RGB image at its full size (see ``decode_upload``)."""
    return decode_upload(data, max_pixels=max_pixels, part=part, max_bytes=max_bytes).image


@dataclass(frozen=True, slots=True)
class Decoded:
    """A decoded upload: the upright RGB image, and the upload's own upright size (larger if reduced)."""

    image: Image.Image
    width: int
    height: int


def decode_upload(
    data: bytes,
    *,
    max_pixels: int,
    part: str | None = None,
    max_bytes: int | None = None,
    reduce_to: Callable[[int, int], tuple[int, int]] | None = None,
) -> Decoded:
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

    ``reduce_to(width, height)``, given the upload's upright size, says the smallest
    ``(width, height)`` the caller needs. A JPEG is then decoded at the smallest DCT
    scale (1/2, 1/4 or 1/8) that still covers it (libjpeg's scaled decoding, PIL's
    ``draft``): a 640x480 photo for a 64-pixel model decodes at 160x120 (0.52 ms where
    the full decode took 0.84, measured in one thread), and what follows (the copy to a
    tensor, the resize) works on a sixteenth of the pixels. Other formats are decoded at full size.
    """
    if max_bytes is not None and len(data) > max_bytes:
        where = f"part {part!r}: " if part else ""
        raise PayloadTooLargeError(f"{where}{len(data)} bytes exceeds the limit of {max_bytes}")
    if not data:
        raise InvalidImageError("empty upload", part)

    img = _open_checked(data, max_pixels=max_pixels, part=part)
    upload_size = _reduce_jpeg(img, reduce_to) if reduce_to is not None and img.format in ("JPEG", "MPO") else None
    try:
        img.load()
    except Exception as exc:
        # Truncated or corrupt pixel data; under warnings-as-errors also PIL's
        # warnings about malformed files, which are just as much a bad upload.
        raise InvalidImageError(f"could not decode image data ({_describe(exc)})", part) from exc

    _apply_exif_orientation(img, part)
    try:
        rgb = to_rgb(img)
    except Exception as exc:
        # A decodable but exotic pixel format with no RGB conversion (LAB TIFF, ...).
        raise InvalidImageError(
            f"unsupported pixel format {img.mode!r} ({_describe(exc)})", part
        ) from exc
    width, height = upload_size or rgb.size  # upright either way
    return Decoded(rgb, width, height)


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


def _reduce_jpeg(img: Image.Image, reduce_to: Callable[[int, int], tuple[int, int]]) -> tuple[int, int]:
    """Ask libjpeg for the smallest scale covering ``reduce_to``'s need; the upload's upright size.

    Both the need and the size are in upright pixels (after the EXIF orientation, which a
    JPEG's header holds, so nothing is decoded here).
    """
    try:
        transposed = img.getexif().get(ExifTags.Base.Orientation) in (5, 6, 7, 8)
    except Exception:  # an unreadable EXIF block: _apply_exif_orientation leaves it unrotated too
        transposed = False
    width, height = img.size
    if transposed:
        width, height = height, width
    need_w, need_h = reduce_to(width, height)
    if transposed:
        need_w, need_h = need_h, need_w
    img.draft(None, (max(1, need_w), max(1, need_h)))
    return width, height


def _apply_exif_orientation(img: Image.Image, part: str | None) -> None:
    try:
        # in_place: the non-in-place form copies the whole image even when upright.
        ImageOps.exif_transpose(img, in_place=True)
    except Exception as exc:
        # The pixels are fine and a broken metadata block is common in the wild;
        # serving the image unrotated beats refusing it.
        log.debug("part %r: ignoring unreadable EXIF orientation: %r", part, exc)


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


# --- JPEG through torchvision (nvJPEG on a GPU) -------------------------------------
#
# The same checks as decode_image (allowed format, pixel limit read from the header
# before any pixel is decoded), then torchvision's decode_jpeg, which on a CUDA device
# is nvJPEG and can take a whole batch at once. Only plain upright RGB or greyscale
# JPEGs take this path; anything else (another format, CMYK, an EXIF rotation) gives
# None and the caller decodes it with decode_image, so the two paths cannot disagree
# on what an unusual file means.

_EXIF_ORIENTATION: Final[int] = 0x0112


def decode_jpeg_pixels(
    data: bytes, *, max_pixels: int, device: torch.device | str = "cpu", part: str | None = None
) -> torch.Tensor | None:
    """An upload's uint8 ``(3, H, W)`` RGB pixels on ``device``, or None when it must go through PIL.

    Raises what :func:`decode_image` raises for oversized, empty or undecodable uploads.
    """
    [pixels] = decode_jpegs_pixels([data], max_pixels=max_pixels, device=device, parts=[part])
    return pixels


def decode_jpegs_pixels(
    uploads: list[bytes],
    *,
    max_pixels: int,
    device: torch.device | str = "cpu",
    parts: list[str | None] | None = None,
) -> list[torch.Tensor | None]:
    """:func:`decode_jpeg_pixels` of several uploads, the eligible ones decoded in one batched call."""
    names = parts if parts is not None else [None] * len(uploads)
    eligible = [i for i, (data, part) in enumerate(zip(uploads, names, strict=True))
                if _plain_jpeg(data, max_pixels, part)]
    out: list[torch.Tensor | None] = [None] * len(uploads)
    if not eligible:
        return out
    encoded = [torch.frombuffer(bytearray(uploads[i]), dtype=torch.uint8) for i in eligible]
    try:
        decoded = _decode_jpegs(encoded, device)
    except RuntimeError as exc:
        if torch.device(device).type == "cpu":
            raise _bad_part(encoded, [names[i] for i in eligible], exc) from exc
        # nvJPEG fails for reasons of its own too (its start-up, device memory): libjpeg
        # on the CPU tells those apart from bad data, which it names.
        log.warning("decoding %d JPEGs on %s failed (%s); decoding them on the CPU",
                    len(encoded), device, _describe(exc))  # fmt: skip
        try:
            decoded = [pixels.to(device) for pixels in _decode_jpegs(encoded, "cpu")]
        except RuntimeError as on_cpu:
            raise _bad_part(encoded, [names[i] for i in eligible], on_cpu) from on_cpu
    for i, pixels in zip(eligible, decoded, strict=True):
        out[i] = pixels
    return out


def _bad_part(encoded: list[torch.Tensor], names: list[str | None], exc: RuntimeError) -> InvalidImageError:
    """PIL read the headers, but some entropy-coded data is corrupt or truncated: decoded
    one at a time on the CPU, to name the part that is."""
    for data, name in zip(encoded, names, strict=True):
        try:
            _decode_jpegs([data], "cpu")
        except RuntimeError as one:
            return InvalidImageError(f"could not decode image data ({_describe(one)})", name)
    return InvalidImageError(f"could not decode image data ({_describe(exc)})", names[0])


def _decode_jpegs(encoded: list[torch.Tensor], device: torch.device | str) -> list[torch.Tensor]:
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its image codecs for TorchCodec, which dgserve
        # does not depend on; decode_jpeg is still there and still nvJPEG on a GPU.
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*TorchVision are deprecated")
        return list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device))


def _plain_jpeg(data: bytes, max_pixels: int, part: str | None) -> bool:
    if not data:
        raise InvalidImageError("empty upload", part)
    img = _open_checked(data, max_pixels=max_pixels, part=part)  # the pixel limit, before any decoding
    if img.format not in ("JPEG", "MPO") or img.mode not in ("RGB", "L"):
        return False
    try:
        orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:
        return False  # PIL's path decides what an unreadable EXIF block means
    return orientation == 1

