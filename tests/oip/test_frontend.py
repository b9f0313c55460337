"""Connectivity as tensors: one per module, stacked over the batch, ragged images padded."""

from __future__ import annotations

import numpy as np

from dgserve.connectivity import GloReUnitConnectivity, ImageConnectivity, StageConnectivity
from dgserve.oip.frontend import _connectivity_tensors


def unit(projection: list[list[int]]) -> GloReUnitConnectivity:
    return GloReUnitConnectivity(unit="u", num_nodes=2, adjacency=[[0.0, 1.0], [1.0, 0.0]], adjacency_digest="d",
                                 projection=projection)  # fmt: skip


def stage(weight: float) -> StageConnectivity:
    return StageConnectivity("s", ["input", "0", "output"], [[0, 0, 0], [1, 0, 0], [0, weight, 0]],
                             [None, 0.1, None], [True] * 3, 1, 1)  # fmt: skip


def test_modules_stack_over_the_batch_and_ragged_maps_are_padded_with_minus_one() -> None:
    images = [ImageConnectivity([stage(0.5), unit([[0, 1], [1, 1]])]),
              ImageConnectivity([stage(0.25), unit([[1, 0, 0]])])]  # fmt: skip
    out = _connectivity_tensors(images, {"stages/s", "glore_units/u"})
    assert out["stages/s"].dtype == np.float32 and out["stages/s"][:, 2, 1].tolist() == [0.5, 0.25]
    maps = out["glore_units/u"]
    assert maps.dtype == np.int32 and maps.shape == (2, 2, 3)
    assert maps.tolist() == [[[0, 1, -1], [1, 1, -1]], [[1, 0, 0], [-1, -1, -1]]]


def test_only_the_requested_modules_are_built() -> None:
    images = [ImageConnectivity([stage(0.5), unit([[0]])])]
    assert set(_connectivity_tensors(images, {"stages/s"})) == {"stages/s"}
    assert _connectivity_tensors([], {"stages/s"}) == {}
