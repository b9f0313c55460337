"""The segmentation task alone: label maps back at the original size, both encodings, IoU, its data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dgserve.data import export_segmentation_folder
from dgserve.data.sources import MaskFolder
from dgserve.model_store.manifest import Preprocessing
from dgserve.tasks import get_task
from dgserve.tasks import segmentation as seg
from dgserve.tasks.segmentation import (
    IGNORE_INDEX, confusion_matrix, decode_label_map, image_and_mask, iou_figures, label_map_at,
)  # fmt: skip
from dgserve.training.config import TrainConfig

LABELS = ["background", "a", "b"]


def _pre(resize: str, size: tuple[int, int] = (8, 8)) -> Preprocessing:
    return Preprocessing(input_size=size, mean=(0.5,) * 3, std=(0.5,) * 3, resize=resize)  # type: ignore[arg-type]


def _logits_for(label_map: torch.Tensor, classes: int = 3) -> torch.Tensor:
    return torch.nn.functional.one_hot(label_map, classes).permute(2, 0, 1).float() * 10


def test_letterbox_padding_is_cut_off_before_the_map_is_resized_to_the_original() -> None:
    # A 16x8 (w x h) image letterboxed into 8x8 sits in rows 2..5; the padding rows say
    # class 2 and must not leak into the answer.
    inner = torch.zeros(8, 8, dtype=torch.long)
    inner[:2], inner[6:] = 2, 2
    inner[2:6, 4:] = 1
    label_map = label_map_at(_logits_for(inner), (8, 16), _pre("letterbox"))
    assert label_map.shape == (8, 16) and label_map.dtype == np.uint8
    assert set(np.unique(label_map)) == {0, 1}
    assert (label_map[:, :7] == 0).all() and (label_map[:, 9:] == 1).all()


def test_stretch_maps_the_whole_input_back() -> None:
    inner = torch.zeros(8, 8, dtype=torch.long)
    inner[:4] = 1
    label_map = label_map_at(_logits_for(inner), (20, 6), _pre("stretch"))
    assert label_map.shape == (20, 6)
    assert (label_map[:9] == 1).all() and (label_map[11:] == 0).all()


def test_a_huge_original_is_upsampled_bilinearly_to_the_limit_then_by_nearest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(seg, "OUTPUT_SIDE_LIMIT", 16)
    inner = torch.zeros(8, 8, dtype=torch.long)
    inner[:, 4:] = 1
    label_map = label_map_at(_logits_for(inner), (40, 40), _pre("stretch"))
    assert label_map.shape == (40, 40)
    assert (label_map[:, :19] == 0).all() and (label_map[:, 21:] == 1).all()


@pytest.mark.parametrize("fmt", ["png", "rle"])
def test_both_encodings_decode_to_the_map_they_came_from(fmt: str) -> None:
    rng = np.random.default_rng(0)
    label_map = rng.integers(0, 3, (13, 29)).astype(np.uint8)
    label_map[:, :5] = 0
    prediction = seg._prediction(label_map, LABELS, fmt)
    np.testing.assert_array_equal(decode_label_map(prediction), label_map)
    assert sum(c["pixel_fraction"] for c in prediction["classes"]) == pytest.approx(1.0)
    assert [c["index"] for c in prediction["classes"]][0] == 0  # largest share first
    assert seg.SegmentationPrediction.model_validate(prediction)


def test_tensors_for_the_open_inference_protocol_pad_smaller_maps_with_minus_one() -> None:
    task = get_task("segmentation")
    small = seg._prediction(np.ones((2, 3), np.uint8), LABELS, "png")
    large = seg._prediction(np.full((4, 5), 2, np.uint8), LABELS, "rle")
    manifest = type("M", (), {"labels": LABELS})()
    tensors = task.to_tensors([small, large], manifest)  # type: ignore[arg-type]
    assert tensors["label_map"].shape == (2, 4, 5) and tensors["label_map"].dtype == np.int32
    assert (tensors["label_map"][0, :2, :3] == 1).all() and (tensors["label_map"][0, 2:] == -1).all()
    np.testing.assert_allclose(tensors["class_fractions"], [[0, 1, 0], [0, 0, 1]])


def test_confusion_and_iou_ignore_the_ignore_index() -> None:
    truth = torch.tensor([[0, 0, 1, 1], [2, 2, IGNORE_INDEX, IGNORE_INDEX]])
    predicted = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 2]])
    confusion = confusion_matrix(predicted, truth, 3)
    assert int(confusion.sum()) == 6
    figures = iou_figures(confusion)
    assert figures["per_class_iou"] == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert figures["mIoU"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert figures["pixel_accuracy"] == pytest.approx(4 / 6)


def test_center_crop_and_too_many_classes_are_refused() -> None:
    task = get_task("segmentation")
    with pytest.raises(ValueError, match="center_crop"):
        task.check_preprocessing(_pre("center_crop"))
    with pytest.raises(ValueError, match="at most 255"):
        task.check_labels([str(i) for i in range(256)], 256)


def test_a_mask_folder_in_the_voc_layout_is_read_with_masks_moved_like_their_images(tmp_path: Path) -> None:
    root = export_segmentation_folder(tmp_path / "set", 6, seed=4, size=48)
    assert (root / "labels.txt").read_text().split() == ["background", "circle", "crescent", "cross", "heart",
                                                         "ring", "square", "star", "triangle"]  # fmt: skip
    pre = _pre("letterbox", (32, 32))
    dataset = MaskFolder(root, lambda image, mask: image_and_mask(image, mask, pre))
    assert len(dataset) == 6
    image, mask = dataset[0]
    assert image.shape == (3, 32, 32) and mask.shape == (32, 32) and mask.dtype == torch.long
    # A wide image: the letterbox's padding rows are ignored in training, not background.
    wide = Image.new("RGB", (64, 32))
    wide_mask = Image.fromarray(np.ones((32, 64), np.uint8))
    _, moved = image_and_mask(wide, wide_mask, pre)
    assert (moved[:8] == IGNORE_INDEX).all() and (moved[8:24] == 1).all() and (moved[24:] == IGNORE_INDEX).all()
    with pytest.raises(ValueError, match="differ in size"):
        image_and_mask(wide, Image.fromarray(np.ones((5, 5), np.uint8)), pre)


def test_a_mask_folder_without_labels_or_pairs_is_refused(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(ValueError, match="labels.txt"):
        MaskFolder(tmp_path, image_and_mask)  # type: ignore[arg-type]
    (tmp_path / "labels.txt").write_text("background\nthing\n")
    with pytest.raises(ValueError, match="no image"):
        MaskFolder(tmp_path, image_and_mask)  # type: ignore[arg-type]


def test_the_task_reads_both_of_its_sources(tmp_path: Path) -> None:
    task = get_task("segmentation")
    pre = task.default_preprocessing(32)
    generated = task.datasets(TrainConfig(name="t", train_size=3, val_size=2), pre)
    image, mask = generated.train[0]
    assert image.shape == (3, 32, 32) and mask.shape == (32, 32) and generated.labels[0] == "background"
    root = export_segmentation_folder(tmp_path / "set", 10, seed=2, size=40)
    folder = task.datasets(TrainConfig(name="t", data="masks", data_path=root), pre)
    assert len(folder.train) + len(folder.val) == 10 and folder.labels == generated.labels  # type: ignore[arg-type]


def test_a_batch_of_very_different_shapes_is_refused_rather_than_padded_to_gigabytes() -> None:
    from dgserve.errors import InvalidRequestError

    task = get_task("segmentation")
    manifest = type("M", (), {"labels": LABELS})()
    tall = seg._prediction(np.zeros((2000, 20), np.uint8), LABELS, "rle")
    wide = seg._prediction(np.zeros((20, 2000), np.uint8), LABELS, "rle")
    with pytest.raises(InvalidRequestError, match="separate requests"):
        task.to_tensors([tall, wide], manifest)  # type: ignore[arg-type]
    assert task.to_tensors([tall, tall], manifest)["label_map"].shape == (2, 2000, 20)  # type: ignore[arg-type]
