"""An inspection id handed to a client survives ``kill -9`` of the server, on every backend.

A real ``dgserve serve`` answers 200 classify requests from 16 clients at once (so answers
share commits), is killed with SIGKILL right after the last answer, and is started
again on the same store: every one of the 200 ids reads back. That is the default,
``DGSERVE_INSPECTION_DURABILITY=sync``: each answer waits for its record's commit. It
runs with one server process and with two (``DGSERVE_SERVER_PROCESSES``, whose default
starts two on a machine with two cores), killed all at once.
"""

from __future__ import annotations

import io
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "api"))
from server_process import ServerProcess  # noqa: E402

from dgserve.data.scenes import render_classification

REQUESTS = 200
CLIENTS = 16
WARM = 48


def _sqlite(request: pytest.FixtureRequest) -> str:
    return f"sqlite:///{request.getfixturevalue('tmp_path') / 'inspections.db'}"


def _postgresql(request: pytest.FixtureRequest) -> str:
    url: str = request.getfixturevalue("postgres_schema_url")
    return url


STORES: dict[str, Callable[[pytest.FixtureRequest], str]] = {"sqlite": _sqlite, "postgresql": _postgresql}


def _wait_until_every_process_listens(server: ServerProcess, processes: int, timeout_s: float = 120.0) -> None:
    """/readyz answers once one process serves; the others listen once their models load."""
    deadline = time.monotonic() + timeout_s
    while server.listeners() < processes:
        assert time.monotonic() < deadline, server.log_text()
        time.sleep(0.2)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("processes", [1, 2])
@pytest.mark.parametrize("backend", sorted(STORES))
def test_every_acknowledged_id_survives_kill_9(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str, processes: int
) -> None:
    # Commits that a loaded machine slows past the default 2 s would go out marked
    # uncommitted; what is under test is that a committed answer's id survives.
    env = {"DGSERVE_INSPECTION_URL": STORES[backend](request), "DGSERVE_INSPECTION_COMMIT_TIMEOUT_S": "60",
           "DGSERVE_SERVER_PROCESSES": str(processes)}  # fmt: skip
    pngs = []
    for seed in range(8):
        buf = io.BytesIO()
        render_classification(seed, seed % 4, 64)[0].save(buf, "PNG")
        pngs.append(buf.getvalue())

    first = ServerProcess(tmp_path / "first", env).start()
    try:
        _wait_until_every_process_listens(first, processes)
        with httpx.Client(base_url=first.base, timeout=60) as client:

            def classify(n: int) -> tuple[str, str]:
                response = client.post("/v1/models/shapes-dgnet/classify", content=pngs[n % len(pngs)],
                                       headers={"Content-Type": "image/png"})  # fmt: skip
                response.raise_for_status()
                return response.json()["results"][0]["id"], response.headers["x-inspection-committed"]

            with ThreadPoolExecutor(CLIENTS) as pool:
                answers = list(pool.map(classify, range(WARM)))  # opens the clients' connections
                if processes > 1:  # the kernel hashed them over the processes: each must hold some
                    spread = first.connections_per_process()
                    assert len(spread) == processes and all(spread), spread
                answers += pool.map(classify, range(WARM, REQUESTS))
        first.kill_all()  # at once after the last answer: nothing gets to flush
    finally:
        first.kill_all()

    ids = [i for i, _ in answers]
    assert len(set(ids)) == REQUESTS and all(committed == "true" for _, committed in answers)
    with ServerProcess(tmp_path / "second", env) as second, httpx.Client(base_url=second.base, timeout=60) as client:
        readable = sum(client.get(f"/v1/inspections/{i}").status_code == 200 for i in ids)
    print(f"{backend}, {processes} process(es): {readable} of {REQUESTS} acknowledged ids readable after kill -9 and a restart")
    assert readable == REQUESTS
