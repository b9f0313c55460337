"""The weighted sums that feed a DG-Net node: Σ_i w_i · x_i over its sources, per image."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["accumulate", "masked_sum"]


def masked_sum(sources: list[tuple[int, int]], gated: list[Tensor], outputs: list[Tensor]) -> Tensor | None:
    """Σ_i w_i · x_i over every ``(source block, edge column)``, open or not (a closed edge's weight is exactly 0)."""
    total: Tensor | None = None
    for s, col in sources:
        total = accumulate(total, gated[s][:, col], outputs[s])
    return total


def accumulate(total: Tensor | None, weight: Tensor, out: Tensor) -> Tensor:
    """``total + weight · out``, per image, fused into one pass over the features.

    The weighted sums are DG-Net's main element-wise cost on a large feature map:
    ``addcmul`` reads each tensor once, where a multiply then an add read and write a
    temporary too. Without autograd the sum is updated in place (``total`` is always
    a tensor made here).
    """
    w = weight.to(out.dtype).view(-1, *([1] * (out.dim() - 1)))
    if total is None:
        return w * out
    if torch.is_grad_enabled():
        return torch.addcmul(total, w, out)
    return total.addcmul_(w, out)
