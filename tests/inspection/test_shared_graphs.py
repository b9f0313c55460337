"""Shared graphs: GloRe's A_g is stored once per digest, and every read puts it back."""

from __future__ import annotations

import json
import sqlite3
import zlib
from collections.abc import Awaitable, Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
import torch

from dgserve.inspection import InspectionRecord, SQLiteInspectionStore
from dgserve.inspection.graphs import GraphTextCache, attach_shared, split_shared
from dgserve.models.connectivity import collect_connectivity
from dgserve.models.registry import create_model

pytestmark = pytest.mark.timeout(60)

# The conftest's open_store fixture: starts a store on tmp_path with these kwargs.
StoreFactory = Callable[..., Awaitable[SQLiteInspectionStore]]
QUEUED = {"flush_interval_s": 3600.0}  # records stay queued until flushed


@pytest.fixture(scope="module")
def glore_connectivity() -> list[dict[str, Any]]:
    """What the server records for four images through a real GloRe network."""
    torch.manual_seed(0)
    model = create_model("glore_resnet18_slim", num_classes=4).eval()
    with torch.no_grad():
        for unit in model.modules():
            if hasattr(unit, "node_conv"):
                unit.node_conv.weight.normal_()  # identity-at-init zeros would hide a mix-up
        model(torch.randn(4, 3, 64, 64))
    return [r.to_dict() for r in collect_connectivity(model, 4)]


def new_record(connectivity: dict[str, Any], **kw: Any) -> InspectionRecord:
    return InspectionRecord.new(
        model="glore", version=1, task="classification", prediction={"top1": "x"}, connectivity=connectivity, **kw
    )


def on_disk(path: Path) -> tuple[int, list[dict[str, Any]]]:
    with closing(sqlite3.connect(path)) as conn:
        (graphs,) = conn.execute("SELECT COUNT(*) FROM graphs").fetchone()
        blobs = [row[0] for row in conn.execute("SELECT connectivity FROM inspections")]
    return int(graphs), [json.loads(zlib.decompress(blob)) for blob in blobs]


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


# --- the SQLite store -------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_graph_is_stored_once_and_read_back_everywhere(
    open_store: StoreFactory, glore_connectivity: list[dict[str, Any]], tmp_path: Path
) -> None:
    store = await open_store(**QUEUED)
    records = [new_record(c) for c in glore_connectivity]
    for rec in records:
        await store.put(rec)
    # Queued: read back whole from memory.
    for rec in records:
        assert (await store.get(rec.id)).connectivity == rec.connectivity
    await store.flush()

    graphs, stored = on_disk(tmp_path / "inspections.db")
    assert graphs == 2  # two units, one A_g each, shared by the four images
    assert all("adjacency" not in unit for c in stored for unit in c["glore_units"])
    for rec in records:
        assert (await store.get(rec.id)).connectivity == rec.connectivity
    listed = [r async for r in store.list(model="glore")]
    assert [r.connectivity for r in listed] == [r.connectivity for r in sorted(records, key=lambda r: (r.created_at, r.id))]

    # Another process, with nothing cached, reads them from the file.
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
async def test_a_schema_1_file_opens_and_its_inline_graphs_still_read(
    tmp_path: Path, glore_connectivity: list[dict[str, Any]]
) -> None:
    path = tmp_path / "inspections.db"
    old = new_record(glore_connectivity[0])
    with closing(sqlite3.connect(path)) as conn:
        conn.executescript(
            """
            CREATE TABLE inspections (id TEXT NOT NULL PRIMARY KEY, model TEXT NOT NULL, version INTEGER NOT NULL,
                task TEXT NOT NULL, created_at_us INTEGER NOT NULL, prediction TEXT NOT NULL, connectivity BLOB NOT NULL);
            PRAGMA user_version = 1;
            """
        )
        conn.execute(
            "INSERT INTO inspections VALUES (?, 'glore', 1, 'classification', 0, '{}', ?)",
            (old.id, zlib.compress(json.dumps(old.connectivity).encode())),
        )
        conn.commit()
    async with SQLiteInspectionStore(path) as store:
        assert (await store.get(old.id)).connectivity == old.connectivity
        new = new_record(glore_connectivity[1])
        await store.put(new)
        await store.flush()
        assert (await store.get(new.id)).connectivity == new.connectivity
    with closing(sqlite3.connect(path)) as conn:
        (version,) = conn.execute("PRAGMA user_version").fetchone()
    assert version == 2


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
    store._graph_texts = GraphTextCache(2**20)  # forget, so reads go to the file
    for rec in (first, second):
        assert (await store.get(rec.id)).connectivity == rec.connectivity
    listed = {r.id: r.connectivity async for r in store.list()}
    assert listed == {first.id: first.connectivity, second.id: second.connectivity}
