"""torch's intra-op thread count, fixed per thread.

With the OpenMP backend the count is a per-thread setting, but ATen initialises a
thread lazily: the first parallel op, or ``get_num_threads()``, a thread runs sets it
to the last value *any* thread passed to ``torch.set_num_threads``, overwriting what
the thread had set for itself before. So a thread that wants its own count must
trigger that initialisation first and only then set the count. Threads created later
still start from the process-wide value, which is the last count set anywhere.
"""

from __future__ import annotations

import torch

__all__ = ["pin_torch_threads"]


def pin_torch_threads(threads: int) -> None:
    """Give the calling thread ``threads`` torch intra-op threads, for good (an executor initializer)."""
    torch.get_num_threads()  # ATen's lazy per-thread initialisation, which would overwrite the count
    torch.set_num_threads(threads)
