"""Closing a listening socket without resetting a connection the kernel completed.

The kernel completes TCP handshakes on its own: a client's ``connect()`` returns as soon
as the listener's SYN-ACK arrives, before the server has accepted anything. Closing the
listener then resets every connection still in its accept queue, and every handshake
still in flight. Accepting until ``EAGAIN`` and then closing leaves a window: a
handshake that completes between the last ``accept`` and the close is reset, and its
client, which believed it was connected, loses its request. Under the drain, where every
answer ends its connection and clients reconnect at once, the window was hit about once
in five closes with 16 clients in one run of a ``/tmp`` reproduction (21 resets in 100
closes; how often depends on the load).

So the listener first stops answering handshakes. A classic BPF filter on it drops every
segment that opens one (SYN without ACK), and lets the rest through, the ACKs that finish
handshakes already answered among them. A client whose SYN is dropped retries a second
later and then meets the closed port, a refusal, which it can tell from a lost request.
What the kernel completes meanwhile is accepted until none has come for ``SETTLE_S``,
and only then is the listener closed.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import socket
import struct
import sys
from collections.abc import Callable

__all__ = ["SETTLE_CAP_S", "SETTLE_S", "close_listener", "refuse_handshakes"]

log = logging.getLogger(__name__)

# A handshake answered before the filter finishes within one round trip: loopback and a
# LAN take well under this; a client further away than SETTLE_S may still be reset.
SETTLE_S = 0.1
SETTLE_CAP_S = 2.0  # a client that keeps finishing handshakes cannot hold the close open
_POLL_S = 0.01

_SO_ATTACH_FILTER = 26  # Linux's SO_ATTACH_FILTER; Python's socket module does not name it
# Runs where TCP filters a segment for its socket (tcp_filter), with the packet's data at
# the TCP header, so byte 13 holds the flags, for IPv4 and IPv6 alike.
_DROP_SYN = (
    (0x30, 0, 0, 13),  # ldb [13]: the flags
    (0x54, 0, 0, 0x12),  # and #(SYN | ACK)
    (0x15, 0, 1, 0x02),  # jeq #SYN: drop, else pass
    (0x06, 0, 0, 0),  # ret #0: drop
    (0x06, 0, 0, 0xFFFFFFFF),  # ret #-1: the whole segment
)


def refuse_handshakes(sock: socket.socket) -> bool:
    """Make a listening TCP socket drop new handshakes; whether that could be done here.

    The kernel copies the program, so the buffer need only outlive the call."""
    if not sys.platform.startswith("linux"):  # the option's number is Linux's own
        return False
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
        return False
    program = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *op) for op in _DROP_SYN))
    fprog = struct.pack("HP", len(_DROP_SYN), ctypes.addressof(program))
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)
    except OSError as exc:  # a kernel built without socket filters
        log.warning("cannot stop the listener's handshakes before closing it (%s); "
                    "a connection completing as it closes may be reset", exc)  # fmt: skip
        return False
    return True


def _accept_all(listener: socket.socket, take: Callable[[socket.socket], None]) -> int:
    taken = 0
    while True:
        try:
            connection, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return taken
        connection.setblocking(False)
        take(connection)
        taken += 1


async def close_listener(listener: socket.socket, take: Callable[[socket.socket], None]) -> int:
    """Stop ``listener``'s handshakes, hand every connection it completed to ``take``,
    then close it; how many were taken. ``listener`` is this function's to close."""
    loop = asyncio.get_running_loop()
    with listener:
        listener.setblocking(False)
        stopped = refuse_handshakes(listener)
        taken = _accept_all(listener, take)
        if stopped:
            cap = loop.time() + SETTLE_CAP_S
            quiet = loop.time() + SETTLE_S
            while (now := loop.time()) < quiet and now < cap:
                await asyncio.sleep(_POLL_S)
                if more := _accept_all(listener, take):
                    taken += more
                    quiet = loop.time() + SETTLE_S
    return taken
