"""The SQLite backend: the file's format and schema versions, WAL, and what a record
costs on disk. What every store keeps is in the contract tests (``test_store_*``)."""

from __future__ import annotations

import json
import sqlite3
import zlib
from collections.abc import Awaitable, Callable
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dgserve.inspection import InspectionRecord, InspectionStore, SQLiteBackend, SQLiteInspectionStore

pytestmark = pytest.mark.timeout(30)

Starter = Callable[[SQLiteInspectionStore], Awaitable[SQLiteInspectionStore]]  # the conftest's `started`

T0 = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)


def compact(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def glore_record(connectivity: dict[str, Any]) -> InspectionRecord:
    return InspectionRecord.new(
        model="glore", version=1, task="classification", prediction={"top1": "x"}, connectivity=connectivity
    )


@pytest.mark.asyncio
async def test_the_file_is_in_wal_mode_with_the_documented_format(tmp_path: Path, started: Starter) -> None:
    path = tmp_path / "deep" / "er" / "inspections.db"  # directories are created
    store = await started(SQLiteInspectionStore(path, max_records=10))
    assert isinstance(store, InspectionStore) and isinstance(store.backend, SQLiteBackend)
    assert (store.path, store.max_records, store.max_age_s) == (path, 10, None)
    connectivity = {"stages": [{"stage": "layer1", "adjacency": [[0.25] * 8 for _ in range(8)]}]}
    rec = InspectionRecord.new(
        model="m", version=3, task="classification", prediction={"top1": "cat"}, connectivity=connectivity,
        created_at=T0,
    )
    await store.put(rec)
    await store.flush()
    with closing(sqlite3.connect(path)) as conn:
        (mode,) = conn.execute("PRAGMA journal_mode").fetchone()
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        row = conn.execute("SELECT * FROM inspections WHERE id = ?", (rec.id,)).fetchone()
        indexes = {r[1] for r in conn.execute("PRAGMA index_list(inspections)")}
    assert mode == "wal"
    assert version == 4
    # Byte for byte what earlier releases wrote, so files written by either read in both;
    # schema 3's analysis columns come after (tags, label, score, layout, features).
    assert row[7:10] == ("{}", "", None) and row[10] is not None
    assert row[11] == np.full(64, 0.25, np.float32).tobytes()
    assert row[:7] == (rec.id, "m", 3, "classification", int(T0.timestamp()) * 1_000_000, '{"top1":"cat"}',
                   zlib.compress(compact(connectivity), 1))
    assert len(row[6]) < len(compact(connectivity))
    assert {"inspections_created", "inspections_model_created"} <= indexes


@pytest.mark.asyncio
async def test_a_graph_is_stored_once_and_records_without_it(
    tmp_path: Path, started: Starter, glore_connectivity: list[dict[str, Any]]
) -> None:
    store = await started(SQLiteInspectionStore(tmp_path / "inspections.db", flush_interval_s=3600.0))
    records = [glore_record(c) for c in glore_connectivity]
    await store.put(records[0])
    await store.flush()  # the graphs land with the first record, and are not written again
    for rec in records[1:]:
        await store.put(rec)
    await store.flush()
    units = [u for rec in records for u in rec.connectivity["glore_units"]]
    with closing(sqlite3.connect(store.path)) as conn:
        graphs = dict(conn.execute("SELECT digest, body FROM graphs").fetchall())
        blobs = [row[0] for row in conn.execute("SELECT connectivity FROM inspections")]
    assert graphs == {u["adjacency_digest"]: zlib.compress(compact(u["adjacency"]), 1) for u in units}
    assert len(graphs) == 2  # two units, one A_g each, shared by the four images
    stored = [json.loads(zlib.decompress(blob)) for blob in blobs]
    assert all("adjacency" not in unit and unit["adjacency_shared"] for c in stored for unit in c["glore_units"])
    assert max(len(blob) for blob in blobs) < min(len(body) for body in graphs.values())


@pytest.mark.asyncio
async def test_a_file_from_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "inspections.db"
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA user_version = 99")
    store = SQLiteInspectionStore(path)
    with pytest.raises(RuntimeError, match="schema 99"):
        await store.start()
    await store.close()


def test_a_file_on_which_sqlite_refuses_wal_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # What a network mount does: asked for WAL, SQLite keeps the journal mode it had.
    real_connect = sqlite3.connect
    opened: list[NoWal] = []

    class NoWal:
        def __init__(self, conn: sqlite3.Connection) -> None:
            self.conn = conn
            self.closed = False

        def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
            return self.conn.execute("PRAGMA journal_mode" if sql.startswith("PRAGMA journal_mode") else sql, *args)

        def close(self) -> None:
            self.closed = True
            self.conn.close()

    def connect(*args: Any, **kwargs: Any) -> NoWal:
        opened.append(NoWal(real_connect(*args, **kwargs)))
        return opened[-1]

    monkeypatch.setattr(sqlite3, "connect", connect)
    backend = SQLiteBackend(tmp_path / "inspections.db")
    with pytest.raises(RuntimeError, match="refused WAL mode"):
        backend.open()
    assert opened and all(conn.closed for conn in opened)  # nothing left open


@pytest.mark.asyncio
async def test_a_schema_1_file_opens_and_its_inline_graphs_still_read(
    tmp_path: Path, glore_connectivity: list[dict[str, Any]]
) -> None:
    path = tmp_path / "inspections.db"
    old = glore_record(glore_connectivity[0])
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
        new = glore_record(glore_connectivity[1])
        await store.put(new)
        await store.flush()
        assert (await store.get(new.id)).connectivity == new.connectivity
    with closing(sqlite3.connect(path)) as conn:
        (version,) = conn.execute("PRAGMA user_version").fetchone()
    assert version == 4
