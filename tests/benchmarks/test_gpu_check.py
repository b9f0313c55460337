"""The GPU check never passes a GPU run off as a CPU one, and runs without dgserve's install.

Its steps run in ``benchmarks/gpu_check.sh --device cpu`` (minutes; see docs/performance.md);
these tests cover what decides where it runs, which is quick.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
CHECK = ROOT / "benchmarks" / "gpu_check.sh"
DEVICE_CHECK = ROOT / "benchmarks" / "gpu_check_device.sh"


def _run(script: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "PY": sys.executable, **env})  # fmt: skip


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where torch sees no GPU")
def test_cuda_asked_without_a_usable_gpu_stops_before_any_step(tmp_path: Path) -> None:
    run = _run(CHECK, "--device", "cuda", "--results", str(tmp_path / "results"))
    assert run.returncode == 2 and "cannot use it" in run.stderr
    assert not (tmp_path / "results").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where torch sees no GPU")
def test_a_listed_gpu_that_torch_cannot_use_is_no_cpu_run(tmp_path: Path) -> None:
    """No --device: where nvidia-smi lists a GPU, a torch without CUDA must not fall back to the CPU."""
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-00000000)'\n")
    fake.chmod(0o755)
    run = _run(CHECK, "--results", str(tmp_path / "results"), PATH=f"{fake.parent}:{os.environ['PATH']}")
    assert run.returncode == 2 and "nvidia-smi lists a GPU" in run.stderr
    assert not (tmp_path / "results").exists()


def test_an_interpreter_without_torch_is_named(tmp_path: Path) -> None:
    run = _run(CHECK, "--device", "cpu", "--results", str(tmp_path / "results"), PY=str(tmp_path / "no-python"))
    assert run.returncode == 2 and "cannot import torch" in run.stderr


def test_the_device_wrapper_wants_the_wheels_first(tmp_path: Path) -> None:
    run = _run(DEVICE_CHECK, str(tmp_path / "out.tgz"), "--device", "cpu", WHEELS=str(tmp_path))
    assert run.returncode == 2 and "benchmarks/gpu_wheels.sh" in run.stderr
