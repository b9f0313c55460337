"""Waiting for a request's work while watching for its client to leave.

uvicorn does not cancel a handler whose client disconnected: without a watch, the
request's images stay queued and are computed for nobody. ``until_disconnect`` listens
for the ``http.disconnect`` message while the work runs and cancels the work when it
comes, which removes the request's images from the batcher's queue before any compute
(counted as ``cancelled`` in the rejection metrics). The route then answers
``CLIENT_CLOSED_REQUEST``, which only the logs and metrics ever see. A ``receive`` that
fails is not a disconnect: it is logged, and the work goes on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request

__all__ = ["CLIENT_CLOSED_REQUEST", "until_disconnect"]

T = TypeVar("T")

log = logging.getLogger(__name__)

CLIENT_CLOSED_REQUEST = 499  # nginx's convention; only ever seen in logs and metrics


async def until_disconnect(request: Request, work: Awaitable[T]) -> T | None:
    """``work``'s result, or None (``work`` cancelled) if the client disconnects first.

    Call it once the body has been read: from then on the only message left is the disconnect.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        if watcher.exception() is not None:
            # The transport could not say (a proxy's receive failed, as Ray Serve's can): that
            # is not the client leaving, so the work goes on and its answer is tried.
            log.warning("watching for the client's disconnect failed; the request goes on",
                        exc_info=watcher.exception())  # fmt: skip
            return await task
        task.cancel()
        await asyncio.wait((task,))
        return None
    finally:
        watcher.cancel()
        task.cancel()


async def _disconnected(request: Request) -> None:
    # The body has been read, so the next message can only be the disconnect (which
    # servers also send once the response is complete; by then nobody is waiting).
    while (await request.receive())["type"] != "http.disconnect":
        pass
