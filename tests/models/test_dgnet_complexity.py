"""Parameters and FLOPs against DG-Net's Table 1 (docs/dgnet.md has the full table)."""

from __future__ import annotations

import pytest
from torchvision.ops.misc import SqueezeExcitation

from dgserve.models.complexity import measure
from dgserve.models.dgnet import dg_stages
from dgserve.models.dgnet.backbones import TORCHVISION_BUILDERS, build_plain
from dgserve.models.registry import create_model

# Table 1, DG-Net column (params, M).
PAPER_PARAMS = {"dgnet_resnet50": 25.62, "dgnet_resnet101": 44.90}


@pytest.mark.parametrize("arch", sorted(PAPER_PARAMS))
def test_params_match_table_1(arch: str) -> None:
    got = measure(create_model(arch), size=64).params_m
    assert abs(got - PAPER_PARAMS[arch]) <= 0.05, got


@pytest.mark.parametrize("arch", sorted(TORCHVISION_BUILDERS))
def test_overhead_under_2pct_params_and_3pct_flops(arch: str) -> None:
    base = measure(build_plain(arch), size=224)
    dg = measure(create_model(arch), size=224)
    assert dg.params_m / base.params_m - 1 < 0.02
    assert dg.mflops / base.mflops - 1 < 0.03


def test_dgnet_b_is_regnet_y_600mf_with_se() -> None:
    """Table 5's DG-Net-B: pycls's RegNetY-600MF (6.06M params, 600 MFLOPs), every block with SE."""
    model = create_model("dgnet_regnet_y_600mf")
    stages = dg_stages(model)
    assert [s.num_blocks for _, s in stages] == [1, 3, 7, 4]
    assert all(any(isinstance(m, SqueezeExcitation) for m in b.modules()) for _, s in stages for b in s.blocks())
    base = measure(build_plain("dgnet_regnet_y_600mf"), size=224)
    assert abs(base.params_m - 6.06) < 0.01 and abs(base.mflops - 600) < 5
    assert abs(measure(model, size=224).params_m - base.params_m) < 0.02  # routers only
