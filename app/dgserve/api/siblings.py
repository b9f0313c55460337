"""Where the server processes on one port find each other (``DGSERVE_SERVER_PROCESSES``).

Each has a Unix socket in the supervisor's runtime directory, on which it answers with
its metrics exposition; a process answering a scrape reads its siblings' there and
merges them (``metrics/merge.py``). Once its models are loaded, just before it listens,
a process also leaves a marker file (``serving_path``), which it never removes: that is
how the supervisor tells a process that died starting from one that died serving
(``api/processes.py``). The socket would not do: it exists from the app's start, before
the models load, and Python 3.13's asyncio removes it when the server closes. Only
asyncio here: the supervisor imports it too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Siblings", "serving_path", "socket_path"]

log = logging.getLogger(__name__)

# A sibling answers from its event loop; a busy one still answers within milliseconds.
_ANSWER_S = 2.0


def socket_path(directory: Path, index: int) -> Path:
    return directory / f"metrics-{index}.sock"


def serving_path(directory: Path, index: int) -> Path:
    return directory / f"serving-{index}"


@dataclass(frozen=True, slots=True)
class Siblings:
    """This process's place among ``count`` server processes sharing ``directory``.

    A process that is one of several listens only once its models have loaded, so no
    request reaches one that would answer ``not_ready`` while a sibling serves.
    """

    directory: Path
    index: int
    count: int

    def path(self, index: int) -> Path:
        return socket_path(self.directory, index)

    def mark_serving(self) -> None:
        """Say to the supervisor that this process has loaded its models and now listens."""
        serving_path(self.directory, self.index).touch()

    async def serve(self, render: Callable[[], bytes]) -> asyncio.AbstractServer:
        """Answer each connection on this process's socket with ``render()``, then close it."""

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                writer.write(render())
                await writer.drain()
            except Exception:  # a sibling that gave up waiting; its scrape goes on without us
                log.debug("metrics: a sibling's read ended early", exc_info=True)
            finally:
                writer.close()

        # asyncio replaces a socket file left by a process this one replaces.
        return await asyncio.start_unix_server(answer, path=str(self.path(self.index)))

    async def gather(self, own: bytes) -> list[bytes]:
        """``own`` and the exposition of every sibling that answers in time."""
        others = [i for i in range(self.count) if i != self.index]
        answers = await asyncio.gather(*(self._read(self.path(i)) for i in others))
        return [own, *(a for a in answers if a is not None)]

    async def _read(self, path: Path) -> bytes | None:
        try:
            async with asyncio.timeout(_ANSWER_S):
                reader, writer = await asyncio.open_unix_connection(str(path))
                try:
                    return await reader.read()
                finally:
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
        except (OSError, TimeoutError) as exc:
            log.debug("metrics: %s did not answer (%s); left out of this scrape", path.name, exc)
            return None
