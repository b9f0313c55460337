"""Decoding uploads: content types, formats, hostile bytes and bombs.

Every image is encoded in memory with PIL, so the decoder is tested on real files.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from dgserve.errors import (
    ImageTooLargeError,
    InvalidImageError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
)
from dgserve.serving.decode import ALLOWED_CONTENT_TYPES, check_content_type, decode_image, decode_upload

MAX_PIXELS = 4_000_000


def encode(img: Image.Image, fmt: str, **params: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def gradient(width: int = 64, height: int = 48) -> Image.Image:
    """An RGB image with structure, so truncation and rotation are visible."""
    xs = torch.arange(width).mul(4).remainder(256).expand(height, width)
    ys = torch.arange(height).mul(5).remainder(256)[:, None].expand(height, width)
    hwc = torch.stack((xs, ys, torch.full((height, width), 128)), dim=-1).to(torch.uint8)
    return Image.fromarray(hwc.numpy())


# --- content type ------------------------------------------------------------------


@pytest.mark.parametrize("content_type", sorted(ALLOWED_CONTENT_TYPES))
def test_allowed_content_types_pass(content_type: str) -> None:
    assert check_content_type(content_type, "image") == content_type


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        ("IMAGE/PNG", "image/png"),
        ("image/png; charset=binary", "image/png"),
        ("  Image/Jpeg ;q=1", "image/jpeg"),
        ("image/jpg", "image/jpeg"),
        ("image/x-ms-bmp", "image/bmp"),
    ],
)
def test_content_type_ignores_case_parameters_and_common_aliases(given: str, canonical: str) -> None:
    assert check_content_type(given, "image") == canonical


@pytest.mark.parametrize(
    "content_type", [None, "", "text/plain", "application/octet-stream", "image/svg+xml", "image/heic", "png"]
)
def test_other_content_types_are_415_naming_the_part(content_type: str | None) -> None:
    with pytest.raises(UnsupportedMediaTypeError) as info:
        check_content_type(content_type, "photo_3")
    assert info.value.status_code == 415
    assert "photo_3" in info.value.message


# --- every allowed format --------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "params"),
    [
        ("JPEG", {"quality": 95}),
        ("PNG", {}),
        ("WEBP", {"lossless": True}),
        ("BMP", {}),
        ("GIF", {}),
        ("TIFF", {}),
    ],
)
def test_every_allowed_format_decodes_to_rgb_of_the_right_size(fmt: str, params: dict[str, Any]) -> None:
    data = encode(gradient(64, 48), fmt, **params)
    img = decode_image(data, max_pixels=MAX_PIXELS, part="image")
    assert img.mode == "RGB"
    assert img.size == (64, 48)
    img.getpixel((0, 0))  # fully loaded: reading pixels needs no further decoding


def test_pixel_values_survive_a_lossless_round_trip() -> None:
    src = gradient(16, 8)
    img = decode_image(encode(src, "PNG"), max_pixels=MAX_PIXELS)
    assert img.tobytes() == src.tobytes()


def test_declared_type_need_not_match_an_allowed_format() -> None:
    # Clients mislabel JPEGs as PNGs all the time; the bytes decide.
    check_content_type("image/png", "image")
    assert decode_image(encode(gradient(), "JPEG"), max_pixels=MAX_PIXELS).size == (64, 48)


# --- EXIF orientation ---------------------------------------------------------------------


def test_exif_orientation_is_applied() -> None:
    src = Image.new("RGB", (40, 20), (0, 0, 255))
    src.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    data = encode(src, "JPEG", exif=exif, quality=95)

    img = decode_image(data, max_pixels=MAX_PIXELS)

    assert img.size == (20, 40)  # transposed
    red_top, blue_bottom = img.getpixel((10, 5)), img.getpixel((10, 35))
    assert red_top[0] > 200 and red_top[2] < 60  # the left side is now on top
    assert blue_bottom[2] > 200 and blue_bottom[0] < 60


# --- reduced decoding (JPEG draft) ---------------------------------------------------------


@pytest.mark.parametrize(
    ("need", "decoded"),
    [((640, 480), (640, 480)), ((320, 240), (320, 240)), ((319, 200), (320, 240)), ((160, 120), (160, 120)),
     ((85, 64), (160, 120)), ((80, 60), (80, 60)), ((10, 10), (80, 60)), ((641, 10), (640, 480))],
)
def test_a_jpeg_decodes_at_the_smallest_scale_that_covers_what_is_needed(
    need: tuple[int, int], decoded: tuple[int, int]
) -> None:
    asked: list[tuple[int, int]] = []

    def reduce_to(width: int, height: int) -> tuple[int, int]:
        asked.append((width, height))
        return need

    result = decode_upload(encode(gradient(640, 480), "JPEG"), max_pixels=MAX_PIXELS, reduce_to=reduce_to)

    assert asked == [(640, 480)]
    assert result.image.size == decoded  # 1/8 at most: libjpeg's smallest scale
    assert (result.width, result.height) == (640, 480)  # the upload's own size, for its record
    assert result.image.mode == "RGB"


def test_a_reduced_decode_is_the_full_decode_scaled_down() -> None:
    data = encode(gradient(640, 480), "JPEG", quality=95)
    full = decode_image(data, max_pixels=MAX_PIXELS).resize((160, 120), Image.Resampling.BOX)
    reduced = decode_upload(data, max_pixels=MAX_PIXELS, reduce_to=lambda w, h: (160, 120)).image
    diff = np.abs(np.asarray(full, dtype=np.float64) - np.asarray(reduced, dtype=np.float64))
    assert diff.mean() < 3.0  # of 255: libjpeg's scaled IDCT against a box filter


def test_a_reduced_decode_asks_and_answers_in_upright_pixels() -> None:
    src = Image.new("RGB", (640, 320), (0, 0, 255))
    src.paste((255, 0, 0), (0, 0, 320, 320))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 640x320, shown 320x640
    asked: list[tuple[int, int]] = []

    def reduce_to(width: int, height: int) -> tuple[int, int]:
        asked.append((width, height))
        return (80, 160)  # upright: a quarter of each side

    result = decode_upload(encode(src, "JPEG", exif=exif, quality=95), max_pixels=MAX_PIXELS, reduce_to=reduce_to)

    assert asked == [(320, 640)]
    assert result.image.size == (80, 160) and (result.width, result.height) == (320, 640)
    red_top, blue_bottom = result.image.getpixel((40, 20)), result.image.getpixel((40, 140))
    assert red_top[0] > 200 and red_top[2] < 60
    assert blue_bottom[2] > 200 and blue_bottom[0] < 60


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "GIF"])
def test_other_formats_decode_at_full_size_whatever_is_asked(fmt: str) -> None:
    result = decode_upload(encode(gradient(640, 480), fmt), max_pixels=MAX_PIXELS, reduce_to=lambda w, h: (80, 60))
    assert result.image.size == (640, 480) and (result.width, result.height) == (640, 480)


def test_the_pixel_limit_is_the_uploads_not_the_reduced_images() -> None:
    data = encode(gradient(640, 480), "JPEG")
    with pytest.raises(ImageTooLargeError):
        decode_upload(data, max_pixels=640 * 480 - 1, reduce_to=lambda w, h: (80, 60))


# --- pixel modes ----------------------------------------------------------------------------


def test_rgba_becomes_rgb_dropping_alpha() -> None:
    img = decode_image(encode(Image.new("RGBA", (5, 4), (10, 20, 30, 0)), "PNG"), max_pixels=MAX_PIXELS)
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (10, 20, 30)


def test_palette_with_transparency_becomes_rgb_without_warnings() -> None:
    pal = Image.new("P", (6, 6), 1)
    pal.putpalette([0, 0, 0, 200, 100, 50] + [0, 0, 0] * 254)
    for fmt in ("PNG", "GIF"):
        data = encode(pal, fmt, transparency=0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            img = decode_image(data, max_pixels=MAX_PIXELS)
        assert img.mode == "RGB" and img.getpixel((0, 0)) == (200, 100, 50)


def test_palette_with_per_entry_alpha_becomes_rgb() -> None:
    pal = Image.new("P", (6, 6), 1)
    pal.putpalette([0, 0, 0, 200, 100, 50] + [0, 0, 0] * 254)
    data = encode(pal, "PNG", transparency=bytes([0, 128] + [255] * 254))
    img = decode_image(data, max_pixels=MAX_PIXELS)
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (200, 100, 50)


def test_greyscale_and_bilevel_become_rgb() -> None:
    assert decode_image(encode(Image.new("L", (3, 3), 77), "PNG"), max_pixels=MAX_PIXELS).getpixel((1, 1)) == (
        77,
        77,
        77,
    )
    assert decode_image(encode(Image.new("LA", (3, 3), (90, 0)), "PNG"), max_pixels=MAX_PIXELS).getpixel(
        (0, 0)
    ) == (90, 90, 90)
    bilevel = decode_image(encode(Image.new("1", (3, 3), 1), "BMP"), max_pixels=MAX_PIXELS)
    assert bilevel.mode == "RGB" and bilevel.getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_cmyk_becomes_rgb(fmt: str) -> None:
    data = encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), fmt)  # pure red in ink
    r, g, b = decode_image(data, max_pixels=MAX_PIXELS).getpixel((4, 4))
    assert r > 230 and g < 30 and b < 30


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_sixteen_bit_greyscale_is_scaled_not_clipped(fmt: str) -> None:
    src = Image.new("I;16", (4, 2), 0x8080)  # mid-grey in 16 bits
    src.putpixel((0, 0), 65535)
    src.putpixel((1, 0), 0)
    img = decode_image(encode(src, fmt), max_pixels=MAX_PIXELS)
    assert img.mode == "RGB"
    assert img.getpixel((3, 1)) == (128, 128, 128)
    assert img.getpixel((0, 0)) == (255, 255, 255)
    assert img.getpixel((1, 0)) == (0, 0, 0)


@pytest.mark.parametrize("fmt", ["GIF", "TIFF", "WEBP"])
def test_animated_or_multi_page_images_give_their_first_frame(fmt: str) -> None:
    red, blue = Image.new("RGB", (10, 6), (255, 0, 0)), Image.new("RGB", (10, 6), (0, 0, 255))
    params: dict[str, Any] = {"lossless": True} if fmt == "WEBP" else {}
    data = encode(red, fmt, save_all=True, append_images=[blue], **params)
    img = decode_image(data, max_pixels=MAX_PIXELS)
    assert img.size == (10, 6)
    assert img.getpixel((5, 3)) == (255, 0, 0)


# --- bad uploads --------------------------------------------------------------------------------


@pytest.mark.parametrize("reduced", [False, True])
def test_truncated_jpeg_is_invalid(reduced: bool) -> None:
    data = encode(gradient(128, 128), "JPEG", quality=95)
    reduce_to = (lambda w, h: (32, 32)) if reduced else None
    with pytest.raises(InvalidImageError) as info:
        decode_upload(data[: len(data) // 2], max_pixels=MAX_PIXELS, part="scan", reduce_to=reduce_to)
    assert info.value.status_code == 422
    assert info.value.part == "scan" and "scan" in info.value.message
    assert not isinstance(info.value, ImageTooLargeError)


def test_truncated_png_is_invalid() -> None:
    data = encode(gradient(128, 128), "PNG")
    with pytest.raises(InvalidImageError):
        decode_image(data[: len(data) - 200], max_pixels=MAX_PIXELS)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"hello, this is plain text and not an image at all\n",
        bytes(range(256)) * 8,
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 40,  # a PNG signature and nothing sensible
    ],
    ids=["empty", "text", "random", "png-signature-only"],
)
def test_bytes_that_are_not_an_image_are_invalid(data: bytes) -> None:
    check_content_type("image/png", "upload")  # the declared type alone proves nothing
    with pytest.raises(InvalidImageError) as info:
        decode_image(data, max_pixels=MAX_PIXELS, part="upload")
    assert info.value.part == "upload"
    assert not isinstance(info.value, ImageTooLargeError)


@pytest.mark.parametrize("fmt", ["PPM", "ICO", "PCX"])
def test_real_images_in_other_formats_are_refused(fmt: str) -> None:
    with pytest.raises(InvalidImageError):
        decode_image(encode(gradient(16, 16), fmt), max_pixels=MAX_PIXELS)


def test_payload_over_max_bytes_is_413() -> None:
    data = encode(gradient(), "PNG")
    with pytest.raises(PayloadTooLargeError) as info:
        decode_image(data, max_pixels=MAX_PIXELS, part="big", max_bytes=len(data) - 1)
    assert info.value.status_code == 413 and "big" in info.value.message
    assert decode_image(data, max_pixels=MAX_PIXELS, max_bytes=len(data)).size == (64, 48)


# --- decompression bombs ------------------------------------------------------------------------------


def png_claiming(width: int, height: int) -> bytes:
    """A real, tiny PNG whose IHDR is rewritten to announce ``width`` x ``height``."""
    data = bytearray(encode(Image.new("1", (8, 8), 0), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # type + fields
    return bytes(data)


@pytest.fixture
def no_pixel_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything tries to decode pixels."""

    def refuse(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


def test_header_over_our_limit_is_refused_before_decoding(no_pixel_decoding: None) -> None:
    with pytest.raises(ImageTooLargeError) as info:
        decode_image(png_claiming(5000, 4000), max_pixels=MAX_PIXELS, part="bomb")
    assert info.value.status_code == 422 and info.value.code == "image_too_large"
    assert "5000x4000" in info.value.message and "bomb" in info.value.message


@pytest.mark.parametrize("side", [10_000, 30_000], ids=["over-pil-warning", "over-pil-error"])
@pytest.mark.parametrize("filter_", ["error", "ignore"])
def test_pil_bomb_checks_become_image_too_large(no_pixel_decoding: None, side: int, filter_: str) -> None:
    # 10k^2 passes PIL's warning threshold, 30k^2 its error threshold. The outcome
    # must not depend on whether warnings are errors, nor on max_pixels being larger.
    with warnings.catch_warnings():
        warnings.simplefilter(filter_)
        with pytest.raises(ImageTooLargeError):
            decode_image(png_claiming(side, side), max_pixels=10**10, part="bomb")


def test_an_image_at_the_limit_is_accepted() -> None:
    img = decode_image(encode(gradient(100, 40), "PNG"), max_pixels=4000)
    assert img.size == (100, 40)
    with pytest.raises(ImageTooLargeError):
        decode_image(encode(gradient(100, 40), "PNG"), max_pixels=3999)
