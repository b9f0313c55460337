"""Static equivalence: a torchvision state dict, imported with chain wiring, gives the same logits."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from dgserve.models.dgnet.backbones import TORCHVISION_BUILDERS, build_plain
from dgserve.models.dgnet.convert import dgnet_from_state_dict, read_torchvision_checkpoint


@pytest.mark.parametrize("arch", sorted(TORCHVISION_BUILDERS))
def test_imported_torchvision_weights_reproduce_logits(arch: str) -> None:
    torch.manual_seed(0)
    plain = build_plain(arch, num_classes=10).eval()
    # Non-trivial BN statistics, as trained weights have, so the check is not vacuous.
    with torch.no_grad():
        for m in plain.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        expected = plain(x)
        model = dgnet_from_state_dict(arch, plain.state_dict())
        got = model(x)
    assert (got - expected).abs().max().item() <= 1e-4
    assert expected.abs().max().item() > 1e-3  # logits are not all ~0


def test_checkpoint_reader_accepts_wrapped_and_ddp_state_dicts(tmp_path: Path) -> None:
    plain = build_plain("dgnet_resnet18", num_classes=3)
    sd = {f"module.{k}": v for k, v in plain.state_dict().items()}
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": sd, "epoch": 3}, path)
    loaded = read_torchvision_checkpoint(path)
    assert loaded.keys() == plain.state_dict().keys()
    model = dgnet_from_state_dict("dgnet_resnet18", loaded)
    assert model.fc.out_features == 3


class _Payload:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("unpickled code ran",))


def test_checkpoint_reader_refuses_arbitrary_pickles(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"x": _Payload()}, path, pickle_module=pickle)
    with pytest.raises(pickle.UnpicklingError):
        read_torchvision_checkpoint(path)


def test_mismatched_state_dict_is_refused() -> None:
    sd = build_plain("dgnet_resnet18", num_classes=3).state_dict()
    with pytest.raises(ValueError, match="does not fit dgnet_resnet50"):
        dgnet_from_state_dict("dgnet_resnet50", sd)
