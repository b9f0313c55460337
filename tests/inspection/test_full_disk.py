"""A real full disk under a real server (docs/failure-modes.md, "A full disk").

The SQLite file lives on a small tmpfs of its own, and the test fills that filesystem to
its last byte, so that SQLite's writes fail with ``SQLITE_FULL`` (the kernel's ``ENOSPC``)
as on a full disk. It then checks what the page promises: answers keep going out, marked
``X-Inspection-Committed: false``, their records readable from the write-behind queue and
counted as write errors; once space comes back the queue is written; and after a restart
every id that was handed out is readable.

Mounting a tmpfs needs root or ``CAP_SYS_ADMIN``; without them the test is skipped and says so.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).parents[1] / "api"))
from server_process import ServerProcess  # noqa: E402

from dgserve.api.routes.inference import COMMITTED_HEADER
from dgserve.data.scenes import render_classification
from dgserve.metrics import INSPECTION_PENDING_RECORDS, INSPECTION_WRITE_ERRORS

CLASSIFY = "/v1/models/shapes-dgnet/classify"
ANSWERS_WHILE_FULL = 40


@contextlib.contextmanager
def small_filesystem(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True)
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                 capture_output=True, text=True)  # fmt: skip
    except OSError as exc:  # no mount(8) at all
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=False)


def fill(directory: Path) -> Path:
    """A file that takes every byte left on ``directory``'s filesystem."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        for size in (2**20, 2**16, 2**12, 2**9, 1):  # down to the last byte of the last page
            block = b"\0" * size
            while True:
                try:
                    os.write(fd, block)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
    finally:
        os.close(fd)
    assert os.statvfs(directory).f_bavail == 0
    return filler


def _metric(base: str, name: str) -> float:
    text = httpx.get(base + "/metrics", timeout=30).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def _classify(http: httpx.Client, png: bytes) -> tuple[str, bool]:
    """The answer's inspection id, and whether its record was durable as it went out."""
    response = http.post(CLASSIFY, content=png, headers={"Content-Type": "image/png"})
    assert response.status_code == 200, response.text
    inspection_id = response.json()["results"][0]["id"]
    assert inspection_id is not None  # the queue has room: no record is dropped
    return inspection_id, response.headers.get(COMMITTED_HEADER) != "false"


def test_a_full_disk_keeps_answers_going_and_loses_no_record(tmp_path: Path) -> None:
    buf = io.BytesIO()
    render_classification(7, 3, 64)[0].save(buf, "PNG")
    png = buf.getvalue()
    with small_filesystem(tmp_path / "disk", "16m") as disk:
        env = {"DGSERVE_INSPECTION_URL": f"sqlite:///{disk / 'inspections.sqlite3'}"}
        with ServerProcess(tmp_path / "server", env) as server, httpx.Client(base_url=server.base, timeout=60) as http:
            ids = [_classify(http, png)[0]]
            filler = fill(disk)

            answers = [_classify(http, png) for _ in range(ANSWERS_WHILE_FULL)]
            ids += [inspection_id for inspection_id, _ in answers]
            uncommitted = [inspection_id for inspection_id, durable in answers if not durable]
            errors = _metric(server.base, INSPECTION_WRITE_ERRORS)
            print(f"disk full: {len(uncommitted)} of {len(answers)} answers uncommitted, {errors:g} write errors")
            assert uncommitted, f"every answer was committed with the disk full:\n{server.log_text()}"
            assert errors > 0
            assert _metric(server.base, INSPECTION_PENDING_RECORDS) > 0
            for inspection_id in uncommitted:  # from the write-behind queue
                assert http.get(f"/v1/inspections/{inspection_id}").status_code == 200

            filler.unlink()  # space comes back: the queue is written, with its back-off (5 s at most)
            deadline = time.monotonic() + 60
            while (pending := _metric(server.base, INSPECTION_PENDING_RECORDS)) > 0:
                assert time.monotonic() < deadline, f"{pending:g} records still queued 60 s after space came back"
                time.sleep(0.2)
            assert _classify(http, png)[1], "an answer after space came back is committed"

        with ServerProcess(tmp_path / "restarted", env) as server:
            missing = [i for i in ids if httpx.get(f"{server.base}/v1/inspections/{i}", timeout=30).status_code != 200]
        assert not missing, f"{len(missing)} of {len(ids)} ids lost"
