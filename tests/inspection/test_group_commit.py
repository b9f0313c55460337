"""Answers that wait for their records' commit share transactions (group commit), on every backend."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Mapping, Sequence

import pytest

from dgserve.inspection import InspectionBackend, InspectionRecord, InspectionStore
from dgserve.inspection.backend import StoredRecord

pytestmark = pytest.mark.asyncio

ANSWERS = 64


def _record(n: int) -> InspectionRecord:
    return InspectionRecord.new(model="m", version=1, task="classification",
                                prediction={"n": n}, connectivity={"stages": []})  # fmt: skip


async def test_concurrent_commits_share_transactions(
    make_backend: Callable[[], InspectionBackend], started: Callable[..., object]
) -> None:
    backend = make_backend()
    transactions: list[int] = []
    write = backend.write_batch

    def counted(records: Sequence[StoredRecord], graphs: Mapping[str, str]) -> None:
        transactions.append(len(records))
        write(records, graphs)

    backend.write_batch = counted  # type: ignore[method-assign]
    store: InspectionStore = await started(InspectionStore(backend))  # type: ignore[misc]

    async def answer(n: int) -> bool:
        # What ServingService does for each answer: queue the record, wait for its commit.
        assert await store.put(_record(n))
        return await store.commit(timeout_s=30)

    assert all(await asyncio.gather(*(answer(n) for n in range(ANSWERS))))
    assert sum(transactions) == ANSWERS
    print(f"{ANSWERS} waiting answers committed in {len(transactions)} transactions: {transactions}")
    assert len(transactions) < ANSWERS / 4


async def test_a_commit_that_outlasts_its_timeout_answers_false_and_the_record_still_lands(
    make_backend: Callable[[], InspectionBackend], started: Callable[..., object]
) -> None:
    backend = make_backend()
    release = threading.Event()
    write = backend.write_batch

    def slow(records: Sequence[StoredRecord], graphs: Mapping[str, str]) -> None:
        release.wait(timeout=30)  # storage that is slow, not failing
        write(records, graphs)

    backend.write_batch = slow  # type: ignore[method-assign]
    store: InspectionStore = await started(InspectionStore(backend))  # type: ignore[misc]
    record = _record(1)
    assert await store.put(record)
    loop = asyncio.get_running_loop()
    began = loop.time()
    assert not await store.commit(timeout_s=0.2)
    assert 0.15 <= loop.time() - began < 5
    release.set()
    await store.flush()
    assert (await store.get(record.id)).prediction == {"n": 1}
    assert await store.commit(timeout_s=30)  # nothing left to wait for
