"""Inspection records: what each inference predicted and the path the image took.

``open_inspection_store`` builds a store from configuration; today that is the
embedded SQLite store. Start it with ``await store.start()`` (or ``async with``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from dgserve.inspection.base import InspectionRecord, InspectionStore, new_inspection_id, utc_now
from dgserve.inspection.sqlite import SQLiteInspectionStore

__all__ = [
    "InspectionRecord",
    "InspectionStore",
    "SQLiteInspectionStore",
    "new_inspection_id",
    "open_inspection_store",
    "utc_now",
]

# Only "scheme://" makes a URL: "C:\data\x.db" and "data:x.db" stay paths.
_URL = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<rest>.*)$", re.DOTALL)


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
      working directory and ``sqlite:////var/lib/x.db`` is absolute.

    ``max_age_s``/``max_records`` set retention; ``options`` go to the store's
    constructor (for SQLite: ``batch_size``, ``flush_interval_s``, ``max_pending``, ...).
    Any other scheme raises ``ValueError``: a shared store (``postgresql://``,
    ``redis://``) is added here when it exists.
    """
    if isinstance(url_or_path, os.PathLike):
        path = Path(url_or_path)
    else:
        match = _URL.match(url_or_path)
        if match is None:
            if not url_or_path.strip():
                raise ValueError("inspection store location is empty")
            path = Path(url_or_path)
        else:
            scheme = match["scheme"].lower()
            if scheme != "sqlite":
                raise ValueError(
                    f"unsupported inspection store URL scheme {scheme!r} in {url_or_path!r}; "
                    "supported: a filesystem path or sqlite:///<path>"
                )
            rest = match["rest"]
            if not rest.startswith("/") or not rest[1:].strip() or "?" in rest or "#" in rest:
                raise ValueError(
                    f"invalid SQLite URL {url_or_path!r}: expected sqlite:///relative/path.db or "
                    "sqlite:////absolute/path.db, without query or fragment (in-memory databases "
                    "are not supported: records must survive a restart)"
                )
            path = Path(rest[1:])
    return SQLiteInspectionStore(path, max_age_s=max_age_s, max_records=max_records, **options)
