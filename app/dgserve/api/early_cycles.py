"""What uvicorn sees as the cycle of a request the protocol answers itself (``api/connections.py``).

uvicorn's protocol reads and writes a few attributes of its ``RequestResponseCycle``
whatever ran it: ``response_complete`` (is a pipelined request to wait, are body bytes
to be kept), ``body`` and ``more_body`` (what it reads), ``disconnected``,
``message_event`` and ``keep_alive`` (a lost connection, a shutdown). A request answered
at its headers, by the admission gate (``api/admission.py``), has no ASGI cycle: these
stand in for one, without an ``asyncio.Event`` per request for nobody to wait on.
"""

from __future__ import annotations

__all__ = ["Answered", "Held"]


class _Unwatched:
    """The ``message_event`` of an answered request: nobody waits on it, so setting it does nothing."""

    def set(self) -> None:
        pass


class Answered:
    """Stands in for the cycle of a request answered at its headers (no ASGI cycle ran):
    uvicorn reads ``response_complete`` and, when the connection is lost, sets
    ``disconnected`` and ``message_event``, which nobody waits on here."""

    response_complete = True
    message_event = _Unwatched()  # not an asyncio.Event made per refusal for nobody

    def __init__(self) -> None:
        self.disconnected = False
        self.keep_alive = True


class Held(Answered):
    """Stands in for the cycle of a refusal held back (``connections.REFUSAL_INTERVAL_S``) as for an app
    that has not answered yet: uvicorn queues a pipelined request behind it and, on
    shutdown, clears ``keep_alive``; the body it reads for it is thrown away."""

    response_started = False  # a body timeout meanwhile answers 408 instead (``connections.py``)
    body = property(lambda self: b"", lambda self, value: None)  # uvicorn's on_body appends to it

    def __init__(self, keep_alive: bool) -> None:
        super().__init__()
        self.keep_alive = keep_alive
        self.response_complete = False
        self.more_body = True
