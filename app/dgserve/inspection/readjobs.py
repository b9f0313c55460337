"""What a reader process runs: the heavy reads' work, and the child's side of its pipe.

``readers.py`` (the server's side) starts each child with ``_child_main``. The child
lowers its own priority first (``os.nice``), so that on a machine as small as two
cores the kernel gives the CPU to inference, then opens its own backend
(``InspectionBackend.open``: the SQLite file's read-only connection pool, or a
PostgreSQL pool of its own) and serves one job at a time.

The wire, one pickled tuple per message:

* server -> child: a ``Job``; ``("credit",)`` after each chunk the server has taken;
  ``("cancel",)`` when nobody wants the rest; ``None`` to exit.
* child -> server: ``("ready",)`` once open, then per job ``("chunk", bytes)`` ...
  and one of ``("end",)``, ``("cancelled",)`` or ``("error", class name, attributes)``.

A job has at most ``WINDOW`` chunks sent and not yet taken, so a slow client holds a
bounded amount of memory, and a client that goes away stops the work at the next
chunk. A child whose pipe closes (the server died) exits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Literal

from dgserve import errors
from dgserve.inspection.analysis import analysis_pages
from dgserve.inspection.backend import Filters, InspectionBackend, PageQuery
from dgserve.inspection.codec import decode
from dgserve.inspection.shared import GraphTextCache

__all__ = ["CHUNK_BYTES", "WINDOW", "Job", "JobKind"]

log = logging.getLogger(__name__)

JobKind = Literal["list", "export", "summary", "summary_picture", "record_picture"]
# Chunks sent ahead of the server taking them: one being forwarded, one being made.
WINDOW = 2
CHUNK_BYTES = 256 * 1024  # a listing's lines are sent in chunks of about this size
_LIST_PAGE = 256  # rows per listing read, as InspectionStore's default page
_EXPORT_PAGE = 4096  # rows per Parquet row group
_GRAPH_CACHE_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Job:
    """One heavy read. ``options`` by kind: list: ``limit``, ``include_connectivity``,
    ``format`` ("json" or "ndjson"); summary (and its picture): ``group_by``, ``kind``,
    ``top_k``, ``head`` (the fields the answer starts with), ``fmt`` for the picture;
    record_picture: ``record`` (its ``to_dict()``) and ``fmt``."""

    kind: JobKind
    filters: Filters = field(default_factory=Filters)
    options: dict[str, Any] = field(default_factory=dict)


class _Cancelled(Exception):
    pass


def run(job: Job, backend: InspectionBackend, graphs: GraphTextCache) -> Iterator[bytes]:
    """The response body of ``job``, in chunks (blocking; the child calls it)."""
    if job.kind == "list":
        return _listing(job, backend, graphs)
    if job.kind == "export":
        return _export(job, backend)
    if job.kind == "record_picture":
        from dgserve.analysis import pictures  # matplotlib: imported by the first picture only

        return iter([pictures.record_picture(job.options["record"], job.options["fmt"])])
    body = _summary(job, backend)
    if job.kind == "summary":
        return iter([body])
    from dgserve.analysis import pictures

    return iter([pictures.summary_picture(json.loads(body), job.options["fmt"])])


def _listing(job: Job, backend: InspectionBackend, graphs: GraphTextCache) -> Iterator[bytes]:
    limit, connectivity, ndjson = job.options["limit"], job.options["include_connectivity"], job.options["format"]
    ndjson = ndjson == "ndjson"

    def graph(digest: str) -> Any:
        text = graphs.get(digest)
        if text is None:
            text = backend.graph(digest)
            if text is None:
                raise RuntimeError(f"{backend.location}: a record names graph {digest}, which is not stored")
            graphs.put(digest, text)
        return json.loads(text)

    query = PageQuery(**{f.name: getattr(job.filters, f.name) for f in dataclasses.fields(Filters)},
                      limit=_LIST_PAGE, include_connectivity=connectivity)  # fmt: skip
    # The same text as the in-process listing: json.dumps of each record's to_dict().
    parts: list[str] = [] if ndjson else ['{"records":[']
    size, count = 0, 0
    while count < limit:
        query = dataclasses.replace(query, limit=min(_LIST_PAGE, limit - count))
        rows = backend.read_page(query)
        for row in rows:
            line = json.dumps(decode(row, graph, connectivity).to_dict())
            parts.append(line + "\n" if ndjson else ("," if count else "") + line)
            size += len(line)
            count += 1
            if size >= CHUNK_BYTES:
                yield "".join(parts).encode()
                parts, size = [], 0
        if len(rows) < query.limit:
            break
        query = dataclasses.replace(query, after=rows[-1].key)
    if not ndjson:
        parts.append(f'],"count":{count}}}')
    if parts:
        yield "".join(parts).encode()


def _export(job: Job, backend: InspectionBackend) -> Iterator[bytes]:
    from dgserve.analysis import export

    plan = export.plan(backend.layouts(job.filters))
    pages = analysis_pages(backend, job.filters, page_size=_EXPORT_PAGE, include_connectivity=plan.needs_connectivity)
    return export.parquet_chunks(plan, pages)


def _summary(job: Job, backend: InspectionBackend) -> bytes:
    from dgserve.analysis.summary import summarise

    filters, options = job.filters, job.options
    group_by: str | None = options["group_by"]
    assert filters.model is not None
    wanted = {k for k, _ in filters.tags} | ({group_by[4:]} if group_by and group_by.startswith("tag:") else set())
    if wanted:
        known = backend.tag_keys(filters.model)
        unknown = sorted(wanted - known)
        if unknown:
            have = ", ".join(sorted(known)) or "none"
            raise errors.InvalidAnalysisError(
                f"no record of model {filters.model!r} has tag key {', '.join(map(repr, unknown))}; "
                f"its tag keys: {have}"
            )
    summary = summarise(backend.select(filters), group_by=group_by, tags=filters.tags, kind=options["kind"],
                        top_k=options["top_k"], pattern_bits=backend.pattern_bits)  # fmt: skip
    # As starlette's JSONResponse renders it, so the answer is the in-process one.
    return json.dumps({**options["head"], **summary}, ensure_ascii=False, allow_nan=False, indent=None,
                      separators=(",", ":")).encode()  # fmt: skip


def _failure(exc: BaseException) -> tuple[str, str, dict[str, Any]]:
    """``("error", class name, attributes)``: a typed error crosses as what rebuilds it."""
    if isinstance(exc, errors.DGServeError):
        attributes = {k: v for k, v in vars(exc).items() if isinstance(v, str | int | float | bool | None)}
        return ("error", type(exc).__name__, attributes)
    log.error("a heavy read failed in its reader process", exc_info=exc)
    return ("error", "DGServeError", {"message": "the read failed; the server log says why"})


def _take_control(conn: Connection, credits: int, block: bool) -> int:
    """Apply the server's messages (credit, cancel); wait for one while ``block``."""
    while block or conn.poll():
        message = conn.recv()
        if message == ("cancel",):
            raise _Cancelled
        credits += 1
        block = False
    return credits


def _serve(conn: Connection, job: Job, backend: InspectionBackend, graphs: GraphTextCache) -> None:
    credits = WINDOW
    chunks = run(job, backend, graphs)
    try:
        for chunk in chunks:
            credits = _take_control(conn, credits, block=credits == 0)
            conn.send(("chunk", chunk))
            credits -= 1
        conn.send(("end",))
    except _Cancelled:
        conn.send(("cancelled",))
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()


def _child_main(conn: Connection, location: str, niceness: int) -> None:
    """A reader process: lower priority, open the backend, serve jobs until told or orphaned."""
    with contextlib.suppress(OSError):  # absolute, never raised above the server's own
        os.setpriority(os.PRIO_PROCESS, 0, max(niceness, os.getpriority(os.PRIO_PROCESS, 0)))
    from dgserve.inspection import open_inspection_store  # after the nice: importing costs CPU too

    backend = open_inspection_store(location).backend
    try:
        backend.open()
    except Exception as exc:
        conn.send(_failure(errors.NotReadyError(f"inspection store {backend.location}: {exc}".splitlines()[0])))
        return
    graphs = GraphTextCache(_GRAPH_CACHE_BYTES)
    try:
        conn.send(("ready",))
        while True:
            try:
                job = conn.recv()
            except EOFError:  # the server is gone
                return
            if job is None:
                return
            if isinstance(job, tuple):  # a credit or cancel that crossed the job's end
                continue
            try:
                _serve(conn, job, backend, graphs)
            except (BrokenPipeError, EOFError, ConnectionResetError):
                return
            except Exception as exc:  # the job failed, not the child: answer and take the next one
                with contextlib.suppress(_Cancelled):
                    conn.send(_failure(exc))
    finally:
        backend.close()
