"""Answers that wait for their records' commit share transactions (group commit), on every backend."""

from __future__ import annotations

import asyncio
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
