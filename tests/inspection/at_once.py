"""Opening several backends at the same moment, as replicas or server processes that start together do."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from dgserve.inspection import InspectionBackend


def open_at_once(backends: Sequence[InspectionBackend]) -> list[BaseException]:
    """Open every backend from its own thread, released together; what each raised."""
    barrier = threading.Barrier(len(backends))
    errors: list[BaseException] = []

    def start(backend: InspectionBackend) -> None:
        barrier.wait()
        try:
            backend.open()
        except BaseException as exc:  # reported to the caller, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(b,)) for b in backends]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return errors
