"""The write-cost benchmark runs end to end, every size written to a store that reads it back."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "inspection_write.py"


@pytest.mark.timeout(120)
def test_the_benchmark_prints_each_sizes_cost() -> None:
    run = subprocess.run([sys.executable, str(SCRIPT), "--sizes", "1,3", "--writes", "5"],
                         capture_output=True, text=True, timeout=110)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    sizes = re.findall(r"^\s*(\d+) records per write: wall [\d.]+ ms, CPU [\d.]+ ms median; CPU per record [\d.]+ ms$",
                       run.stdout, re.M)  # fmt: skip
    assert sizes == ["1", "3"], run.stdout
