"""The detection task: preparing uploads for a torchvision detector, boxes back in image pixels."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from PIL import Image

from dgserve.imaging import IMAGENET_MEAN, IMAGENET_STD
from dgserve.model_store.manifest import Preprocessing
from dgserve.tasks.detection import DETECTION_HEADROOM, Detection, boxes_to_original

preprocess_detection = Detection().prepare


def gradient(width: int, height: int) -> Image.Image:
    """An RGB image with structure, so a resize is visible."""
    return Image.linear_gradient("L").resize((width, height)).convert("RGB")


def pre(**overrides: Any) -> Preprocessing:
    values: dict[str, Any] = {"input_size": (8, 8), "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    values.update(overrides)
    return Preprocessing(**values)


# --- preparing uploads -----------------------------------------------------------------------------


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
