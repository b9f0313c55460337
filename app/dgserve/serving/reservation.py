"""A queue place held for one request between its admission and its submit (``DynamicBatcher.reserve``).

Pure Python, like the batcher: it only moves the batcher's count of held places.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Reservation"]


class Reservation:
    """A queue place held for one request from its admission to its submit.

    Between the two the request's body is read and decoded. Without the hold, every
    request arriving while the queue had room was admitted, and under overload dozens
    then decoded their images only to be refused at ``submit`` for a queue that had
    filled meanwhile: the costliest way to refuse. ``submit(..., reservation=r)`` takes
    the place; leaving the ``with`` block (or ``release()``) gives back one not taken.
    """

    __slots__ = ("_batcher", "_held")

    def __init__(self, batcher: Any) -> None:
        self._batcher = batcher
        self._held = True
        batcher._reserved += 1

    @property
    def batcher(self) -> Any:
        """The ``DynamicBatcher`` whose place this is."""
        return self._batcher

    def take(self) -> bool:
        """Give the place up for the item being queued now; False if it was already given up."""
        held, self._held = self._held, False
        if held:
            self._batcher._reserved -= 1
        return held

    release = take

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
