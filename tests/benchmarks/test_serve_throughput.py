"""The serving benchmark still runs end to end (its figures are for people, not for CI)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize(("images_per_request", "protocols"), [(1, "v1"), (3, "v1,v2")])
def test_benchmark_reports_a_ratio_per_round(tmp_path: Path, images_per_request: int, protocols: str) -> None:
    out = tmp_path / "figures.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "serve_throughput.py"), "--model", "shapes-dgnet",
         "--image-size", "64", "--batch-size", "4", "--clients", "4", "--requests", "12", "--rounds", "2",
         "--images-per-request", str(images_per_request), "--protocols", protocols, "--json", str(out)],
        capture_output=True, text=True, timeout=280, env={"DGSERVE_TORCH_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "server/raw = " in run.stdout
    assert ("v2/v1 = " in run.stdout) == ("v2" in protocols)
    figures = json.loads(out.read_text())
    assert len(figures["rounds"]) == 2
    for r in (per_round[p] for per_round in figures["rounds"] for p in protocols.split(",")):
        assert r["server_images_per_s"] > 0 and r["raw_images_per_s"] > 0
        assert r["ratio"] == pytest.approx(r["server_images_per_s"] / r["raw_images_per_s"])
        assert 1 <= r["mean_batch"] <= 4
        assert r["p50_ms"] <= r["p99_ms"]
