"""Inspection records and their ids: UTC times, dict round trips, time-ordered ids."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta, timezone

import pytest

from dgserve.inspection import InspectionRecord, new_inspection_id

T0 = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)


def record(created_at: datetime) -> InspectionRecord:
    return InspectionRecord(
        id=new_inspection_id(), model="m", version=1, task="classification", created_at=created_at,
        prediction={"top1": "cat"}, connectivity={"stages": []},
    )


def test_record_round_trips_through_a_dict_and_is_utc() -> None:
    cet = timezone(timedelta(hours=1))
    rec = record(created_at=datetime(2025, 1, 1, 13, 0, 0, 123456, tzinfo=cet))
    assert rec.created_at == T0.replace(microsecond=123456)
    assert rec.created_at.tzinfo is UTC

    data = rec.to_dict()
    assert data["created_at"] == "2025-01-01T12:00:00.123456+00:00"
    assert json.loads(json.dumps(data)) == data
    assert InspectionRecord.from_dict(json.loads(json.dumps(data))) == rec

    with pytest.raises(ValueError, match="timezone-aware"):
        record(created_at=datetime(2025, 1, 1))
    with pytest.raises(ValueError, match="missing"):
        InspectionRecord.from_dict({"id": "x"})


def test_new_record_gets_an_id_and_the_current_time() -> None:
    before = datetime.now(UTC)
    rec = InspectionRecord.new(model="m", version=2, task="classification", prediction={}, connectivity={})
    assert before <= rec.created_at <= datetime.now(UTC)
    assert len(rec.id) == 26


def test_ids_are_url_safe_unique_and_time_ordered() -> None:
    alphabet = set("0123456789ABCDEFGHJKMNPQRSTVWXYZ")
    ids = [new_inspection_id() for _ in range(1000)]
    assert len(set(ids)) == 1000
    assert all(len(i) == 26 and set(i) <= alphabet for i in ids)

    ms = 0
    for char in ids[-1][:10]:
        ms = ms * 32 + "0123456789ABCDEFGHJKMNPQRSTVWXYZ".index(char)
    assert abs(ms / 1000 - time.time()) < 5

    earlier = new_inspection_id()
    time.sleep(0.002)
    assert new_inspection_id()[:10] > earlier[:10]
