"""Fixtures shared by the inspection-store tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest_asyncio

from dgserve.inspection import SQLiteInspectionStore

StoreFactory = Callable[..., Awaitable[SQLiteInspectionStore]]


@pytest_asyncio.fixture
async def open_store(tmp_path: Path) -> AsyncIterator[StoreFactory]:
    """Starts stores on tmp_path/inspections.db and closes every one after the test."""
    stores: list[SQLiteInspectionStore] = []

    async def factory(**kwargs: Any) -> SQLiteInspectionStore:
        store = SQLiteInspectionStore(tmp_path / "inspections.db", **kwargs)
        stores.append(store)
        await store.start()
        return store

    yield factory
    for store in stores:
        await store.close()
