"""Gathering a torch model's connectivity records after a forward pass.

Modules that route (DG-Net stages) or reason over a graph (GloRe units) keep the
tensors of their last forward pass and implement ``ConnectivitySource``;
``collect_connectivity`` turns those into one ``ImageConnectivity`` per image. What a
record *is* lives in ``dgserve.connectivity``, which knows nothing of torch.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import Tensor, nn

from dgserve.connectivity import ConnectivitySource, ImageConnectivity, describe

__all__ = ["adjacency_digest", "collect_connectivity", "connectivity_sources", "describe_graph"]

Sources = list[tuple[str, ConnectivitySource]]


def adjacency_digest(matrix: Tensor) -> str:
    """A content digest of a matrix: equal digests mean equal float32 values.

    Over the shape and the float32 bytes, so it names exactly what ``tolist()`` (and
    therefore the JSON) of the float32 matrix holds.
    """
    data = matrix.detach().to(torch.float32).cpu().contiguous()
    digest = hashlib.sha256(repr(tuple(data.shape)).encode())
    digest.update(data.numpy().tobytes())
    return digest.hexdigest()[:32]


def connectivity_sources(model: nn.Module) -> Sources:
    """The modules of ``model`` that record connectivity, with their qualified names.

    Fixed for a model's lifetime, so a server finds them once: the runtime protocol
    check behind this costs microseconds per module, every batch, for hundreds of
    modules.
    """
    return [(name, module) for name, module in model.named_modules() if isinstance(module, ConnectivitySource)]


def describe_graph(model: nn.Module) -> dict[str, list[dict[str, Any]]]:
    """The routing/reasoning structure of a built model, ``{kind: [graph, ...]}``."""
    return describe(connectivity_sources(model))


def collect_connectivity(model: nn.Module, batch_size: int, sources: Sources | None = None) -> list[ImageConnectivity]:
    """Gather every source's record of the last forward, per image.

    ``sources`` is ``connectivity_sources(model)``, when the caller already has it.
    """
    images = [ImageConnectivity() for _ in range(batch_size)]
    for name, module in connectivity_sources(model) if sources is None else sources:
        records = module.image_connectivity(name)
        if len(records) != batch_size:
            raise RuntimeError(
                f"{name} recorded {len(records)} images but the batch had {batch_size}; "
                "was the model called since?"
            )
        for image, record in zip(images, records, strict=True):
            image.add(record)
    return images
