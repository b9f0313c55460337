"""The reader processes (``dgserve.inspection.readers``) on every backend: the same bytes
as the in-process reads, typed errors, a cancelled read that frees its process, a killed
process replaced with a clean error, the priority, and no process left after ``close``.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import os
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import pytest_asyncio

from dgserve.analysis.summary import summarise
from dgserve.errors import InvalidAnalysisError, QueueFullError, ReadWorkerError
from dgserve.inspection import InspectionStore, open_inspection_store, readers
from dgserve.inspection.backend import Filters
from dgserve.inspection.readers import ReaderPool
from dgserve.inspection.readjobs import CHUNK_BYTES, WINDOW, Job
from test_store_contract_analysis import MODEL, make_records

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(180)]


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "inspections.db")
    url: str = request.getfixturevalue("postgres_schema_url")
    return url


@pytest_asyncio.fixture
async def store(location: str) -> AsyncIterator[InspectionStore]:
    store = open_inspection_store(location)
    await store.start()
    for record in make_records(300):
        await store.put(record)
    await store.flush()
    yield store
    await store.close()


@pytest_asyncio.fixture
async def pool(location: str) -> AsyncIterator[ReaderPool]:
    pool = ReaderPool(location, workers=1)
    yield pool
    await pool.close()


def gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists()


async def until(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.05)


async def test_listing_is_the_in_process_listing(store: InspectionStore, pool: ReaderPool) -> None:
    filters = Filters(model=MODEL, label="cat")
    want = [json.dumps(r.to_dict()) async for r in store.list(limit=1000, filters=filters)]
    options: dict[str, Any] = {"limit": 1000, "include_connectivity": True, "format": "ndjson"}
    ndjson = b"".join([c async for c in pool.stream(Job("list", filters, options))])
    assert ndjson.decode() == "".join(line + "\n" for line in want)
    document = await pool.result(Job("list", filters, {**options, "format": "json", "limit": 7}))
    assert document.decode() == f'{{"records":[{",".join(want[:7])}],"count":7}}'


async def test_export_and_summary(store: InspectionStore, pool: ReaderPool) -> None:
    filters = Filters(model=MODEL)
    table = pq.read_table(io.BytesIO(await pool.result(Job("export", filters))))
    assert table.num_rows == 300
    options = {"group_by": "label", "kind": None, "top_k": 5, "head": {"model": MODEL}, "fmt": None}
    got = json.loads(await pool.result(Job("summary", filters, options)))
    want = summarise(store.backend.select(filters), group_by="label", tags=(), kind=None, top_k=5,
                     pattern_bits=store.backend.pattern_bits)  # fmt: skip
    assert got == json.loads(json.dumps({"model": MODEL, **want}))
    bad = {**options, "group_by": "tag:nope"}
    with pytest.raises(InvalidAnalysisError, match="nope") as caught:
        await pool.result(Job("summary", filters, bad))
    assert caught.value.status_code == 422
    assert (await pool.result(Job("summary", filters, options))).startswith(b'{"model"')  # still serving


async def _past_the_window(store: InspectionStore) -> dict[str, Any]:
    """Listing options whose body is more than ``WINDOW`` chunks: its reader sends ``WINDOW``
    chunks, then waits for a credit, so it is still mid-read after the first is taken.

    The fixture's 300 records are one full chunk and a remainder, which a reader sends at
    once, its end included: a read of those may be over before anything can interrupt it.
    """
    more = make_records(400, seed=1)
    for record in more:
        await store.put(record)
    await store.flush()
    lines = [json.dumps(r.to_dict()) for r in [*make_records(300), *more]]
    assert sum(map(len, lines)) > (WINDOW + 0.5) * CHUNK_BYTES
    return {"limit": len(lines), "include_connectivity": True, "format": "ndjson"}


async def test_cancelled_read_frees_its_process(store: InspectionStore, pool: ReaderPool) -> None:
    options = await _past_the_window(store)
    chunks = pool.stream(Job("list", Filters(), options))
    await anext(chunks)  # the reader is mid-read: the rest is never taken
    await chunks.aclose()  # type: ignore[attr-defined]
    (pid,) = pool.pids
    async with asyncio.timeout(30):
        while len(pool._idle) != 1:  # the cancel is answered in the background
            await asyncio.sleep(0.05)
    body = await pool.result(Job("list", Filters(), {**options, "limit": 2}))
    assert body.count(b"\n") == 2
    assert pool.pids == [pid]  # the same process, not a replacement


async def test_killed_process_is_replaced(store: InspectionStore, pool: ReaderPool) -> None:
    options = await _past_the_window(store)
    chunks = pool.stream(Job("list", Filters(), options))
    await anext(chunks)  # the reader is mid-read, waiting for a credit
    (pid,) = pool.pids
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(ReadWorkerError) as caught:
        async for _ in chunks:
            pass
    assert caught.value.status_code == 503 and caught.value.headers["Retry-After"]
    await until(lambda: gone(pid))
    body = await pool.result(Job("list", Filters(), {**options, "limit": 3}))
    assert body.count(b"\n") == 3
    assert pool.pids and pool.pids != [pid]


async def test_low_priority_and_no_orphans(store: InspectionStore, location: str) -> None:
    pool = ReaderPool(location, workers=2, niceness=7)
    options = {"limit": 300, "include_connectivity": True, "format": "ndjson"}
    busy = pool.stream(Job("list", Filters(), options))
    await anext(busy)  # one process mid-read, the other idle
    await pool.result(Job("list", Filters(), {**options, "limit": 1}))
    pids = pool.pids
    assert len(pids) == 2
    want = max(7, os.getpriority(os.PRIO_PROCESS, 0))  # never above this process's own
    assert [os.getpriority(os.PRIO_PROCESS, pid) for pid in pids] == [want, want]
    await pool.close()
    assert all(gone(pid) for pid in pids)
    await busy.aclose()  # type: ignore[attr-defined]


async def test_busy_pool_answers_503(store: InspectionStore, pool: ReaderPool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(readers, "HEAVY_WAIT_S", 0.2)
    options = {"limit": 300, "include_connectivity": True, "format": "ndjson"}
    busy = pool.stream(Job("list", Filters(), options))
    await anext(busy)
    with pytest.raises(QueueFullError) as caught:
        await pool.result(Job("list", Filters(), options))
    assert caught.value.headers["Retry-After"] == "5"
    await busy.aclose()  # type: ignore[attr-defined]


YIELD_S = 2.0  # long beside a summary read's own time, so the bounds below hold under load


async def test_reads_wait_while_inference_is_busy(store: InspectionStore, location: str) -> None:
    """Before it starts and before each further chunk, a read waits until inference has been
    quiet for ``_QUIET_S``, up to ``yield_s`` each time; an idle server's read does not
    wait, and a read stops waiting once inference has gone quiet."""
    state = {"busy": False, "quiet_from": 0.0}
    loop = asyncio.get_running_loop()

    def idle_s() -> float:
        return 0.0 if state["busy"] else loop.time() - state["quiet_from"]

    def go_quiet() -> None:
        state.update(busy=False, quiet_from=loop.time())

    # At the niceness of this process: a nice-19 reader on a shared, loaded machine gets
    # too little CPU for the bounds below (the priority has its own test, above).
    pool = ReaderPool(location, workers=1, idle_s=idle_s, yield_s=YIELD_S, niceness=0)
    options = {"group_by": "label", "kind": None, "top_k": 5, "head": {"model": MODEL}, "fmt": None}
    job = Job("summary", Filters(model=MODEL), options)
    try:
        want = await pool.result(job)  # starts the child
        started = loop.time()
        assert await pool.result(job) == want
        quiet_s = loop.time() - started

        state["busy"] = True
        started = loop.time()
        assert await pool.result(job) == want  # one chunk: a wait before the job, one before its credit
        busy_s = loop.time() - started

        state["busy"] = True
        loop.call_later(0.2, go_quiet)
        started = loop.time()
        assert await pool.result(job) == want
        freed_s = loop.time() - started
    finally:
        await pool.close()
    print(f"summary read: idle {quiet_s:.3f} s, busy {busy_s:.3f} s, busy for 0.2 s {freed_s:.3f} s")
    assert quiet_s < YIELD_S * 0.95  # no wait at all when inference is quiet
    assert busy_s >= 2 * YIELD_S * 0.95
    assert freed_s < 2 * YIELD_S * 0.95 and freed_s >= (0.2 + readers._QUIET_S) * 0.95


async def test_a_read_cancelled_while_it_waits_holds_no_process(store: InspectionStore, location: str) -> None:
    """The wait comes before a process is taken: a read cancelled during it (the server
    stopping, a timeout around it) leaves the pool as it was, and the next read is served
    at once instead of waiting for a process abandoned mid-job."""
    state = {"busy": True}
    # At this process's niceness, as above: a nice-19 reader starting on a loaded machine
    # could take longer than the bound below.
    pool = ReaderPool(location, workers=1, idle_s=lambda: 0.0 if state["busy"] else math.inf, yield_s=5.0,
                      niceness=0)  # fmt: skip
    options = {"group_by": "label", "kind": None, "top_k": 5, "head": {"model": MODEL}, "fmt": None}
    job = Job("summary", Filters(model=MODEL), options)
    try:
        waiting = asyncio.create_task(pool.result(job))
        await asyncio.sleep(0.2)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert pool.pids == []
        state["busy"] = False
        async with asyncio.timeout(10):  # a process held by an abandoned job would take 30 s
            assert (await pool.result(job)).startswith(b'{"model"')
    finally:
        await pool.close()
