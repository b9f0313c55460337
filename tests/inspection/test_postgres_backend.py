"""What is specific to the PostgreSQL backend: versioned migrations that replicas can
run at once, the layout (shared graphs once, compressed connectivity, byte-order ids),
and a location without the password.

The store's behaviour is the contract suite's (``test_store_contract*.py``), which runs
on PostgreSQL too. These tests use the session's server (conftest).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import psycopg
import pytest
from at_once import open_at_once
from postgres_server import free_port
from psycopg.conninfo import make_conninfo

from dgserve.inspection import InspectionRecord, InspectionStore, PostgreSQLBackend
from dgserve.inspection.backend import StoredRecord
from dgserve.inspection.postgres import SCHEMA_VERSION

pytestmark = pytest.mark.timeout(60)

T0_US = 1_735_732_800_000_000  # 2025-01-01 12:00 UTC


def row(id: str, connectivity: str = '{"glore_units":[{"adjacency_digest":"d1"}]}') -> StoredRecord:
    return StoredRecord(id, "m", 1, "classification", T0_US, '{"top1":"cat"}', connectivity)


def query(url: str, sql: str, *params: object) -> list[tuple[object, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql, params).fetchall()  # type: ignore[arg-type]


@pytest.fixture
def backend(postgres_schema_url: str) -> Iterator[PostgreSQLBackend]:
    backend = PostgreSQLBackend(postgres_schema_url)
    backend.open()
    yield backend
    backend.close()


def test_the_schema_is_versioned_and_migrating_again_changes_nothing(postgres_schema_url: str) -> None:
    for _ in range(2):
        backend = PostgreSQLBackend(postgres_schema_url)
        backend.open()
        backend.close()
        backend.close()  # idempotent
    assert query(postgres_schema_url, "SELECT component, version FROM dgserve_schema") == [
        ("inspections", SCHEMA_VERSION)
    ]
    sql = "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema() AND tablename = 'inspections'"
    indexes = {name for (name,) in query(postgres_schema_url, sql)}
    assert {"inspections_created", "inspections_model_created"} <= indexes
    # Listings compare ids in Python's (byte) order: the column must, whatever the database's default.
    collations = query(
        postgres_schema_url,
        "SELECT column_name, collation_name FROM information_schema.columns "
        "WHERE table_schema = current_schema() AND table_name = 'inspections' AND column_name IN ('id', 'model') "
        "ORDER BY column_name",
    )
    assert collations == [("id", "C"), ("model", "C")]


def test_replicas_starting_at_once_migrate_one_at_a_time(postgres_schema_url: str) -> None:
    backends = [PostgreSQLBackend(postgres_schema_url) for _ in range(6)]
    errors = open_at_once(backends)
    try:
        assert errors == []
        backends[0].write_batch([row("x")], {"d1": "[[1.0]]"})
        assert backends[-1].get("x") is not None
    finally:
        for backend in backends:
            backend.close()
    assert query(postgres_schema_url, "SELECT version FROM dgserve_schema") == [(SCHEMA_VERSION,)]


def test_a_newer_schema_is_refused(postgres_schema_url: str) -> None:
    backend = PostgreSQLBackend(postgres_schema_url)
    backend.open()
    backend.close()
    with psycopg.connect(postgres_schema_url) as conn:
        conn.execute("UPDATE dgserve_schema SET version = 99")
    with pytest.raises(RuntimeError, match=f"has inspection schema 99; this dgserve reads up to {SCHEMA_VERSION}"):
        PostgreSQLBackend(postgres_schema_url).open()


def test_a_graph_is_kept_once_and_connectivity_is_compressed(
    backend: PostgreSQLBackend, postgres_schema_url: str
) -> None:
    graph = "[[0.5,0.25],[0.125,1.0]]"
    backend.write_batch([row("a"), row("b")], {"d1": graph})
    backend.write_batch([row("c")], {"d1": graph})  # already stored: kept as it is
    # Another replica that has not seen it writes the same graph in the same moment.
    other = PostgreSQLBackend(postgres_schema_url)
    other.open()
    try:
        other.write_batch([row("d")], {"d1": graph})
    finally:
        other.close()
    assert query(postgres_schema_url, "SELECT digest FROM graphs") == [("d1",)]
    assert backend.graph("d1") == graph and backend.graph("nope") is None
    (blob,) = query(postgres_schema_url, "SELECT connectivity FROM inspections WHERE id = 'a'")[0]
    assert isinstance(blob, bytes) and blob[:2] == b"\x78\x01"  # zlib, level 1
    got = backend.get("a")
    assert got is not None and got.connectivity == row("a").connectivity
    assert backend.count() == 4 and backend.count(["a", "b", "zz"]) == 2


@pytest.mark.asyncio
async def test_ids_list_in_byte_order_under_a_database_that_sorts_otherwise(postgres_url: str) -> None:
    # An ICU en-US default collation puts "a" before "B"; Python (and so the store's
    # merge of queued and written records) puts "B" first.
    name = f"dgserve_test_icu_{uuid.uuid4().hex[:8]}"
    create = f"CREATE DATABASE {name} TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C'"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        try:
            conn.execute(create)
        except (psycopg.errors.FeatureNotSupported, psycopg.errors.InvalidParameterValue) as exc:
            pytest.skip(f"this PostgreSQL has no ICU collations: {exc}")
    url = make_conninfo(postgres_url, dbname=name)
    try:
        async with InspectionStore(PostgreSQLBackend(url), page_size=2) as store:
            at = datetime(2025, 1, 1, tzinfo=UTC)
            ids = ["a", "B", "b", "A", "_x", "0"]
            for i in ids:
                await store.put(InspectionRecord(i, "m", 1, "t", at, {}, {}))
            await store.flush()
            assert [r.id async for r in store.list(include_connectivity=False)] == sorted(ids)
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.mark.asyncio
async def test_the_password_is_in_neither_the_location_nor_the_error(postgres_url: str) -> None:
    closed = f"postgresql://postgres:s3cret@127.0.0.1:{free_port()}/postgres"  # nothing listens there
    backend = PostgreSQLBackend(closed)
    assert "s3cret" not in backend.location and "s3cret" not in repr(backend)
    with pytest.raises(psycopg.OperationalError) as info:
        await asyncio.to_thread(backend.open)
    assert "s3cret" not in str(info.value)
