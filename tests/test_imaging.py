"""The manifest's preprocessing: the tensor each resize mode and interpolation produces."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from PIL import Image

from dgserve.imaging import IMAGENET_MEAN as MEAN
from dgserve.imaging import IMAGENET_STD as STD
from dgserve.imaging import preprocess
from dgserve.model_store.manifest import Preprocessing


def gradient(width: int = 64, height: int = 48) -> Image.Image:
    """An RGB image with structure, so a crop or a resize is visible."""
    xs = torch.arange(width).mul(4).remainder(256).expand(height, width)
    ys = torch.arange(height).mul(5).remainder(256)[:, None].expand(height, width)
    hwc = torch.stack((xs, ys, torch.full((height, width), 128)), dim=-1).to(torch.uint8)
    return Image.fromarray(hwc.numpy())


def pre(**overrides: Any) -> Preprocessing:
    values: dict[str, Any] = {"input_size": (8, 8), "mean": MEAN, "std": STD}
    values.update(overrides)
    return Preprocessing(**values)


# --- classification preprocessing -----------------------------------------------------------------------


@pytest.mark.parametrize("resize", ["center_crop", "stretch", "letterbox"])
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
def test_classification_output_shape_dtype_and_normalisation(resize: str, interpolation: str) -> None:
    colour = (51, 102, 204)
    img = Image.new("RGB", (30, 20), colour)
    out = preprocess(
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
    out = preprocess(img, pre(input_size=(32, 32), crop_fraction=crop))
    assert torch.equal(out, reference)


def test_center_crop_keeps_the_middle() -> None:
    # A wide image: shorter side 20 -> round(8 / 0.5) = 16, so 40x20 -> 32x16; the
    # 8x8 crop is the centre, which is white while the outer columns are black.
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (10, 0, 30, 20))
    out = preprocess(img, pre(crop_fraction=0.5, mean=(0.5,) * 3, std=(0.5,) * 3))
    assert out.shape == (3, 8, 8)
    assert torch.allclose(out, torch.ones_like(out))


def test_stretch_does_not_keep_aspect_ratio() -> None:
    img = Image.new("RGB", (40, 10), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 20, 10))  # left half white
    out = preprocess(
        img, pre(input_size=(8, 8), resize="stretch", interpolation="nearest", mean=(0.0,) * 3, std=(1.0,) * 3)
    )
    assert torch.all(out[:, :, :4] == 1) and torch.all(out[:, :, 4:] == 0)


def test_letterbox_centres_and_pads_with_the_mean() -> None:
    img = Image.new("RGB", (16, 8), (255, 255, 255))
    out = preprocess(img, pre(input_size=(16, 16), resize="letterbox"))
    white = torch.tensor([(1 - m) / s for m, s in zip(MEAN, STD)])[:, None, None]
    assert torch.allclose(out[:, 4:12, :], white.expand(3, 8, 16), atol=1e-5)
    assert torch.all(out[:, :4, :] == 0) and torch.all(out[:, 12:, :] == 0)


def test_classification_accepts_non_rgb_images() -> None:
    out = preprocess(Image.new("L", (10, 10), 255), pre(mean=(0.0,) * 3, std=(1.0,) * 3))
    assert out.shape == (3, 8, 8) and torch.allclose(out, torch.ones_like(out))
