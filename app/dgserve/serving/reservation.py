"""A queue place held for one request between its admission and its submit (``DynamicBatcher.reserve``).

Pure asyncio, like the batcher: it only moves the batcher's count of held places.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

__all__ = ["UPLOAD_HOLD_S", "Reservation", "while_uploading"]

T = TypeVar("T")

# How long a request's place stays held while its body is still coming in. The hold is for
# a burst: requests parsed in one turn of the event loop, whose small bodies follow within
# milliseconds. A body still arriving after this is a slow or large upload, which waits for
# the network, not for compute: holding its place would let a few hundred slow uploads
# (slow-loris clients among them) fill the queue and refuse everyone else (issue 13,
# finding 5). Its place is given back, and taken again once the body is in.
UPLOAD_HOLD_S = 1.0


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
        self._hold()

    def _hold(self) -> None:
        self._held = True
        self._batcher._reserved += 1

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

    @property
    def held(self) -> bool:
        return self._held

    def renew(self) -> None:
        """Hold the place again after it was given back: ``reserve``'s check, so ``QueueFullError``
        (counted) if the queue filled meanwhile, before anything is decoded."""
        if not self._held:
            self._batcher.check_admission()
            self._hold()

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


async def while_uploading(reservation: Reservation, body: Awaitable[T], hold_s: float = UPLOAD_HOLD_S) -> T:
    """Await ``body`` (reading a request's body) holding ``reservation``'s place for at most
    ``hold_s`` of it, then hold the place again (or refuse: ``renew``); see ``UPLOAD_HOLD_S``."""
    lapse = asyncio.get_running_loop().call_later(hold_s, reservation.release)
    try:
        result = await body
    finally:
        lapse.cancel()
    reservation.renew()
    return result
