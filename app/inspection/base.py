"""What an inspection store is, independent of where it keeps its records.

Every inference produces one ``InspectionRecord``: the prediction summary plus the
image's connectivity (per-stage edge matrices, GloRe graphs). The server hands it to
an ``InspectionStore`` so that users can fetch it later by id.

The embedded default is ``SQLiteInspectionStore`` (one file, one process). A shared
store for multi-replica deployments (PostgreSQL, Redis, ...) implements the same
``InspectionStore`` interface, and ``open_inspection_store`` picks one by URL.

Nothing here imports torch or FastAPI.
"""

from __future__ import annotations

import abc
import secrets
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self

__all__ = ["InspectionRecord", "InspectionStore", "new_inspection_id", "utc_now"]

# Crockford's base32: no I, L, O or U, so ids survive being read aloud or retyped.
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_ID_LENGTH = 26  # 130 bits of base32 hold the 48-bit timestamp and 80 random bits
_RANDOM_BITS = 80


def utc_now() -> datetime:
    return datetime.now(UTC)


def new_inspection_id() -> str:
    """A 26-character, URL-safe, time-ordered id in the ULID layout.

    The first 10 characters are the creation time in milliseconds, so ids sort by
    time (to the millisecond) as strings; the last 16 are 80 fresh random bits.
    Unlike ULID's "monotonic" variant, ids made in the same millisecond are not
    counted up from one another: the ids are handed to users, and an id must not
    reveal its neighbours'.
    """
    value = (time.time_ns() // 1_000_000) << _RANDOM_BITS | secrets.randbits(_RANDOM_BITS)
    chars = []
    for _ in range(_ID_LENGTH):
        chars.append(_CROCKFORD[value & 0x1F])
        value >>= 5
    return "".join(reversed(chars))


def _as_utc(value: datetime, what: str) -> datetime:
    # A naive datetime would be read as the host's local time by some code paths and
    # as UTC by others; refusing it is the only way the stored order stays right.
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware, got naive {value.isoformat()}")
    return value.astimezone(UTC)


@dataclass(frozen=True)
class InspectionRecord:
    """One image's inference: what was predicted, and the path it took.

    ``prediction`` is a small JSON-able summary; ``connectivity`` is JSON-able and can
    be large (``ImageConnectivity.to_dict()``). ``created_at`` is normalised to UTC;
    a naive datetime is refused.

    Listing with ``include_connectivity=False`` gives records whose
    ``connectivity`` is ``{}``.
    """

    id: str
    model: str
    version: int
    task: str
    created_at: datetime
    prediction: dict[str, Any]
    connectivity: dict[str, Any]
    # The same connectivity as JSON text, when the producer already has it: a GloRe
    # record runs to megabytes, and encoding it again would stall the event loop.
    connectivity_json: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ValueError("inspection id must be a non-empty string")
        object.__setattr__(self, "created_at", _as_utc(self.created_at, "created_at"))

    @classmethod
    def new(
        cls,
        *,
        model: str,
        version: int,
        task: str,
        prediction: dict[str, Any],
        connectivity: dict[str, Any],
        created_at: datetime | None = None,
        connectivity_json: str | None = None,
    ) -> InspectionRecord:
        """A record with a fresh id, created now unless ``created_at`` is given."""
        return cls(
            id=new_inspection_id(),
            model=model,
            version=version,
            task=task,
            created_at=utc_now() if created_at is None else created_at,
            prediction=prediction,
            connectivity=connectivity,
            connectivity_json=connectivity_json,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: ``created_at`` becomes an ISO 8601 string with a +00:00 offset."""
        return {
            "id": self.id,
            "model": self.model,
            "version": self.version,
            "task": self.task,
            "created_at": self.created_at.isoformat(),
            "prediction": self.prediction,
            "connectivity": self.connectivity,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InspectionRecord:
        """The inverse of ``to_dict``; ``created_at`` may also be a datetime."""
        missing = [k for k in ("id", "model", "version", "task", "created_at") if k not in data]
        if missing:
            raise ValueError(f"inspection record is missing {', '.join(missing)}")
        created_at = data["created_at"]
        if isinstance(created_at, str):
            created_at = datetime.fromisoformat(created_at)
        if not isinstance(created_at, datetime):
            raise ValueError(f"created_at must be an ISO 8601 string or a datetime, got {created_at!r}")
        return cls(
            id=data["id"],
            model=data["model"],
            version=int(data["version"]),
            task=data["task"],
            created_at=created_at,
            prediction=dict(data.get("prediction") or {}),
            connectivity=dict(data.get("connectivity") or {}),
        )


class InspectionStore(abc.ABC):
    """Where inspection records live.

    Contract every implementation keeps:

    * ``put`` never waits for storage I/O: it queues the record and returns. It may
      wait only when the implementation's bound on queued records is reached
      (back-pressure); a record is never dropped to make room.
    * A record is readable by ``get`` and ``list`` as soon as ``put`` returns, whether
      or not it has been written yet.
    * ``flush`` returns once every record queued before the call is durable;
      ``close`` flushes first.
    * ``list`` yields in ``(created_at, id)`` ascending order and fetches in pages.

    Use ``async with store:`` or call ``start()``/``close()`` yourself.
    """

    @abc.abstractmethod
    async def start(self) -> None:
        """Open the storage and start background work. Call once."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Flush everything queued, stop background work and release the storage.

        Idempotent. Later ``put`` calls raise ``RuntimeError``.
        """

    @abc.abstractmethod
    async def put(self, record: InspectionRecord) -> None:
        """Queue ``record`` for writing; an existing record with its id is replaced.

        Raises ``TypeError``/``ValueError`` at once for a record that cannot be
        serialised.
        """

    @abc.abstractmethod
    async def get(self, inspection_id: str) -> InspectionRecord:
        """The record with this id; ``InspectionNotFoundError`` if there is none."""

    @abc.abstractmethod
    def list(
        self,
        *,
        model: str | None = None,
        since: datetime | None = None,
        limit: int = 100,
        include_connectivity: bool = True,
    ) -> AsyncIterator[InspectionRecord]:
        """Up to ``limit`` records, oldest first (``created_at``, then ``id``).

        ``model`` keeps only that model's records; ``since`` (timezone-aware) keeps
        those created at or after it. With ``include_connectivity=False`` the large
        ``connectivity`` field is not read and comes back as ``{}``.
        """

    @abc.abstractmethod
    async def count(self) -> int:
        """How many records the store holds, queued ones included."""

    @abc.abstractmethod
    async def flush(self) -> None:
        """Wait until every record queued before this call is durable."""

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
