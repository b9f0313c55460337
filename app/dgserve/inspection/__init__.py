"""Inspection records: what each inference predicted and the path the image took.

``InspectionStore`` queues records and writes them behind (``writebehind.py``) to an
``InspectionBackend`` (``backend.py``); ``open_inspection_store`` picks the backend by
URL: the embedded SQLite file (the default) or a shared PostgreSQL database. Start the
store with ``await store.start()`` (or ``async with``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dgserve.inspection.backend import InspectionBackend
from dgserve.inspection.postgres import PostgreSQLBackend
from dgserve.inspection.record import InspectionRecord, new_inspection_id, utc_now
from dgserve.inspection.sqlite import SQLiteBackend, SQLiteInspectionStore
from dgserve.inspection.writebehind import InspectionStore

__all__ = [
    "InspectionBackend",
    "InspectionRecord",
    "InspectionStore",
    "PostgreSQLBackend",
    "SQLiteBackend",
    "SQLiteInspectionStore",
    "new_inspection_id",
    "open_inspection_store",
    "utc_now",
]

# Only "scheme://" makes a URL: "C:\data\x.db" and "data:x.db" stay paths.
_URL = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<rest>.*)$", re.DOTALL)


@dataclass(frozen=True)
class _Scheme:
    backend: Callable[[str], InspectionBackend]  # the whole URL -> an unopened backend
    form: str  # what the URL looks like, for the message that lists what is supported ("": an alias)


# A backend for another scheme is one more entry here.
_SCHEMES: dict[str, _Scheme] = {
    "sqlite": _Scheme(SQLiteBackend.from_url, "sqlite:///<path>"),
    "postgresql": _Scheme(PostgreSQLBackend.from_url, "postgresql://<user>[:<password>]@<host>[:<port>]/<db>"),
    "postgres": _Scheme(PostgreSQLBackend.from_url, ""),  # libpq takes both spellings
}
# The userinfo of a URL, whose password must not reach a message.
_USERINFO = re.compile(r"(?<=://)[^/@]*@")


def open_inspection_store(
    url_or_path: str | os.PathLike[str],
    *,
    max_age_s: float | None = None,
    max_records: int | None = None,
    **options: Any,
) -> InspectionStore:
    """An unstarted store for ``url_or_path``.

    Accepted today:

    * a filesystem path: ``/var/lib/dgserve/inspections.db``, ``data/inspections.db``;
    * ``sqlite:///<path>``, with SQLAlchemy's reading of the slashes: everything after
      the third slash is the path, so ``sqlite:///data/x.db`` is relative to the
      working directory and ``sqlite:////var/lib/x.db`` is absolute;
    * ``postgresql://`` or ``postgres://`` URLs, as libpq reads them: a database that
      several replicas share (``postgres.py``).

    ``max_age_s``/``max_records`` set retention; ``options`` go to ``InspectionStore``
    (``batch_size``, ``flush_interval_s``, ``max_pending``, ``when_full``, ...). Any
    other scheme raises ``ValueError``.
    """
    backend: InspectionBackend
    if isinstance(url_or_path, os.PathLike):
        backend = SQLiteBackend(url_or_path)
    elif (match := _URL.match(url_or_path)) is None:
        if not url_or_path.strip():
            raise ValueError("inspection store location is empty")
        backend = SQLiteBackend(url_or_path)
    else:
        scheme = _SCHEMES.get(match["scheme"].lower())
        if scheme is None:
            forms = " or ".join(s.form for s in _SCHEMES.values() if s.form)
            shown = _USERINFO.sub("", url_or_path)
            raise ValueError(
                f"unsupported inspection store URL scheme {match['scheme'].lower()!r} in {shown!r}; "
                f"supported: a filesystem path or {forms}"
            )
        backend = scheme.backend(url_or_path)
    return InspectionStore(backend, max_age_s=max_age_s, max_records=max_records, **options)
