"""Whether a process runs, for the tests that check no child outlives its server."""

from __future__ import annotations

import os


def pid_running(pid: int) -> bool:
    """True while any thread of ``pid`` runs. A zombie (exited, not yet reaped by its parent)
    does not, once all its threads are gone: a killed multi-threaded process shows its main
    thread as a zombie while the others are still exiting, and still holds its files."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().split(")")[-1].split()
    except FileNotFoundError:
        return False
    state, threads = fields[0], int(fields[17])  # stat fields 3 and 20
    return state != "Z" or threads > 1
