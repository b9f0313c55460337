"""The JPEG decoding benchmark runs end to end on the CPU and prints its same-run ratios."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "jpeg_decode.py"


@pytest.mark.timeout(300)
def test_the_benchmark_prints_ratios_against_pil(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--batch", "2", "--passes", "1", "--rounds", "2",
         "--width", "160", "--height", "120", "--input-size", "64", "--json", str(out)],
        capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "device cpu (CPU)" in run.stdout
    assert "torchvision-cpu+preprocess / pil+preprocess: median" in run.stdout
    figures = json.loads(out.read_text())
    assert len(figures["rounds"]) == 2
    assert set(figures["ratios"]) == {"torchvision-cpu+preprocess", "torchvision-cpu decode only"}
