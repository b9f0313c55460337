"""The batcher's drain estimate, alone (``serving/drain_estimate.py``)."""

from __future__ import annotations

import pytest

from dgserve.serving.drain_estimate import DrainEstimate


def test_before_any_batch_a_wave_is_assumed_to_take_a_second() -> None:
    estimate = DrainEstimate(max_batch_size=8, workers=2)
    assert estimate.retry_after_s(0) == pytest.approx(1.0)
    assert estimate.retry_after_s(16) == pytest.approx(1.0)  # one wave: a full batch per worker
    assert estimate.retry_after_s(17) == pytest.approx(2.0)


def test_the_first_batch_sets_the_average_and_later_ones_move_it_a_fifth_of_the_way() -> None:
    estimate = DrainEstimate(max_batch_size=4, workers=1)
    estimate.batch_took(0.5)
    assert estimate.avg_batch_s == pytest.approx(0.5)
    estimate.batch_took(1.5)
    assert estimate.avg_batch_s == pytest.approx(0.7)
    assert estimate.retry_after_s(9) == pytest.approx(3 * 0.7)  # 9 queued: three waves of 4


def test_the_estimate_never_falls_below_ten_milliseconds() -> None:
    estimate = DrainEstimate(max_batch_size=1, workers=1)
    estimate.batch_took(0.0001)
    assert estimate.retry_after_s(1) == pytest.approx(0.01)
