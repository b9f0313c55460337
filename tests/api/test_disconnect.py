"""``until_disconnect`` (``api/disconnect.py``) alone: the work's result, None when the client
leaves first (the work cancelled), and the work's result when the watch itself fails."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from starlette.requests import Request

from dgserve.api.disconnect import until_disconnect

pytestmark = pytest.mark.asyncio(loop_scope="session")


def request_with(receive: Any) -> Request:
    return Request({"type": "http", "method": "POST", "path": "/", "headers": []}, receive)


async def test_the_work_wins_while_the_client_stays() -> None:
    async def stays() -> dict[str, Any]:
        await asyncio.Event().wait()
        raise AssertionError("never")

    async def work() -> str:
        return "answer"

    assert await until_disconnect(request_with(stays), work()) == "answer"


async def test_a_disconnect_cancels_the_work() -> None:
    leave, cancelled = asyncio.Event(), asyncio.Event()

    async def leaves() -> dict[str, Any]:
        await leave.wait()
        return {"type": "http.disconnect"}

    async def work() -> str:
        try:
            leave.set()
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "never"

    assert await until_disconnect(request_with(leaves), work()) is None
    assert cancelled.is_set()


async def test_a_failing_receive_is_not_a_disconnect(caplog: pytest.LogCaptureFixture) -> None:
    async def fails() -> dict[str, Any]:
        raise RuntimeError("the proxy's receive broke")

    async def work() -> str:
        await asyncio.sleep(0.05)
        return "answer"

    with caplog.at_level(logging.WARNING, logger="dgserve.api.disconnect"):
        assert await until_disconnect(request_with(fails), work()) == "answer"
    assert "the request goes on" in caplog.text and "the proxy's receive broke" in caplog.text
