"""The loop-cost benchmark runs end to end: every case answers 200, and each prints its figures."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "loop_cost.py"


@pytest.mark.timeout(240)
def test_the_benchmark_prints_each_cases_loop_cost_and_calls() -> None:
    run = subprocess.run([sys.executable, str(SCRIPT), "--requests", "40", "--warmup", "8", "--clients", "4",
                          "--rounds", "2", "--profile"], capture_output=True, text=True, timeout=230)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    costs = re.findall(r"^(v1|oip) (small|photo): loop CPU per request [\d.]+ / [\d.]+ / [\d.]+ ms \(min / median / max "
                       r"over 2 rounds\)$", run.stdout, re.M)  # fmt: skip
    assert costs == [("v1", "small"), ("v1", "photo"), ("oip", "small"), ("oip", "photo")], run.stdout
    calls = re.findall(r"^(v1|oip) (small|photo): (\d+) Python calls per request, (\d+) of them in FastAPI and Starlette",
                       run.stdout, re.M)  # fmt: skip
    assert [c[:2] for c in calls] == costs and all(0 < int(f) < int(t) for _, _, t, f in calls), run.stdout
