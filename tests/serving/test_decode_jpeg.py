"""JPEG through torchvision's decode_jpeg (nvJPEG on a GPU): the same model input as the
PIL path within tolerance, the same refusals, and a fallback (None) for what PIL must decode."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from dgserve.data.scenes import render_classification
from dgserve.errors import ImageTooLargeError, InvalidImageError
from dgserve.imaging import preprocess, preprocess_pixels
from dgserve.model_store import Preprocessing
from dgserve.serving import decode
from dgserve.serving.decode import decode_image, decode_jpeg_pixels, decode_jpegs_pixels

PRE = Preprocessing(input_size=(64, 64), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
LETTERBOX = PRE.model_copy(update={"resize": "letterbox"})


def encode(img: Image.Image, fmt: str = "JPEG", **params: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def photo(width: int = 640, height: int = 480, seed: int = 0) -> Image.Image:
    """A scene scaled up to a camera-sized upload, so the resize does real work."""
    scene, _ = render_classification(seed, seed, 96)
    return scene.resize((width, height), Image.Resampling.BICUBIC)


def via_pil(data: bytes, pre: Preprocessing) -> torch.Tensor:
    return preprocess(decode_image(data, max_pixels=10**8), pre)


def via_torchvision(data: bytes, pre: Preprocessing, device: str = "cpu") -> torch.Tensor:
    pixels = decode_jpeg_pixels(data, max_pixels=10**8, device=device)
    assert pixels is not None and pixels.dtype == torch.uint8
    return preprocess_pixels(pixels, pre).cpu()


@pytest.mark.parametrize("pre", [PRE, LETTERBOX], ids=["center_crop", "letterbox"])
@pytest.mark.parametrize("size", [(640, 480), (64, 64), (37, 91)])
def test_cpu_decode_jpeg_gives_the_pil_paths_input(pre: Preprocessing, size: tuple[int, int]) -> None:
    for seed in range(3):
        data = encode(photo(*size, seed=seed), quality=90)
        a, b = via_pil(data, pre), via_torchvision(data, pre)
        assert a.shape == b.shape == (3, 64, 64)
        # Both are libjpeg-turbo; IDCT and upsampling details move a pixel by a level or two.
        one_level = 1 / 255 / min(pre.std)
        assert (a - b).abs().max() <= 3 * one_level
        assert (a - b).abs().mean() <= 0.5 * one_level


def test_raw_pixels_match_pil_exactly_or_nearly() -> None:
    data = encode(photo(), quality=95)
    pil = torch.from_numpy(np.array(decode_image(data, max_pixels=10**8))).permute(2, 0, 1)
    tv = decode_jpeg_pixels(data, max_pixels=10**8)
    assert tv is not None and tv.shape == pil.shape
    assert (tv.int() - pil.int()).abs().max() <= 3


def test_greyscale_jpeg_becomes_three_channels() -> None:
    data = encode(photo().convert("L"))
    pixels = decode_jpeg_pixels(data, max_pixels=10**8)
    assert pixels is not None and pixels.shape == (3, 480, 640)
    assert torch.equal(pixels[0], pixels[1]) and torch.equal(pixels[1], pixels[2])


def test_what_pil_must_decode_falls_back() -> None:
    rotated = photo()
    exif = rotated.getexif()
    exif[0x0112] = 6
    assert decode_jpeg_pixels(encode(rotated, exif=exif), max_pixels=10**8) is None
    assert decode_jpeg_pixels(encode(photo(), "PNG"), max_pixels=10**8) is None
    assert decode_jpeg_pixels(encode(photo().convert("CMYK")), max_pixels=10**8) is None


def test_batched_decode_keeps_order_and_falls_back_per_upload() -> None:
    uploads = [encode(photo(seed=0)), encode(photo(seed=1), "PNG"), encode(photo(320, 200, seed=2))]
    out = decode_jpegs_pixels(uploads, max_pixels=10**8)
    assert out[1] is None
    assert out[0] is not None and out[0].shape == (3, 480, 640)
    assert out[2] is not None and out[2].shape == (3, 200, 320)
    assert torch.equal(out[0], decode_jpeg_pixels(uploads[0], max_pixels=10**8))


def test_a_truncated_jpeg_in_a_batch_is_refused_by_its_part() -> None:
    good = encode(photo(seed=0))
    truncated = encode(photo(seed=1))[:-len(good) // 2]  # its header is whole: PIL's check passes
    with pytest.raises(InvalidImageError) as caught:
        decode_jpegs_pixels([good, truncated, good], max_pixels=10**8, parts=["a", "b", "c"])
    assert caught.value.part == "b"


def test_a_device_decoder_failure_falls_back_to_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """nvJPEG failing for its own reasons (start-up, device memory) is not the upload's
    fault: the CPU decodes it, and only data the CPU cannot decode is refused, by its part.
    ("meta" stands in for the GPU: the device decoder here always fails.)"""
    real = decode._decode_jpegs
    tried: list[str] = []

    def device_decoder_down(encoded: list[torch.Tensor], device: torch.device | str) -> list[torch.Tensor]:
        tried.append(str(device))
        if str(device) != "cpu":
            raise RuntimeError("nvjpeg: failed to create the decoder")
        return real(encoded, device)

    monkeypatch.setattr(decode, "_decode_jpegs", device_decoder_down)
    good = encode(photo(seed=0))
    [pixels] = decode_jpegs_pixels([good], max_pixels=10**8, device="meta")
    assert pixels is not None and pixels.device.type == "meta" and pixels.shape == (3, 480, 640)
    assert tried == ["meta", "cpu"]
    truncated = encode(photo(seed=1))[:-len(good) // 2]
    with pytest.raises(InvalidImageError) as caught:
        decode_jpegs_pixels([good, truncated], max_pixels=10**8, device="meta", parts=["a", "b"])
    assert caught.value.part == "b"


def test_same_refusals_as_the_pil_path() -> None:
    data = encode(photo())
    with pytest.raises(ImageTooLargeError):
        decode_jpeg_pixels(data, max_pixels=640 * 480 - 1)
    with pytest.raises(InvalidImageError):
        decode_jpeg_pixels(b"", max_pixels=10**8)
    with pytest.raises(InvalidImageError):
        decode_jpeg_pixels(b"not an image at all", max_pixels=10**8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("pre", [PRE, LETTERBOX], ids=["center_crop", "letterbox"])
def test_nvjpeg_gives_the_pil_paths_input(pre: Preprocessing) -> None:
    uploads = [encode(photo(seed=s), quality=90) for s in range(4)]
    decoded = decode_jpegs_pixels(uploads, max_pixels=10**8, device="cuda")
    one_level = 1 / 255 / min(pre.std)
    for data, pixels in zip(uploads, decoded, strict=True):
        assert pixels is not None and pixels.is_cuda
        a, b = via_pil(data, pre), preprocess_pixels(pixels, pre).cpu()
        # nvJPEG's IDCT differs from libjpeg-turbo's by a few levels at most.
        assert (a - b).abs().max() <= 6 * one_level
        assert (a - b).abs().mean() <= one_level
