"""The server processes' metrics sockets (``api/siblings.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dgserve.api.siblings import Siblings


@pytest.mark.asyncio
async def test_a_scrape_reads_every_sibling_that_answers(tmp_path: Path) -> None:
    first, second = Siblings(tmp_path, 0, 3), Siblings(tmp_path, 1, 3)  # the third never started
    servers = [await first.serve(lambda: b"first\n"), await second.serve(lambda: b"second\n")]
    try:
        assert await first.gather(b"own\n") == [b"own\n", b"second\n"]
        assert await second.gather(b"own\n") == [b"own\n", b"first\n"]
    finally:
        for server in servers:
            server.close()
            await server.wait_closed()
    assert await first.gather(b"own\n") == [b"own\n"]  # gone: left out, not an error
