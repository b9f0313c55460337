"""One inference's inspection record, its id, and the time helpers stores share.

Every inference produces one ``InspectionRecord``: the prediction summary plus the
image's connectivity (per-stage edge matrices, GloRe graphs). The server hands it to
an ``InspectionStore`` so that users can fetch it later by id.

Nothing here imports torch or FastAPI, or knows where records are kept.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from dgserve.inspection.tags import validate as validate_tags
from dgserve.randomness import random_bits

__all__ = ["InspectionRecord", "as_utc", "from_us", "new_inspection_id", "to_us", "utc_now"]

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
    value = (time.time_ns() // 1_000_000) << _RANDOM_BITS | random_bits(_RANDOM_BITS)
    chars = []
    for _ in range(_ID_LENGTH):
        chars.append(_CROCKFORD[value & 0x1F])
        value >>= 5
    return "".join(reversed(chars))


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_US = timedelta(microseconds=1)


def as_utc(value: datetime, what: str) -> datetime:
    """``value`` in UTC; ``ValueError`` naming ``what`` if it is naive."""
    # A naive datetime would be read as the host's local time by some code paths and
    # as UTC by others; refusing it is the only way the stored order stays right.
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware, got naive {value.isoformat()}")
    return value.astimezone(UTC)


def to_us(value: datetime, what: str) -> int:
    """Whole microseconds since the Unix epoch: how stores keep time, so that it sorts
    and compares exactly. A naive ``value`` is refused like ``as_utc`` refuses it."""
    return (as_utc(value, what) - _EPOCH) // _ONE_US


def from_us(us: int) -> datetime:
    """The inverse of ``to_us``, in UTC."""
    return _EPOCH + timedelta(microseconds=us)


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
    # The request's tags (``dgserve.inspection.tags``): what analysis filters and groups by.
    tags: dict[str, str] = field(default_factory=dict)
    # A JPEG of the image as the model saw it, only with DGSERVE_INSPECTION_THUMBNAILS on
    # (``serving/thumbnails.py``). Never part of ``to_dict``: no JSON answer carries it.
    thumbnail: bytes | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ValueError("inspection id must be a non-empty string")
        object.__setattr__(self, "created_at", as_utc(self.created_at, "created_at"))
        object.__setattr__(self, "tags", validate_tags(self.tags))

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
        tags: dict[str, str] | None = None,
        thumbnail: bytes | None = None,
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
            tags=tags or {},
            thumbnail=thumbnail,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: ``created_at`` becomes an ISO 8601 string with a +00:00 offset."""
        return {
            "id": self.id,
            "model": self.model,
            "version": self.version,
            "task": self.task,
            "created_at": self.created_at.isoformat(),
            "tags": self.tags,
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
            tags=dict(data.get("tags") or {}),
        )
