"""Label-preserving augmentation: the eight symmetries of the square (flips, 90° turns).

Every shape class is closed under rotation and reflection, so these never change a
label. They are drawn from an explicit ``torch.Generator`` so a run is reproducible
and a resumed run draws exactly what the uninterrupted one would have.
"""

from __future__ import annotations

import torch
from torch import Tensor


def dihedral_batch(x: Tensor, gen: torch.Generator) -> Tensor:
    """A random symmetry per image of a [B, C, H, W] batch (transpose needs H == W)."""
    flips = torch.rand((3, x.shape[0]), generator=gen) < 0.5
    if x.shape[-1] == x.shape[-2]:
        x = torch.where(flips[0].view(-1, 1, 1, 1), x.transpose(-1, -2), x)
    x = torch.where(flips[1].view(-1, 1, 1, 1), x.flip(-1), x)
    return torch.where(flips[2].view(-1, 1, 1, 1), x.flip(-2), x)


def dihedral_detection(
    image: Tensor, target: dict[str, Tensor], gen: torch.Generator
) -> tuple[Tensor, dict[str, Tensor]]:
    """A random symmetry of one [C, H, W] image with its xyxy boxes moved along."""
    transpose, hflip, vflip = (torch.rand(3, generator=gen) < 0.5).tolist()
    boxes = target["boxes"].clone()
    if transpose and image.shape[-1] == image.shape[-2]:
        image = image.transpose(-1, -2)
        boxes = boxes[:, [1, 0, 3, 2]]
    height, width = image.shape[-2:]
    if hflip:
        image = image.flip(-1)
        boxes = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
    if vflip:
        image = image.flip(-2)
        boxes = torch.stack([boxes[:, 0], height - boxes[:, 3], boxes[:, 2], height - boxes[:, 1]], dim=1)
    return image.contiguous(), {**target, "boxes": boxes}
