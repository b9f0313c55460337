"""Fixtures shared across the test tree."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture
def full_precision() -> Iterator[None]:
    """GPU float32 as on the CPU: TF32 (cuDNN's default on Ampere and later) moves results
    by ~1e-3, enough to reorder near-tied classes or flip an edge that sits on its threshold."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
