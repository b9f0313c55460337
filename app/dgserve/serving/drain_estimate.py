"""How long a model's queue will take to drain: what a refusal's ``Retry-After`` says.

Pure arithmetic, kept apart from the batcher that feeds it (``batcher.py``): the time of
each batch goes in, and an estimate for a queue of a given depth comes out.
"""

from __future__ import annotations

import math

__all__ = ["DrainEstimate"]

# Until a batch has been timed, assume a slow model rather than invite a retry storm.
_DEFAULT_BATCH_S = 1.0
_EWMA_ALPHA = 0.2
_MIN_RETRY_AFTER_S = 0.01


class DrainEstimate:
    """An EWMA of recent batches' compute time, and the drain time it implies."""

    def __init__(self, max_batch_size: int, workers: int) -> None:
        self.per_wave = max_batch_size * workers
        self.avg_batch_s: float | None = None

    def batch_took(self, seconds: float) -> None:
        """One batch's compute time, from the worker that ran it."""
        avg = self.avg_batch_s
        self.avg_batch_s = seconds if avg is None else _EWMA_ALPHA * seconds + (1 - _EWMA_ALPHA) * avg

    def retry_after_s(self, queued: int) -> float:
        """Seconds until ``queued`` waiting requests are served.

        ``ceil(queued / (max_batch_size * workers)) * avg_batch_s``: the queue goes out
        in waves of one full batch per worker, each wave taking about one batch's
        compute time (1 s before the first batch). Suggesting less would only bring the
        client back to another full queue.
        """
        waves = max(1, math.ceil(queued / self.per_wave))
        avg = self.avg_batch_s if self.avg_batch_s is not None else _DEFAULT_BATCH_S
        return max(_MIN_RETRY_AFTER_S, waves * avg)
