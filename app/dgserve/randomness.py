"""Random ids for the request path, from the OS's generator, without giving up the GIL.

``os.urandom`` (behind ``uuid.uuid4`` and ``secrets``) releases the GIL around its
``getrandom`` call. On the event loop, that hands the interpreter to whichever thread
waits for it, typically a model thread in a Python-heavy forward pass, and the loop
then waits for up to the switch interval (5 ms) to get it back: twice per request,
for its request id and its inspection id. A py-spy profile of a loaded server put
14 % of the event-loop thread's samples in ``uuid4``, which itself takes 2 µs.

So ids draw their bytes from a buffer filled by ``os.urandom`` 4 KiB at a time: the
same cryptographic source (ids handed to clients must not be guessable), one GIL
release per 256 ids. A child process made by ``fork`` starts with an empty buffer,
so no two processes hand out the same bytes.
"""

from __future__ import annotations

import os
import threading

__all__ = ["random_bits", "request_id"]

_REFILL_BYTES = 4096


class _Pool:
    def __init__(self) -> None:
        self._lock = threading.Lock()  # ids are made on the loop and in worker threads
        self._buffer = b""
        self._used = 0

    def take(self, n: int) -> bytes:
        with self._lock:
            if self._used + n > len(self._buffer):
                self._buffer, self._used = os.urandom(max(_REFILL_BYTES, n)), 0
            start, self._used = self._used, self._used + n
            return self._buffer[start : self._used]

    def forget(self) -> None:
        self._lock = threading.Lock()  # a lock held by another thread at fork stays held in the child
        self._buffer, self._used = b"", 0


_POOL = _Pool()
os.register_at_fork(after_in_child=_POOL.forget)


def random_bits(bits: int) -> int:
    """A non-negative integer of ``bits`` random bits, like ``secrets.randbits``."""
    value = int.from_bytes(_POOL.take((bits + 7) // 8), "big")
    return value >> (-bits % 8)


def request_id() -> str:
    """A fresh request id: a random (version 4) UUID's 32 hex digits, as ``uuid.uuid4().hex``."""
    # The version and variant bits set here, as uuid.UUID(version=4) sets them, at a third
    # of its cost (0.65 against about 2 us): a refusal under overload makes one of these.
    raw = bytearray(_POOL.take(16))
    raw[6] = raw[6] & 0x0F | 0x40
    raw[8] = raw[8] & 0x3F | 0x80
    return raw.hex()
