"""DynamicBatcher: batch forming, worker pool, back-pressure, deadlines, cancellation,
failures and shutdown.

Ordering is driven by events wherever possible; where time itself is the subject, the
delays are short and the margins wide enough for a loaded CI machine.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import pytest

from dgserve.errors import (
    DeadlineExceededError,
    NotReadyError,
    QueueFullError,
    ShuttingDownError,
)
from dgserve.serving.batcher import DynamicBatcher, RejectReason

pytestmark = pytest.mark.timeout(10)

WAIT = 2.0  # upper bound for "this should happen promptly"; never reached when passing


class Recorder:
    """A handler that records each batch, optionally blocks on a gate, and doubles items."""

    def __init__(self, gate: asyncio.Event | None = None) -> None:
        self.gate = gate
        self.batches: list[list[int]] = []
        self.called_at: list[float] = []
        self.entered = asyncio.Event()

    async def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.called_at.append(asyncio.get_running_loop().time())
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        return [2 * x for x in items]

    @property
    def seen(self) -> list[int]:
        return [x for b in self.batches for x in b]


class Observer:
    def __init__(self) -> None:
        self.formed: list[tuple[int, list[float]]] = []
        self.done: list[tuple[int, float, bool]] = []
        self.rejections: list[RejectReason] = []

    def batch_formed(self, size: int, queue_wait_s: Sequence[float]) -> None:
        self.formed.append((size, list(queue_wait_s)))

    def batch_done(self, size: int, compute_s: float, ok: bool) -> None:
        self.done.append((size, compute_s, ok))

    def rejected(self, reason: RejectReason) -> None:
        self.rejections.append(reason)


def make(handlers: Sequence[Recorder], **kw: object) -> DynamicBatcher[int, int]:
    opts: dict[object, object] = dict(max_batch_size=4, max_delay_s=5.0, max_queue_size=64)
    opts.update(kw)
    return DynamicBatcher(handlers, **opts)  # type: ignore[arg-type]


async def wait_until(cond: object, timeout: float = WAIT) -> None:
    async def poll() -> None:
        while not cond():  # type: ignore[operator]
            await asyncio.sleep(0.001)

    await asyncio.wait_for(poll(), timeout)


def now() -> float:
    return asyncio.get_running_loop().time()


# --- forming batches ----------------------------------------------------------


@pytest.mark.asyncio
async def test_batches_fill_to_max_batch_size() -> None:
    h = Recorder()
    # A huge delay: only reaching max_batch_size can release these batches in time.
    async with make([h], max_batch_size=4, max_delay_s=60.0) as b:
        results = await asyncio.wait_for(asyncio.gather(*(b.submit(i) for i in range(8))), WAIT)
    assert h.batches == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert results == [2 * i for i in range(8)]


@pytest.mark.asyncio
async def test_partial_batch_released_after_max_delay() -> None:
    h = Recorder()
    delay = 0.05
    async with make([h], max_batch_size=8, max_delay_s=delay) as b:
        t0 = now()
        results = await asyncio.gather(*(b.submit(i) for i in range(3)))
    assert results == [0, 2, 4]
    assert h.batches == [[0, 1, 2]]
    waited = h.called_at[0] - t0
    assert delay - 0.005 <= waited < delay + 0.5  # asyncio timers may fire a hair early


@pytest.mark.asyncio
async def test_delay_counts_from_first_item_not_last() -> None:
    h = Recorder()
    delay = 1.0  # long beside a loaded machine's scheduling stalls, so the two cases stay apart
    async with make([h], max_batch_size=8, max_delay_s=delay) as b:
        t0 = now()
        first = asyncio.ensure_future(b.submit(1))
        await asyncio.sleep(0.5)
        t2 = now()
        second = asyncio.ensure_future(b.submit(2))
        assert await asyncio.gather(first, second) == [2, 4]
    assert h.batches == [[1, 2]]
    # Counting from the second item would release no earlier than t2 + delay.
    assert delay - 0.005 <= h.called_at[0] - t0 and h.called_at[0] < t2 + delay


@pytest.mark.asyncio
async def test_delay_counts_from_enqueue_not_from_when_a_worker_frees_up() -> None:
    gate = asyncio.Event()
    h = Recorder(gate)
    delay = 1.0  # long against a loaded machine's stalls: a fresh delay would be 1 s more
    async with make([h], max_batch_size=2, max_delay_s=delay) as b:
        busy = [asyncio.ensure_future(b.submit(i)) for i in (1, 2)]
        await asyncio.wait_for(h.entered.wait(), WAIT)
        late = asyncio.ensure_future(b.submit(3))  # queues behind the busy worker
        await asyncio.sleep(delay + 0.05)  # its delay runs out while the worker is busy
        released = now()
        gate.set()
        assert await asyncio.wait_for(asyncio.gather(*busy, late), WAIT) == [2, 4, 6]
    assert h.batches == [[1, 2], [3]]
    # Already overdue when the worker came free: sent at once, not after another delay.
    assert h.called_at[1] - released < delay / 2


@pytest.mark.asyncio
async def test_results_map_back_to_their_callers() -> None:
    async def slow_first(items: list[int]) -> list[int]:
        # Batches finish out of order, so results cannot come back by luck.
        await asyncio.sleep(0.03 if 0 in items else 0)
        return [x * 10 for x in items]

    async with DynamicBatcher(
        [slow_first, slow_first], max_batch_size=3, max_delay_s=0.01, max_queue_size=64
    ) as b:
        values = [5, 0, 7, 3, 9, 1, 4, 8]
        results = await asyncio.wait_for(asyncio.gather(*(b.submit(v) for v in values)), WAIT)
    assert results == [v * 10 for v in values]


# --- the worker pool ----------------------------------------------------------


@pytest.mark.asyncio
async def test_workers_run_batches_concurrently() -> None:
    gate = asyncio.Event()
    h1, h2 = Recorder(gate), Recorder(gate)
    async with make([h1, h2], max_batch_size=2) as b:
        calls = [asyncio.ensure_future(b.submit(i)) for i in range(4)]
        # Both handlers are inside a batch at the same time, blocked on one gate.
        await asyncio.wait_for(asyncio.gather(h1.entered.wait(), h2.entered.wait()), WAIT)
        assert b.in_flight == 4
        assert b.queue_depth == 0
        gate.set()
        assert await asyncio.wait_for(asyncio.gather(*calls), WAIT) == [0, 2, 4, 6]
    assert sorted([h1.batches[0], h2.batches[0]]) == [[0, 1], [2, 3]]
    assert b.in_flight == 0


@pytest.mark.asyncio
async def test_free_worker_takes_next_batch_while_another_is_busy() -> None:
    stuck = Recorder(asyncio.Event())  # never released during the test
    free = Recorder()
    async with make([stuck, free], max_batch_size=1, max_delay_s=0.0) as b:
        first = asyncio.ensure_future(b.submit(1))
        await asyncio.wait_for(stuck.entered.wait(), WAIT)
        assert await asyncio.wait_for(b.submit(2), WAIT) == 4
        assert await asyncio.wait_for(b.submit(3), WAIT) == 6
        assert stuck.gate is not None
        stuck.gate.set()
        assert await first == 2
    assert free.batches == [[2], [3]]


# --- back-pressure, deadlines, cancellation -----------------------------------


@pytest.mark.asyncio
async def test_queue_full_rejects_at_once_with_retry_after() -> None:
    gate = asyncio.Event()
    h = Recorder(gate)
    obs = Observer()
    async with make([h], max_batch_size=1, max_queue_size=3, observer=obs) as b:
        calls = [asyncio.ensure_future(b.submit(0))]
        await asyncio.wait_for(h.entered.wait(), WAIT)  # the worker holds item 0
        calls += [asyncio.ensure_future(b.submit(i)) for i in (1, 2, 3)]
        await wait_until(lambda: b.queue_depth == 3)
        for _ in range(5):
            with pytest.raises(QueueFullError) as info:
                # Must not wait for space: wait_for would turn a block into TimeoutError.
                await asyncio.wait_for(b.submit(99), 0.5)
            assert info.value.retry_after_s > 0
            assert info.value.status_code == 503
            assert "Retry-After" in info.value.headers
            assert b.queue_depth == 3
        gate.set()
        assert await asyncio.wait_for(asyncio.gather(*calls), WAIT) == [0, 2, 4, 6]
    assert 99 not in h.seen
    assert obs.rejections == ["queue_full"] * 5


@pytest.mark.asyncio
async def test_check_admission_refuses_as_submit_would_and_counts_once() -> None:
    gate = asyncio.Event()
    h = Recorder(gate)
    obs = Observer()
    async with make([h], max_batch_size=1, max_queue_size=1, observer=obs) as b:
        b.check_admission()  # room: nothing raised, nothing counted
        calls = [asyncio.ensure_future(b.submit(0))]
        await asyncio.wait_for(h.entered.wait(), WAIT)
        calls.append(asyncio.ensure_future(b.submit(1)))
        await wait_until(lambda: b.queue_depth == 1)
        b.estimate.avg_batch_s = 7.0  # as if batches had taken 7 s: the estimate follows the model
        with pytest.raises(QueueFullError) as info:
            b.check_admission()
        assert info.value.retry_after_s == pytest.approx(7.0) and info.value.headers["Retry-After"] == "7"
        assert obs.rejections == ["queue_full"]
        gate.set()
        await asyncio.wait_for(asyncio.gather(*calls), WAIT)
    with pytest.raises(ShuttingDownError):
        b.check_admission()
    assert obs.rejections == ["queue_full", "shutting_down"]


@pytest.mark.asyncio
async def test_a_reserved_place_counts_as_queued_until_submitted_or_released() -> None:
    gate = asyncio.Event()
    h = Recorder(gate)
    obs = Observer()
    async with make([h], max_batch_size=1, max_queue_size=2, observer=obs) as b:
        first = asyncio.ensure_future(b.submit(0))
        await asyncio.wait_for(h.entered.wait(), WAIT)  # computing: the queue is empty
        held = [b.reserve(), b.reserve()]  # two admitted requests, still decoding
        assert b.queue_depth == 0 and b.full
        with pytest.raises(QueueFullError):
            b.reserve()  # a third is refused before it decodes anything
        with pytest.raises(QueueFullError):
            await b.submit(9)  # and so is an item that held no place
        # A held place is the item's, even though the queue counts as full.
        second = asyncio.ensure_future(b.submit(1, reservation=held[0]))
        await wait_until(lambda: b.queue_depth == 1)
        assert b.full and not held[0].take()  # taken once
        with held[1]:  # a request failing before submit gives its place back
            pass
        assert not b.full
        third = asyncio.ensure_future(b.submit(2, reservation=held[1]))  # released: queues as any item
        await wait_until(lambda: b.queue_depth == 2)
        gate.set()
        assert await asyncio.wait_for(asyncio.gather(first, second, third), WAIT) == [0, 2, 4]
    assert obs.rejections == ["queue_full", "queue_full"] and not b.full


@pytest.mark.asyncio
async def test_retry_after_grows_with_queue_depth() -> None:
    gate = asyncio.Event()
    h, hb = Recorder(gate), Recorder(gate)
    async with make([h], max_batch_size=1, max_queue_size=1) as small, make(
        [hb], max_batch_size=1, max_queue_size=4
    ) as big:
        calls = [asyncio.ensure_future(small.submit(0)), asyncio.ensure_future(big.submit(0))]
        await asyncio.wait_for(asyncio.gather(h.entered.wait(), hb.entered.wait()), WAIT)
        calls += [asyncio.ensure_future(small.submit(1))]
        calls += [asyncio.ensure_future(big.submit(i)) for i in range(1, 5)]
        await wait_until(lambda: small.queue_depth == 1 and big.queue_depth == 4)
        with pytest.raises(QueueFullError) as short:
            await small.submit(9)
        with pytest.raises(QueueFullError) as long:
            await big.submit(9)
        assert 0 < short.value.retry_after_s < long.value.retry_after_s
        gate.set()
        await asyncio.wait_for(asyncio.gather(*calls), WAIT)


@pytest.mark.asyncio
async def test_deadline_fails_at_the_deadline_and_never_reaches_handler() -> None:
    gate = asyncio.Event()
    h = Recorder(gate)
    obs = Observer()
    async with make([h], max_batch_size=1, observer=obs) as b:
        busy = asyncio.ensure_future(b.submit(1))
        await asyncio.wait_for(h.entered.wait(), WAIT)
        t0 = now()
        with pytest.raises(DeadlineExceededError) as info:
            await asyncio.wait_for(b.submit(2, deadline=t0 + 0.05), WAIT)
        # At the deadline, while the only worker is still busy, not when it frees up.
        assert 0.045 <= now() - t0 < 0.5
        assert not gate.is_set()
        assert info.value.status_code == 504
        assert b.queue_depth == 0
        gate.set()
        assert await busy == 2
        assert await b.submit(3) == 6
    assert h.seen == [1, 3]
    assert obs.rejections == ["deadline"]


@pytest.mark.asyncio
async def test_expired_item_is_not_computed_even_before_its_timer_runs() -> None:
    gate = asyncio.Event()
    h = Recorder(gate)
    async with make([h], max_batch_size=1) as b:
        busy = asyncio.ensure_future(b.submit(1))
        await asyncio.wait_for(h.entered.wait(), WAIT)
        # Far enough ahead that a loaded machine still queues it in time.
        late = asyncio.ensure_future(b.submit(3, deadline=now() + 0.5))
        await wait_until(lambda: b.queue_depth == 1)
        # Wake the worker, then stall the loop past the deadline: the worker's wakeup is
        # already queued, so it forms the next batch before the caller's timer can run.
        gate.set()
        time.sleep(0.6)
        with pytest.raises(DeadlineExceededError):
            await asyncio.wait_for(late, WAIT)
        assert await busy == 2
    assert h.seen == [1]


@pytest.mark.asyncio
async def test_deadline_already_past_is_rejected_without_queueing() -> None:
    h = Recorder()
    async with make([h]) as b:
        with pytest.raises(DeadlineExceededError):
            await b.submit(1, deadline=now() - 0.001)
        assert b.queue_depth == 0
    assert h.batches == []


@pytest.mark.asyncio
async def test_deadline_far_away_does_not_interfere() -> None:
    async with make([Recorder()], max_delay_s=0.0) as b:
        assert await asyncio.wait_for(b.submit(4, deadline=now() + 30), WAIT) == 8


@pytest.mark.asyncio
async def test_cancelled_caller_is_dropped_and_takes_no_batch_slot() -> None:
    gate = asyncio.Event()
    h = Recorder(gate)
    obs = Observer()
    async with make([h], max_batch_size=2, observer=obs) as b:
        busy = [asyncio.ensure_future(b.submit(i)) for i in (1, 2)]
        await asyncio.wait_for(h.entered.wait(), WAIT)
        a, gone, c = (asyncio.ensure_future(b.submit(i)) for i in (3, 4, 5))
        await wait_until(lambda: b.queue_depth == 3)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert b.queue_depth == 2  # its slot is free at once
        gate.set()
        assert await asyncio.wait_for(asyncio.gather(*busy, a, c), WAIT) == [2, 4, 6, 10]
    assert h.batches == [[1, 2], [3, 5]]  # 5 took the slot 4 left
    assert obs.rejections == ["cancelled"]


@pytest.mark.asyncio
async def test_caller_cancelled_as_the_batch_forms_is_skipped() -> None:
    gate = asyncio.Event()
    h = Recorder(gate)
    async with make([h], max_batch_size=2) as b:
        busy = [asyncio.ensure_future(b.submit(i)) for i in (1, 2)]
        await asyncio.wait_for(h.entered.wait(), WAIT)
        a, gone, c = (asyncio.ensure_future(b.submit(i)) for i in (3, 4, 5))
        await wait_until(lambda: b.queue_depth == 3)
        # The worker resumes before the cancelled caller can remove its own entry,
        # so the worker itself must skip it while forming the next batch.
        gate.set()
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert await asyncio.wait_for(asyncio.gather(*busy, a, c), WAIT) == [2, 4, 6, 10]
    assert h.batches == [[1, 2], [3, 5]]


@pytest.mark.asyncio
async def test_cancelled_head_does_not_hold_the_batch_open() -> None:
    h = Recorder()
    async with make([h], max_batch_size=2, max_delay_s=60.0) as b:
        gone = asyncio.ensure_future(b.submit(1))
        await wait_until(lambda: b.queue_depth == 1)
        gone.cancel()  # not awaited yet: the entry may still be in the queue
        calls = [asyncio.ensure_future(b.submit(i)) for i in (2, 3)]
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert await asyncio.wait_for(asyncio.gather(*calls), WAIT) == [4, 6]
    assert h.batches == [[2, 3]]


# --- handler failures ---------------------------------------------------------


@pytest.mark.asyncio
async def test_handler_error_fails_only_its_batch() -> None:
    boom = ValueError("bad input")
    batches: list[list[int]] = []

    async def handler(items: list[int]) -> list[int]:
        batches.append(items)
        if -1 in items:
            raise boom
        return [x + 1 for x in items]

    obs = Observer()
    async with DynamicBatcher(
        [handler], max_batch_size=2, max_delay_s=60.0, max_queue_size=8, observer=obs
    ) as b:
        bad = await asyncio.wait_for(
            asyncio.gather(b.submit(-1), b.submit(5), b.submit(6), b.submit(7),
                           return_exceptions=True),
            WAIT,
        )
        # The same worker keeps serving after the failure.
        good = await asyncio.wait_for(asyncio.gather(b.submit(1), b.submit(2)), WAIT)
    assert batches == [[-1, 5], [6, 7], [1, 2]]
    assert bad[0] is boom and bad[1] is boom
    assert bad[2:] == [7, 8]
    assert good == [2, 3]
    assert [ok for _, _, ok in obs.done] == [False, True, True]


@pytest.mark.asyncio
async def test_wrong_result_count_fails_the_whole_batch() -> None:
    short = True

    async def handler(items: list[int]) -> list[int]:
        return items[:-1] if short else items

    async with DynamicBatcher([handler], max_batch_size=3, max_delay_s=60.0,
                              max_queue_size=8) as b:
        out = await asyncio.wait_for(
            asyncio.gather(*(b.submit(i) for i in range(3)), return_exceptions=True), WAIT
        )
        assert all(isinstance(e, RuntimeError) for e in out)
        assert "2 results for a batch of 3" in str(out[0])
        short = False
        assert await asyncio.wait_for(asyncio.gather(*(b.submit(i) for i in range(3))),
                                      WAIT) == [0, 1, 2]


@pytest.mark.asyncio
async def test_handler_cancelling_itself_fails_batch_but_not_worker() -> None:
    async def handler(items: list[int]) -> list[int]:
        if 0 in items:
            raise asyncio.CancelledError
        return items

    async with DynamicBatcher([handler], max_batch_size=1, max_delay_s=0.0,
                              max_queue_size=8) as b:
        # Callers see an error, not a CancelledError they would take for their own.
        with pytest.raises(RuntimeError, match="cancelled"):
            await asyncio.wait_for(b.submit(0), WAIT)
        assert await asyncio.wait_for(b.submit(1), WAIT) == 1


# --- shutdown -----------------------------------------------------------------


def other_tasks() -> set[asyncio.Task[object]]:
    return asyncio.all_tasks() - {asyncio.current_task()}  # type: ignore[operator]


@pytest.mark.asyncio
async def test_stop_finishes_in_flight_and_fails_queued() -> None:
    gate = asyncio.Event()
    h = Recorder(gate)
    obs = Observer()
    b = make([h], max_batch_size=1, observer=obs)
    b.start()
    running = asyncio.ensure_future(b.submit(1))
    await asyncio.wait_for(h.entered.wait(), WAIT)
    queued = [asyncio.ensure_future(b.submit(i)) for i in (2, 3)]
    await wait_until(lambda: b.queue_depth == 2)

    stopping = asyncio.ensure_future(b.stop())
    for q in queued:
        with pytest.raises(ShuttingDownError):
            await asyncio.wait_for(q, WAIT)
    with pytest.raises(ShuttingDownError):
        await b.submit(4)
    assert not stopping.done()  # still waiting for the in-flight batch
    assert b.in_flight == 1
    gate.set()
    await asyncio.wait_for(stopping, WAIT)
    assert await running == 2

    assert h.seen == [1]
    assert b.queue_depth == 0 and b.in_flight == 0
    assert other_tasks() == set()
    assert obs.rejections == ["shutting_down"] * 3


@pytest.mark.asyncio
async def test_stop_with_drain_serves_queued_requests() -> None:
    gate = asyncio.Event()
    h = Recorder(gate)
    b = make([h], max_batch_size=2, max_delay_s=60.0)
    b.start()
    calls = [asyncio.ensure_future(b.submit(i)) for i in (1, 2, 3)]
    await asyncio.wait_for(h.entered.wait(), WAIT)
    stopping = asyncio.ensure_future(b.stop(drain=True))
    await asyncio.sleep(0)
    with pytest.raises(ShuttingDownError):
        await b.submit(9)
    gate.set()
    await asyncio.wait_for(stopping, WAIT)
    # The lone leftover goes out without waiting out the 60 s delay.
    assert await asyncio.gather(*calls) == [2, 4, 6]
    assert h.batches == [[1, 2], [3]]
    assert other_tasks() == set()


@pytest.mark.asyncio
async def test_stop_timeout_cancels_stuck_batch_and_fails_its_requests() -> None:
    h = Recorder(asyncio.Event())  # never released
    b = make([h], max_batch_size=2, max_delay_s=0.0)
    b.start()
    stuck = asyncio.ensure_future(b.submit(1))
    await asyncio.wait_for(h.entered.wait(), WAIT)
    await asyncio.wait_for(b.stop(timeout=0.02), WAIT)
    with pytest.raises(ShuttingDownError):
        await stuck
    assert b.in_flight == 0
    assert other_tasks() == set()


@pytest.mark.asyncio
async def test_stop_is_idempotent_and_idle_batcher_stops_promptly() -> None:
    b = make([Recorder(), Recorder()])
    b.start()
    await asyncio.sleep(0.01)
    await asyncio.wait_for(b.stop(), WAIT)
    await asyncio.wait_for(b.stop(), WAIT)
    assert other_tasks() == set()


@pytest.mark.asyncio
async def test_idle_s_is_zero_while_computing_and_counts_from_the_finished_batch() -> None:
    gate = asyncio.Event()
    b = make([Recorder(gate)], max_batch_size=1, max_delay_s=0.0)
    assert b.idle_s == float("inf")  # not started
    b.start()
    assert b.idle_s == float("inf")  # nothing has ever arrived
    call = asyncio.create_task(b.submit(1))
    await asyncio.sleep(0.05)
    assert b.idle_s == 0.0  # computing (the handler waits on its gate)
    gate.set()
    assert await call == 2
    await asyncio.sleep(0.05)
    assert 0.04 <= b.idle_s < WAIT
    await b.stop()


@pytest.mark.asyncio
async def test_submit_before_start_is_not_ready() -> None:
    b = make([Recorder()])
    with pytest.raises(NotReadyError):
        await b.submit(1)
    await b.stop()


def test_rejects_bad_config() -> None:
    with pytest.raises(ValueError):
        DynamicBatcher([], max_batch_size=1, max_delay_s=0.0, max_queue_size=1)
    with pytest.raises(ValueError):
        make([Recorder()], max_batch_size=0)
    with pytest.raises(ValueError):
        make([Recorder()], max_queue_size=0)
    with pytest.raises(ValueError):
        make([Recorder()], max_delay_s=-1.0)


# --- observability ------------------------------------------------------------


@pytest.mark.asyncio
async def test_observer_sees_sizes_waits_and_rejections() -> None:
    gate = asyncio.Event()
    h = Recorder(gate)
    obs = Observer()
    async with make([h], max_batch_size=2, max_delay_s=0.02, max_queue_size=2,
                    observer=obs) as b:
        busy = [asyncio.ensure_future(b.submit(i)) for i in (1, 2)]  # full batch at once
        await asyncio.wait_for(h.entered.wait(), WAIT)
        queued = asyncio.ensure_future(b.submit(3))
        gone = asyncio.ensure_future(b.submit(4))
        await wait_until(lambda: b.queue_depth == 2)
        with pytest.raises(QueueFullError):
            await b.submit(5)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        with pytest.raises(DeadlineExceededError):
            await b.submit(6, deadline=now() + 0.01)
        await asyncio.sleep(0.03)  # item 3 waits past its delay behind the busy worker
        gate.set()
        assert await asyncio.wait_for(asyncio.gather(*busy, queued), WAIT) == [2, 4, 6]
    with pytest.raises(ShuttingDownError):
        await b.submit(7)

    assert [size for size, _ in obs.formed] == [2, 1]
    first_waits, (late_wait,) = obs.formed[0][1], obs.formed[1][1]
    assert all(0 <= w < 0.5 for w in first_waits)
    assert late_wait >= 0.03
    assert [(size, ok) for size, _, ok in obs.done] == [(2, True), (1, True)]
    assert obs.done[0][1] >= 0.03  # the first batch was held at the gate that long
    assert obs.rejections == ["queue_full", "cancelled", "deadline", "shutting_down"]


@pytest.mark.asyncio
async def test_failing_observer_does_not_break_serving() -> None:
    class Broken:
        def fail(self, *args: object) -> None:
            raise RuntimeError("metrics down")

        batch_formed = batch_done = rejected = fail

    async with make([Recorder()], max_delay_s=0.0, observer=Broken()) as b:
        assert await asyncio.wait_for(b.submit(2), WAIT) == 4
