"""Decoding uploads and preprocessing them: formats, hostile bytes, bombs, and the
tensors each resize mode produces.

Every image is encoded in memory with PIL, so the decoder is tested on real files.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from typing import Any

import pytest
import torch
from PIL import Image, ImageFile

from dgserve.errors import (
    ImageTooLargeError,
    InvalidImageError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
)
from dgserve.serving.images import (
    ALLOWED_CONTENT_TYPES,
    DETECTION_HEADROOM,
    boxes_to_original,
    check_content_type,
    decode_image,
    preprocess_classification,
    preprocess_detection,
)
from dgserve.store.manifest import Preprocessing

MAX_PIXELS = 4_000_000
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


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


def pre(**overrides: Any) -> Preprocessing:
    values: dict[str, Any] = {"input_size": (8, 8), "mean": MEAN, "std": STD}
    values.update(overrides)
    return Preprocessing(**values)


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


def test_truncated_jpeg_is_invalid() -> None:
    data = encode(gradient(128, 128), "JPEG", quality=95)
    with pytest.raises(InvalidImageError) as info:
        decode_image(data[: len(data) // 2], max_pixels=MAX_PIXELS, part="scan")
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


# --- classification preprocessing -----------------------------------------------------------------------


@pytest.mark.parametrize("resize", ["center_crop", "stretch", "letterbox"])
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
def test_classification_output_shape_dtype_and_normalisation(resize: str, interpolation: str) -> None:
    colour = (51, 102, 204)
    img = Image.new("RGB", (30, 20), colour)
    out = preprocess_classification(
        img, pre(input_size=(12, 16), resize=resize, interpolation=interpolation)
    )
    assert out.shape == (3, 12, 16) and out.dtype == torch.float32
    expected = torch.tensor([(c / 255 - m) / s for c, m, s in zip(colour, MEAN, STD)])
    if resize == "letterbox":
        # 30x20 into 16x12: scaled to 16x11 (rounded), one row of padding.
        inner = out[:, :11, :]
        assert torch.allclose(inner, expected[:, None, None].expand_as(inner), atol=1e-5)
        assert torch.all(out[:, 11:, :] == 0)
    else:
        assert torch.allclose(out, expected[:, None, None].expand_as(out), atol=1e-5)


def test_center_crop_matches_torchvision_eval_transform() -> None:
    from torchvision.transforms import v2

    img = gradient(90, 60)
    crop = 0.875
    reference = v2.Compose(
        [
            v2.PILToTensor(),
            v2.Resize(round(32 / crop), antialias=True),
            v2.CenterCrop(32),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(MEAN, STD),
        ]
    )(img)
    out = preprocess_classification(img, pre(input_size=(32, 32), crop_fraction=crop))
    assert torch.equal(out, reference)


def test_center_crop_keeps_the_middle() -> None:
    # A wide image: shorter side 20 -> round(8 / 0.5) = 16, so 40x20 -> 32x16; the
    # 8x8 crop is the centre, which is white while the outer columns are black.
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (10, 0, 30, 20))
    out = preprocess_classification(img, pre(crop_fraction=0.5, mean=(0.5,) * 3, std=(0.5,) * 3))
    assert out.shape == (3, 8, 8)
    assert torch.allclose(out, torch.ones_like(out))


def test_stretch_does_not_keep_aspect_ratio() -> None:
    img = Image.new("RGB", (40, 10), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 20, 10))  # left half white
    out = preprocess_classification(
        img, pre(input_size=(8, 8), resize="stretch", interpolation="nearest", mean=(0.0,) * 3, std=(1.0,) * 3)
    )
    assert torch.all(out[:, :, :4] == 1) and torch.all(out[:, :, 4:] == 0)


def test_letterbox_centres_and_pads_with_the_mean() -> None:
    img = Image.new("RGB", (16, 8), (255, 255, 255))
    out = preprocess_classification(img, pre(input_size=(16, 16), resize="letterbox"))
    white = torch.tensor([(1 - m) / s for m, s in zip(MEAN, STD)])[:, None, None]
    assert torch.allclose(out[:, 4:12, :], white.expand(3, 8, 16), atol=1e-5)
    assert torch.all(out[:, :4, :] == 0) and torch.all(out[:, 12:, :] == 0)


def test_classification_accepts_non_rgb_images() -> None:
    out = preprocess_classification(Image.new("L", (10, 10), 255), pre(mean=(0.0,) * 3, std=(1.0,) * 3))
    assert out.shape == (3, 8, 8) and torch.allclose(out, torch.ones_like(out))


# --- detection preprocessing -----------------------------------------------------------------------------


def detection_pre() -> Preprocessing:
    return pre(input_size=(100, 150), resize="letterbox")


def test_detection_small_image_is_untouched_and_unnormalised() -> None:
    img = Image.new("RGB", (120, 80), (255, 0, 51))
    tensor, scale = preprocess_detection(img, detection_pre())
    assert scale == 1.0
    assert tensor.shape == (3, 80, 120) and tensor.dtype == torch.float32
    assert torch.allclose(tensor[:, 0, 0], torch.tensor([1.0, 0.0, 0.2]))
    assert 0.0 <= float(tensor.min()) and float(tensor.max()) <= 1.0


def test_detection_large_image_is_downscaled_keeping_aspect_ratio() -> None:
    img = gradient(600, 450)  # longer side 600 > 2 * 150
    tensor, scale = preprocess_detection(img, detection_pre())
    limit = int(DETECTION_HEADROOM * 150)
    assert scale == pytest.approx(limit / 600)
    assert tensor.shape == (3, 225, 300)


def test_boxes_round_trip_to_original_pixels() -> None:
    img = gradient(900, 500)
    tensor, scale = preprocess_detection(img, detection_pre())
    height, width = tensor.shape[-2:]
    original = torch.tensor([[90.0, 50.0, 450.0, 250.0], [0.0, 0.0, 900.0, 500.0]])
    on_tensor = original * scale
    assert float(on_tensor[1, 2]) == pytest.approx(width) and float(on_tensor[1, 3]) == pytest.approx(height, abs=1)
    back = boxes_to_original(on_tensor, scale, image_size=(500, 900))
    assert torch.allclose(back, original, atol=1e-3)


def test_boxes_to_original_clamps_to_the_image() -> None:
    boxes = torch.tensor([[-1.0, -2.0, 151.0, 101.0]])
    out = boxes_to_original(boxes, 0.5, image_size=(200, 300))
    assert out.tolist() == [[0.0, 0.0, 300.0, 200.0]]
    assert boxes_to_original(boxes, 1.0).tolist() == boxes.tolist()
    assert boxes_to_original(torch.zeros(0, 4), 0.5).shape == (0, 4)
