"""Evaluation pieces: COCOeval on known answers, connectivity statistics, augmentation geometry."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from dgserve.connectivity import ImageConnectivity, StageConnectivity
from dgserve.training.augment import dihedral_batch, dihedral_detection
from dgserve.tasks.detection import Detection
from dgserve.training.evaluate import ConnectivityStats

evaluate_detection = Detection().evaluate


class _Oracle(nn.Module):
    """Returns fixed detections, one list per image, in call order."""

    def __init__(self, outputs: list[dict[str, Tensor]]) -> None:
        super().__init__()
        self.outputs = outputs

    def forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        out, self.outputs = self.outputs[: len(images)], self.outputs[len(images) :]
        return out


def _target(boxes: list[list[float]], labels: list[int]) -> dict[str, Tensor]:
    return {"boxes": torch.tensor(boxes), "labels": torch.tensor(labels)}


def test_detection_map_is_one_for_exact_boxes_and_zero_for_wrong_classes() -> None:
    image = torch.zeros(3, 32, 32)
    targets = [_target([[1, 1, 10, 10], [15, 15, 30, 28]], [1, 2]), _target([[5, 5, 20, 20]], [2])]
    exact = [{**t, "scores": torch.ones(len(t["labels"]))} for t in targets]
    result = evaluate_detection(_Oracle(exact), [([image, image], targets)], num_classes=3, progress=False)
    assert result["mAP50"] == 1.0 and result["mAP"] == 1.0 and result["boxes"] == 3
    wrong = [{**t, "labels": 3 - t["labels"], "scores": torch.ones(len(t["labels"]))} for t in targets]
    result = evaluate_detection(_Oracle(wrong), [([image, image], targets)], num_classes=3, progress=False)
    assert result["mAP50"] == 0.0


def _record(adjacency: list[list[float]]) -> ImageConnectivity:
    open_edges = sum(1 for r in range(2, 4) for c in range(1, r) if adjacency[r][c] > 0)
    stage = StageConnectivity("layer1", ["input", "0", "1", "output"], adjacency, [None, 0.1, 0.1, None],
                              [True] * 4, open_edges, 3)  # fmt: skip
    return ImageConnectivity([stage])


def test_connectivity_stats_count_closed_edges_patterns_and_class_differences() -> None:
    full = [[0, 0, 0, 0], [1, 0, 0, 0], [0, 0.5, 0, 0], [0, 0.5, 0.5, 0]]
    skip = [[0, 0, 0, 0], [1, 0, 0, 0], [0, 0.0, 0, 0], [0, 0.7, 0.0, 0]]
    stats = ConnectivityStats()
    stats.add(_record(full), 0)
    stats.add(_record(skip), 1)
    stats.add(_record(skip), 1)
    summary = stats.summary()
    assert summary["distinct_patterns"] == 2
    assert abs(summary["closed_edge_fraction"] - (0 + 2 / 3 + 2 / 3) / 3) < 1e-9
    assert summary["class_adjacency_max_difference"] > 0
    assert summary["per_stage_mean_open_edges"]["layer1"] == [(3 + 1 + 1) / 3, 3]


def test_dihedral_detection_moves_boxes_with_the_pixels() -> None:
    gen = torch.Generator().manual_seed(0)
    image = torch.zeros(3, 40, 40)
    image[:, 5:12, 20:37] = 1.0  # rows 5..11, columns 20..36
    target = {"boxes": torch.tensor([[20.0, 5.0, 37.0, 12.0]]), "labels": torch.tensor([1])}
    seen = set()
    for _ in range(40):
        out, moved = dihedral_detection(image, target, gen)
        ys, xs = torch.nonzero(out[0] > 0, as_tuple=True)
        expected = [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
        assert moved["boxes"][0].tolist() == expected
        seen.add(tuple(expected))
    assert len(seen) == 8  # every symmetry of the square came up


def test_dihedral_batch_only_permutes_pixels() -> None:
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    out = dihedral_batch(x, torch.Generator().manual_seed(1))
    assert torch.equal(out.flatten(1).sort(1).values, x.flatten(1).sort(1).values)


def test_learning_rate_and_sparsity_schedules() -> None:
    from dgserve.training.loop import lr_at, sparsity_at

    from .conftest import tiny_classifier

    assert lr_at(0, 100, 10, 1.0) == 0.1 and lr_at(9, 100, 10, 1.0) == 1.0
    assert abs(lr_at(55, 100, 10, 1.0) - 0.5) < 1e-9 and lr_at(100, 100, 10, 1.0) == 0.0
    config = tiny_classifier(Path("."), sparsity=0.4, sparsity_warmup=2.0)
    assert abs(sparsity_at(0, 10, config) - 0.4 / 20) < 1e-12 and sparsity_at(19, 10, config) == 0.4
    assert sparsity_at(500, 10, config) == 0.4
    assert sparsity_at(0, 10, tiny_classifier(Path("."), sparsity=0.4)) == 0.4


def test_dead_end_guard_pushes_a_silent_block_to_reopen_an_edge() -> None:
    from dgserve.models.dgnet.stage import DGStage
    from dgserve.models.registry import create_model
    from dgserve.training.regularizers import DeadEndGuard

    torch.manual_seed(0)
    model = create_model("dgnet_resnet18_slim", num_classes=8, width=8).train()
    stage = next(m for m in model.modules() if isinstance(m, DGStage))
    router = stage.routers[0]
    with torch.no_grad():
        router.fc.weight.zero_()
        router.fc.bias.fill_(-3.0)  # every output edge of block 1 at α ≈ 0.05 < τ: a dead end
    guard = DeadEndGuard(model, margin=0.05)
    model(torch.randn(4, 3, 32, 32))
    penalty = guard.penalty()
    assert penalty > 0
    penalty.backward()
    assert router.fc.bias.grad is not None and (router.fc.bias.grad < 0).any()  # descent raises α
    assert stage.tau.grad is not None and stage.tau.grad[0] > 0  # and lowers τ
    guard.remove()
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert guard.penalty() == 0  # nothing recorded once removed (or without gradients)
