"""The analysis benchmark runs end to end on a small store and prints every figure."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "inspection_analysis.py"


@pytest.mark.timeout(300)
def test_the_benchmark_prints_summaries_and_exports() -> None:
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--records", "3000", "--images", "64", "--days", "0.5", "--rounds", "1",
         "--export-rounds", "1", "--batch", "500"],
        capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert "stored 3,000 records" in out
    assert "summary whole window: 3,000 records, 1 groups" in out
    assert "summary whole window, group_by=tag:truth: 3,000 records, 8 groups" in out
    assert "export all records: 3,000 records" in out and "records/s" in out
