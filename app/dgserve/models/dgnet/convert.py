"""Bring ImageNet weights users already have: a torchvision state dict becomes a DG-Net.

The torchvision network is built, loaded strictly, wrapped into its DG-Net, and every
router pinned to the backbone's own chain wiring. The result computes the same
function as the torchvision model (tests/models/test_dgnet_convert.py checks the
logits) and can then be fine-tuned so that the routers learn per-image paths.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from dgserve.models.dgnet.backbones import TORCHVISION_BUILDERS, build_plain, dgnet_from_torchvision, pin_chain

# Where each family keeps its classifier, to read num_classes off the state dict.
_HEAD_KEYS = ("fc.weight", "classifier.1.weight")


def num_classes_of(state_dict: Mapping[str, Tensor]) -> int:
    for key in _HEAD_KEYS:
        if key in state_dict:
            return int(state_dict[key].shape[0])
    raise ValueError(f"no classifier weight found (looked for {', '.join(_HEAD_KEYS)})")


def dgnet_from_state_dict(arch: str, state_dict: Mapping[str, Tensor]) -> nn.Module:
    """A DG-Net with the given torchvision weights and routers pinned to the chain."""
    if arch not in TORCHVISION_BUILDERS:
        raise ValueError(f"{arch!r} has no torchvision counterpart; choose from {', '.join(TORCHVISION_BUILDERS)}")
    plain = build_plain(arch, num_classes=num_classes_of(state_dict))
    try:
        result = plain.load_state_dict(state_dict, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"state dict does not fit {arch}: {err}") from None
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"state dict does not fit {arch}: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    model = dgnet_from_torchvision(plain)
    pin_chain(model)
    return model.eval()


def read_torchvision_checkpoint(path: Path) -> dict[str, Tensor]:
    """Read a .pth state dict without unpickling arbitrary objects (weights_only=True)."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):  # common training-script checkpoint layouts
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    prefix = "module."  # saved from DistributedDataParallel
    return {k.removeprefix(prefix): v for k, v in obj.items()}
