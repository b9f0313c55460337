"""Shared graphs: GloRe's A_g is kept once per digest, and every read puts it back.

The store tests run once per backend in ``BACKENDS`` (conftest); how a backend lays
the graphs out is checked in its own tests (``test_sqlite_backend.py``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from dgserve.inspection import InspectionRecord, InspectionStore
from dgserve.inspection.shared import GraphTextCache, attach_shared, split_shared

pytestmark = pytest.mark.timeout(60)

# The conftest's open_store fixture: starts a store with these kwargs.
StoreFactory = Callable[..., Awaitable[InspectionStore]]
QUEUED = {"flush_interval_s": 3600.0}  # records stay queued until flushed


def new_record(connectivity: dict[str, Any], **kw: Any) -> InspectionRecord:
    return InspectionRecord.new(
        model="glore", version=1, task="classification", prediction={"top1": "x"}, connectivity=connectivity, **kw
    )


# --- split / attach / cache -----------------------------------------------------------


def test_split_then_attach_gives_back_the_record_key_for_key(glore_connectivity: list[dict[str, Any]]) -> None:
    original = glore_connectivity[0]
    snapshot = json.dumps(original)
    stored, shared = split_shared(original)
    assert json.dumps(original) == snapshot  # the input is left alone
    assert len(shared) == len(original["glore_units"]) == 2
    assert all("adjacency" not in unit for unit in stored["glore_units"])
    restored = attach_shared(json.loads(json.dumps(stored)), lambda digest: shared[digest])
    assert json.dumps(restored) == snapshot  # same keys, same order, same values


def test_records_without_digests_are_left_whole() -> None:
    connectivity = {"stages": [], "glore_units": [{"unit": "u", "num_nodes": 2, "adjacency": [[1.0, 0.0], [0.0, 1.0]]}]}
    stored, shared = split_shared(connectivity)
    assert stored is connectivity and shared == {}


def test_cache_evicts_least_recently_used_within_its_bytes() -> None:
    cache = GraphTextCache(max_bytes=10)
    cache.put("a", "aaaa")
    cache.put("b", "bbbb")
    assert cache.get("a") == "aaaa"  # now b is the least recently used
    cache.put("c", "cccc")
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == ("aaaa", None, "cccc")
    cache.put("huge", "x" * 11)  # larger than the whole cache: not kept, nothing evicted
    assert cache.get("huge") is None and len(cache) == 2


# --- the store, over every backend ----------------------------------------------------


@pytest.mark.asyncio
async def test_a_graph_goes_to_the_backend_once_apart_and_is_read_back_everywhere(
    open_store: StoreFactory, glore_connectivity: list[dict[str, Any]]
) -> None:
    store = await open_store(**QUEUED)
    records = [new_record(c) for c in glore_connectivity]
    for rec in records:
        await store.put(rec)
    # Queued: read back whole from memory.
    for rec in records:
        assert (await store.get(rec.id)).connectivity == rec.connectivity
    await store.flush()

    # The backend holds each record without its matrices, and each matrix under its digest.
    matrices = {u["adjacency_digest"]: u["adjacency"] for rec in records for u in rec.connectivity["glore_units"]}
    assert len(matrices) == 2  # two units, one A_g each, shared by the four images
    for rec in records:
        row = await asyncio.to_thread(store.backend.get, rec.id)
        assert row is not None and row.connectivity is not None
        assert all("adjacency" not in unit for unit in json.loads(row.connectivity)["glore_units"])
    for digest, matrix in matrices.items():
        text = await asyncio.to_thread(store.backend.graph, digest)
        assert text is not None and json.loads(text) == matrix
    for rec in records:
        assert (await store.get(rec.id)).connectivity == rec.connectivity
    listed = [r async for r in store.list(model="glore")]
    assert [r.connectivity for r in listed] == [r.connectivity for r in sorted(records, key=lambda r: (r.created_at, r.id))]

    # Another process, with nothing cached, reads them from the backend.
    await store.close()
    reopened = await open_store(**QUEUED)
    for rec in records:
        assert (await reopened.get(rec.id)).connectivity == rec.connectivity


@pytest.mark.asyncio
async def test_the_graph_lands_with_the_first_record_even_after_the_cache_forgot_it(
    open_store: StoreFactory, glore_connectivity: list[dict[str, Any]]
) -> None:
    store = await open_store(**QUEUED)
    first = new_record(glore_connectivity[0])
    await store.put(first)
    store._graph_texts = GraphTextCache(0)  # every later lookup misses
    second = new_record(glore_connectivity[1])
    await store.put(second)
    await store.flush()
    for rec in (first, second):
        assert (await store.get(rec.id)).connectivity == rec.connectivity


@pytest.mark.asyncio
@pytest.mark.parametrize("unit_matrix", ["missing", None], ids=["no-adjacency-key", "adjacency-null"])
async def test_a_unit_without_its_matrix_is_stored_as_it_came(
    open_store: StoreFactory, glore_connectivity: list[dict[str, Any]], unit_matrix: Any
) -> None:
    # Say, a client that stored a ?connectivity=false response: digest, no matrix. It
    # must neither poison the shared graph nor break reading the full records.
    full = glore_connectivity[0]
    stripped = json.loads(json.dumps(full))
    for unit in stripped["glore_units"]:
        if unit_matrix == "missing":
            del unit["adjacency"]
        else:
            unit["adjacency"] = unit_matrix
    store = await open_store(**QUEUED)
    first, second = new_record(stripped), new_record(full)
    for rec in (first, second):
        await store.put(rec)
    for rec in (first, second):
        assert (await store.get(rec.id)).connectivity == rec.connectivity
    await store.flush()
    store._graph_texts = GraphTextCache(2**20)  # forget, so reads go to the backend
    for rec in (first, second):
        assert (await store.get(rec.id)).connectivity == rec.connectivity
    listed = {r.id: r.connectivity async for r in store.list()}
    assert listed == {first.id: first.connectivity, second.id: second.connectivity}
