"""Fixtures shared by the inspection-store tests.

``BACKENDS`` lists every backend the contract tests run against (``open_store`` and
``make_backend`` are parametrized over it): a name -> a function that makes an
unopened backend on this test's own, initially empty storage. Called again in the
same test it must give a backend on the same storage, so restarts can be tested.
Adding a backend to the contract suite is one entry here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest
import pytest_asyncio
import torch

from dgserve.inspection import InspectionBackend, InspectionStore, SQLiteBackend
from dgserve.models.connectivity import collect_connectivity
from dgserve.models.registry import create_model

BACKENDS: dict[str, Callable[[Path], InspectionBackend]] = {
    "sqlite": lambda tmp_path: SQLiteBackend(tmp_path / "inspections.db"),
}

S = TypeVar("S", bound=InspectionStore)


class Starter(Protocol):
    def __call__(self, store: S, /) -> Awaitable[S]: ...


class StoreFactory(Protocol):
    def __call__(self, backend: InspectionBackend | None = None, /, **options: Any) -> Awaitable[InspectionStore]: ...


@pytest.fixture(params=sorted(BACKENDS))
def make_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], InspectionBackend]:
    """A new, unopened backend on this test's storage, for each backend in ``BACKENDS``."""
    factory = BACKENDS[request.param]
    return lambda: factory(tmp_path)


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
