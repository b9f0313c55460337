"""A store written before analysis existed gains it when it opens: its records get their
label, score and numbers, summaries count them, and exports read them from the narrow
table (SQLite schema 1 -> 4, PostgreSQL migration 1 -> 3)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import zlib
from contextlib import closing
from pathlib import Path

import psycopg
import pytest
from at_once import open_at_once

from dgserve.inspection import InspectionStore, PostgreSQLBackend, SQLiteBackend
from dgserve.inspection.backend import Filters
from dgserve.inspection.postgres import _MIGRATIONS

pytestmark = pytest.mark.timeout(60)

ADJACENCY = [[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.5, 0.0]]
CONNECTIVITY = {"stages": [{"stage": "layer1", "adjacency": ADJACENCY, "executed": [True, True, True]}]}
PREDICTION = {"predictions": [{"label": "cat", "score": 0.8}]}
OLD = [("r1", 1_700_000_000_000_000), ("r2", 1_700_000_100_000_000)]
SCHEMA_1 = """
CREATE TABLE inspections (id TEXT NOT NULL PRIMARY KEY, model TEXT NOT NULL, version INTEGER NOT NULL,
    task TEXT NOT NULL, created_at_us INTEGER NOT NULL, prediction TEXT NOT NULL, connectivity BLOB NOT NULL);
PRAGMA user_version = 1;
"""


async def check(store: InspectionStore) -> None:
    async with store:
        summary = await store.summary(Filters(model="m"), group_by="label")
        assert [(g["key"], g["count"]) for g in summary["groups"]] == [("cat", 2)]
        stage = summary["groups"][0]["stages"][0]
        assert stage["adjacency_open_frequency"] == [[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
        assert stage["adjacency_patterns"]["distinct"] == 1
        # The narrow table an export reads is filled too, with the numbers just backfilled.
        pages = store.analysis_pages(Filters(model="m"), page_size=1, include_connectivity=False)
        rows = [row for page in pages for row in page]
        assert [(r.id, r.created_at_us, r.label) for r in rows] == [(i, t, "cat") for i, t in OLD]
        assert all(r.features is not None and r.layout is not None for r in rows)


def old_rows() -> list[tuple[str, int, str, bytes]]:
    blob = zlib.compress(json.dumps(CONNECTIVITY).encode())
    return [(i, t, json.dumps(PREDICTION), blob) for i, t in OLD]


@pytest.mark.asyncio
async def test_a_schema_1_sqlite_file_gains_its_records_numbers(tmp_path: Path) -> None:
    path = tmp_path / "inspections.db"
    with closing(sqlite3.connect(path)) as conn:
        conn.executescript(SCHEMA_1)
        conn.executemany("INSERT INTO inspections VALUES (?, 'm', 1, 'classification', ?, ?, ?)", old_rows())
        conn.commit()
    await check(InspectionStore(SQLiteBackend(path)))


def test_server_processes_opening_a_schema_1_file_at_once_migrate_it_once(tmp_path: Path) -> None:
    """``DGSERVE_SERVER_PROCESSES`` opens one file from several processes at the same moment:
    the version is read under the write lock, so only the first migrates (schema 3's
    ``ALTER TABLE`` would fail the second time)."""
    path = tmp_path / "inspections.db"
    with closing(sqlite3.connect(path)) as conn:
        conn.executescript(SCHEMA_1)
        conn.executemany("INSERT INTO inspections VALUES (?, 'm', 1, 'classification', ?, ?, ?)", old_rows())
        conn.commit()
    backends = [SQLiteBackend(path) for _ in range(6)]
    errors = open_at_once(backends)
    for backend in backends:
        backend.close()
    assert errors == []
    asyncio.run(check(InspectionStore(SQLiteBackend(path))))


@pytest.mark.asyncio
async def test_a_migration_1_postgresql_schema_gains_its_records_numbers(postgres_schema_url: str) -> None:
    with psycopg.connect(postgres_schema_url) as conn:
        conn.execute(_MIGRATIONS[0])
        conn.execute("CREATE TABLE dgserve_schema (component text PRIMARY KEY, version integer NOT NULL)")
        conn.execute("INSERT INTO dgserve_schema VALUES ('inspections', 1)")
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO inspections VALUES (%s, 'm', 1, 'classification', %s, %s, %s)", old_rows())
    await check(InspectionStore(PostgreSQLBackend(postgres_schema_url)))
