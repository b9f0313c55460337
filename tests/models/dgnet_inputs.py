"""Routers and inputs that make DG-Net paths differ from image to image, for the DG-Net tests."""

from __future__ import annotations

import torch
from torch import nn

from dgserve.models.dgnet import dg_stages

__all__ = ["randomise_routers", "varied_images"]


def randomise_routers(model: nn.Module, scale: float = 6.0, tau: float = 0.5, seed: int = 0) -> None:
    """Routers whose weights swing around τ from image to image, so paths differ."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, stage in dg_stages(model):
            for router in stage.routers:
                fan_in = router.fc.in_features
                router.fc.weight.copy_(torch.randn(router.fc.weight.shape, generator=gen) * scale / fan_in**0.5)
                router.fc.bias.copy_(torch.randn(router.fc.bias.shape, generator=gen))
            stage.tau.fill_(tau)


def varied_images(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Noise images of different brightness and contrast, so routers see different inputs."""
    gen = torch.Generator().manual_seed(seed)
    contrast = torch.linspace(0.2, 3.0, n).view(n, 1, 1, 1)
    brightness = torch.linspace(-2.0, 2.0, n).view(n, 1, 1, 1)
    return torch.randn(n, 3, size, size, generator=gen) * contrast + brightness
