"""Reservation and ``while_uploading``: a queue place held while a request's body comes in,
for a short while only (``serving/reservation.py``). Pure asyncio, as the batcher."""

from __future__ import annotations

import asyncio

import pytest

from dgserve.errors import QueueFullError
from dgserve.serving.batcher import DynamicBatcher
from dgserve.serving.reservation import while_uploading

pytestmark = pytest.mark.timeout(10)

HOLD_S = 0.05  # the hold under test; the waits below are several times it
WAIT = 2.0


class Rejections:
    def __init__(self) -> None:
        self.reasons: list[str] = []

    def batch_formed(self, size: int, queue_wait_s: object) -> None:
        pass

    def batch_done(self, size: int, compute_s: float, ok: bool) -> None:
        pass

    def rejected(self, reason: str) -> None:
        self.reasons.append(reason)


async def _double(items: list[int]) -> list[int]:
    return [2 * x for x in items]


def make(observer: Rejections, queue: int = 2) -> DynamicBatcher[int, int]:
    return DynamicBatcher([_double], max_batch_size=1, max_delay_s=0.0, max_queue_size=queue, observer=observer)


async def body_after(seconds: float, value: bytes = b"body") -> bytes:
    await asyncio.sleep(seconds)
    return value


@pytest.mark.asyncio
async def test_a_body_that_comes_at_once_keeps_its_place_throughout() -> None:
    async with make(Rejections()) as b:
        reservation = b.reserve()
        assert await while_uploading(reservation, body_after(0), hold_s=HOLD_S) == b"body"
        await asyncio.sleep(HOLD_S * 4)  # the lapse was cancelled with the body in
        assert reservation.held and b._reserved == 1
        assert await b.submit(3, reservation=reservation) == 6
        assert b._reserved == 0


@pytest.mark.asyncio
async def test_a_slow_body_gives_its_place_back_then_takes_it_again() -> None:
    observer = Rejections()
    async with make(observer, queue=1) as b:
        reservation = b.reserve()
        upload = asyncio.ensure_future(while_uploading(reservation, body_after(HOLD_S * 6), hold_s=HOLD_S))
        await asyncio.sleep(HOLD_S * 3)
        assert not reservation.held and not b.full  # while the body comes in, others can be admitted
        other = b.reserve()
        other.release()
        assert await asyncio.wait_for(upload, WAIT) == b"body"
        assert reservation.held and b.full  # its place again, before anything is decoded
        assert await b.submit(1, reservation=reservation) == 2
    assert observer.reasons == []


@pytest.mark.asyncio
async def test_a_slow_body_whose_queue_filled_meanwhile_is_refused_when_it_is_in() -> None:
    observer = Rejections()
    async with make(observer, queue=1) as b:
        reservation = b.reserve()
        upload = asyncio.ensure_future(while_uploading(reservation, body_after(HOLD_S * 6), hold_s=HOLD_S))
        await asyncio.sleep(HOLD_S * 3)
        taken = b.reserve()  # the place it gave back
        with pytest.raises(QueueFullError):
            await asyncio.wait_for(upload, WAIT)
        assert not reservation.held and observer.reasons == ["queue_full"]
        with reservation:  # the route's ``with`` gives back nothing it does not hold
            pass
        assert b.full and b._reserved == 1
        taken.release()
        assert b._reserved == 0


@pytest.mark.asyncio
async def test_a_body_that_fails_keeps_no_timer() -> None:
    async def disconnected() -> bytes:
        raise ConnectionResetError("gone")

    async with make(Rejections()) as b:
        with b.reserve() as reservation:
            with pytest.raises(ConnectionResetError):
                await while_uploading(reservation, disconnected(), hold_s=HOLD_S)
            await asyncio.sleep(HOLD_S * 4)
            assert reservation.held  # no lapse fired after the failure
        assert b._reserved == 0
