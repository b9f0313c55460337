"""The 3-D GloRe ResNets: the paper's layout, forward and backward, and per-frame connectivity."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dgserve.connectivity import GloReUnitConnectivity
from dgserve.models.connectivity import collect_connectivity
from dgserve.models.glore import GloReUnit3d, GloReVideoResNet
from dgserve.models.glore.video import VIDEO_TASK, i3d_inflation
from dgserve.models.registry import create_model, get_entry, list_models

VIDEO_MODELS = ["glore_resnet101_3d", "glore_resnet18_3d_slim", "glore_resnet50_3d"]


@pytest.fixture(autouse=True)
def _threads() -> None:
    torch.set_num_threads(1)


def test_the_video_models_are_registered_for_the_video_task() -> None:
    assert list_models(task=VIDEO_TASK) == VIDEO_MODELS
    assert all(get_entry(name).family == "glore" for name in VIDEO_MODELS)


def test_resnet50_3d_has_the_papers_stem_inflation_and_unit_positions() -> None:
    model = create_model("glore_resnet50_3d", num_classes=400)
    assert isinstance(model, GloReVideoResNet)
    stem = model.stem[0]
    assert isinstance(stem, nn.Conv3d) and stem.kernel_size == (3, 5, 5) and stem.stride == (1, 2, 2)
    assert [name for name, _ in model.glore_units()] == [
        "layer2.units.0", "layer2.units.2", "layer3.units.0", "layer3.units.2", "layer3.units.4",
    ]  # fmt: skip
    assert [u.in_channels for _, u in model.glore_units()] == [512, 512, 1024, 1024, 1024]
    # I3D: the inflated Bottlenecks' first conv is 3x1x1, the others' 1x1x1; every 3x3 is spatial.
    for stage, flags in zip((model.layer1, model.layer2, model.layer3, model.layer4), i3d_inflation((3, 4, 6, 3)), strict=True):
        for block, inflated in zip(stage, flags, strict=True):
            assert block.conv1[0].kernel_size == ((3, 1, 1) if inflated else (1, 1, 1))
            assert block.conv2[0].kernel_size == (1, 3, 3)
    assert i3d_inflation((3, 4, 6, 3)) == [[True] * 3, [True, False] * 2, [True, False] * 3, [False, True, False]]


def test_resnet50_3d_forward_backward_halves_time_once() -> None:
    model = create_model("glore_resnet50_3d", num_classes=5)
    clip = torch.randn(1, 3, 8, 64, 64)
    out = model(clip)
    assert out.shape == (1, 5)
    out.sum().backward()
    # The units start as the identity (BN weight 0), so their BN gets the only gradient at first.
    units = [u for _, u in model.glore_units()]
    assert all(u.bn.weight.grad is not None and u.bn.weight.grad.abs().sum() > 0 for u in units)
    maps = [u.projection_maps for u in units]
    assert [tuple(m.shape) for m in maps] == [(1, 4, 8, 8)] * 2 + [(1, 4, 4, 4)] * 3


def test_slim_model_trains_one_step_and_is_small() -> None:
    model = create_model("glore_resnet18_3d_slim", num_classes=7, width=8)
    assert sum(p.numel() for p in model.parameters()) < 600_000
    clips, labels = torch.randn(4, 3, 8, 32, 32), torch.tensor([0, 1, 2, 3])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = nn.functional.cross_entropy(model(clips), labels)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert [n for n, _ in model.glore_units()] == ["layer2.units.0", "layer3.units.0"]


def test_a_3d_units_record_keeps_its_frames() -> None:
    model = create_model("glore_resnet18_3d_slim", num_classes=7, width=8).eval()
    with torch.no_grad():
        model(torch.randn(2, 3, 8, 32, 32))
    images = collect_connectivity(model, 2)
    records = images[0].of(GloReUnitConnectivity)
    first = records[0]
    assert first.frames == 4  # layer2 halves 8 frames
    assert len(first.projection) == 4 * 8 and len(first.projection[0]) == 8  # (T·H) x W
    assert first.projection_summary["height"] == 8 and first.to_dict()["frames"] == 4
    unit = dict(model.glore_units())["layer2.units.0"]
    assert isinstance(unit, GloReUnit3d)
    frame_2 = first.projection[2 * 8 : 3 * 8]
    assert frame_2 == unit.projection_maps[0, 2].tolist()


def test_an_image_units_record_is_one_frame() -> None:
    model = create_model("glore_resnet18_slim", num_classes=3, width=8).eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    record = collect_connectivity(model, 1)[0].of(GloReUnitConnectivity)[0]
    assert record.frames == 1 and record.projection_summary["height"] == len(record.projection)


def test_clips_of_the_wrong_shape_are_refused() -> None:
    model = create_model("glore_resnet18_3d_slim", num_classes=7, width=8)
    with pytest.raises(ValueError, match=r"\(n, 3, T, H, W\)"):
        model(torch.randn(1, 3, 32, 32))
