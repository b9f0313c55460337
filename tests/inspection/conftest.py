"""Fixtures shared by the inspection-store tests.

``BACKENDS`` lists every backend the contract tests run against (``open_store`` and
``make_backend`` are parametrized over it): a name -> a function that, given the
test's request (for the fixtures it needs), returns a function that makes an unopened
backend on this test's own, initially empty storage. Called again in the same test
that must give a backend on the same storage, so restarts can be tested. Adding a
backend to the contract suite is one entry here.

PostgreSQL (``postgres_server.py``): ``postgres_url`` is the session's server, the one
``DGSERVE_TEST_POSTGRES_URL`` names or one started here; each test gets a fresh schema
in it (``postgres_schema_url``). ``postgres_server`` is a server of the test's own, to
stop and start. Without PostgreSQL those tests fail in CI and skip elsewhere.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, TypeVar

import psycopg
import pytest
import pytest_asyncio
import torch

from dgserve.inspection import InspectionBackend, InspectionStore, PostgreSQLBackend, SQLiteBackend
from dgserve.models.connectivity import collect_connectivity
from dgserve.models.registry import create_model

# The helpers beside this file are a module, not a package (as tests/benchmarks does).
sys.path.insert(0, str(Path(__file__).parent))
from postgres_server import (  # noqa: E402
    ENV,
    PostgresServer,
    create_schema,
    drop_schema,
    find_bin_dir,
    unavailable,
    with_schema,
)

BackendFactory = Callable[[], InspectionBackend]


def _sqlite(request: pytest.FixtureRequest) -> BackendFactory:
    path = request.getfixturevalue("tmp_path") / "inspections.db"
    return lambda: SQLiteBackend(path)


def _postgresql(request: pytest.FixtureRequest) -> BackendFactory:
    url = request.getfixturevalue("postgres_schema_url")
    return lambda: PostgreSQLBackend(url)


BACKENDS: dict[str, Callable[[pytest.FixtureRequest], BackendFactory]] = {"sqlite": _sqlite, "postgresql": _postgresql}

S = TypeVar("S", bound=InspectionStore)


class Starter(Protocol):
    def __call__(self, store: S, /) -> Awaitable[S]: ...


class StoreFactory(Protocol):
    def __call__(self, backend: InspectionBackend | None = None, /, **options: Any) -> Awaitable[InspectionStore]: ...


@pytest.fixture(params=sorted(BACKENDS))
def make_backend(request: pytest.FixtureRequest) -> BackendFactory:
    """A new, unopened backend on this test's storage, for each backend in ``BACKENDS``."""
    return BACKENDS[request.param](request)


# --- PostgreSQL -------------------------------------------------------------------------


def _started_server() -> PostgresServer:
    bin_dir = find_bin_dir()
    if bin_dir is None:
        unavailable(f"{ENV} is not set and no PostgreSQL binaries are installed (apt-get install postgresql)")
    server = PostgresServer(bin_dir)
    try:
        server.init()
        server.start()
    except Exception as exc:
        server.close()
        unavailable(f"could not start PostgreSQL from {bin_dir}: {exc}")
    return server


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """The session's PostgreSQL: ``DGSERVE_TEST_POSTGRES_URL``, else one started for it."""
    url = os.environ.get(ENV)
    if url:
        try:
            psycopg.connect(url, connect_timeout=10).close()
        except psycopg.Error as exc:
            unavailable(f"{ENV} names a server that does not answer: {exc}")
        yield url
        return
    server = _started_server()
    try:
        yield server.url
    finally:
        server.close()


@pytest.fixture
def postgres_schema_url(postgres_url: str) -> Iterator[str]:
    """A URL whose tables go to a fresh schema of the session's server, dropped after the test."""
    schema = create_schema(postgres_url)
    yield with_schema(postgres_url, schema)
    drop_schema(postgres_url, schema)


@pytest.fixture
def postgres_server() -> Iterator[PostgresServer]:
    """A running PostgreSQL of this test's own, which it may stop and start."""
    server = _started_server()
    try:
        yield server
    finally:
        server.close()


@pytest_asyncio.fixture
async def started() -> AsyncIterator[Starter]:
    """Starts a store, and closes every store it started after the test."""
    stores: list[InspectionStore] = []

    async def start(store: S) -> S:
        stores.append(store)
        await store.start()
        return store

    yield start
    for store in stores:
        await store.close()


@pytest.fixture
def open_store(make_backend: Callable[[], InspectionBackend], started: Starter) -> StoreFactory:
    """Starts an ``InspectionStore`` with these options on ``backend`` (by default a new
    one from ``make_backend``) and closes it after the test."""

    def factory(backend: InspectionBackend | None = None, /, **options: Any) -> Awaitable[InspectionStore]:
        return started(InspectionStore(backend or make_backend(), **options))

    return factory


@pytest.fixture(scope="session")
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
