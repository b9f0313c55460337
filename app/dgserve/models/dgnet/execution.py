"""How a DG-Net stage runs the blocks an image skips: the execution kinds, checked by name."""

from __future__ import annotations

from typing import Literal, get_args

__all__ = ["EXECUTION_KINDS", "ExecutionKind", "check_execution"]

# "skip": each block runs on the images that reach it (one host read per block; the
# cheapest on a CPU). "masked": every block runs on the whole batch and closed edges
# multiply by 0 (no host reads; for GPUs, where a sync costs more than a skipped block
# saves). "auto": masked on CUDA, skip elsewhere. Under torch.compile every mode runs
# masked. Outputs and records are the same in every mode.
ExecutionKind = Literal["auto", "skip", "masked"]
EXECUTION_KINDS: tuple[str, ...] = get_args(ExecutionKind)


def check_execution(execution: str) -> ExecutionKind:
    if execution not in EXECUTION_KINDS:
        raise ValueError(f"execution must be one of {', '.join(EXECUTION_KINDS)}, got {execution!r}")
    return execution  # type: ignore[return-value]
