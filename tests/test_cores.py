"""The cores a process may use: affinity, and CPU quotas read from cgroup v1 and v2 files;
and the GPUs it would see.

The parsing is checked on cgroup trees written to a temporary directory in both layouts;
one test reads back a quota set through the kernel's own cgroup files, where the machine lets it.
GPUs: the real NVML where this machine has one (none here: 0), and ``CUDA_VISIBLE_DEVICES``'s
narrowing over a stand-in for the driver's count, which no machine without GPUs can give.
"""

from __future__ import annotations

import os
import sys
import types
import uuid
from pathlib import Path

import pytest

from dgserve.cores import available_cores, cgroup_quota, visible_gpus

AFFINITY = len(os.sched_getaffinity(0))


def v2_tree(tmp_path: Path, path: str, limits: dict[str, str]) -> tuple[Path, Path]:
    """A cgroup v2 mount with ``cpu.max`` per directory (``limits``: relative dir -> contents)."""
    root = tmp_path / "cgroup"
    (root / path.strip("/")).mkdir(parents=True, exist_ok=True)
    for directory, text in limits.items():
        (root / directory).mkdir(parents=True, exist_ok=True)
        (root / directory / "cpu.max").write_text(text + "\n")
    proc = tmp_path / "proc_cgroup"
    proc.write_text(f"0::{path}\n")
    return proc, root


def v1_tree(tmp_path: Path, controllers: str, path: str, quota_us: int, period_us: int = 100_000) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    group = root / controllers / path.strip("/")
    group.mkdir(parents=True)
    (group / "cpu.cfs_quota_us").write_text(f"{quota_us}\n")
    (group / "cpu.cfs_period_us").write_text(f"{period_us}\n")
    proc = tmp_path / "proc_cgroup"
    proc.write_text(f"5:memory:/x\n4:{controllers}:{path}\n3:cpuset:/\n0::/\n")
    return proc, root


@pytest.mark.parametrize(
    ("cpu_max", "quota", "cores"),
    [("max 100000", None, AFFINITY), ("100000 100000", 1.0, 1), ("150000 100000", 1.5, 1),
     ("50000 100000", 0.5, 1), (f"{(AFFINITY + 1) * 100000} 100000", AFFINITY + 1.0, AFFINITY)],
)  # fmt: skip
def test_cgroup_v2_cpu_max_bounds_the_cores(tmp_path: Path, cpu_max: str, quota: float | None, cores: int) -> None:
    proc, root = v2_tree(tmp_path, "/kubepods/pod1/c1", {"kubepods/pod1/c1": cpu_max})
    assert cgroup_quota(proc_cgroup=proc, root=root) == quota
    assert available_cores(proc_cgroup=proc, root=root) == cores


def test_a_parents_quota_binds_its_children(tmp_path: Path) -> None:
    proc, root = v2_tree(tmp_path, "/kubepods/pod1/c1", {"kubepods/pod1": "100000 100000", "kubepods/pod1/c1": "max 100000"})
    assert cgroup_quota(proc_cgroup=proc, root=root) == 1.0


def test_a_namespaced_container_reads_its_quota_at_the_mount(tmp_path: Path) -> None:
    # With a cgroup namespace the path is "/", and the mount is the container's own cgroup.
    proc, root = v2_tree(tmp_path, "/", {".": "200000 100000"})
    assert cgroup_quota(proc_cgroup=proc, root=root) == 2.0


@pytest.mark.parametrize("controllers", ["cpu", "cpu,cpuacct"])
def test_cgroup_v1_cfs_quota_bounds_the_cores(tmp_path: Path, controllers: str) -> None:
    proc, root = v1_tree(tmp_path, controllers, "/docker/abc", quota_us=50_000)
    assert cgroup_quota(proc_cgroup=proc, root=root) == 0.5
    assert available_cores(proc_cgroup=proc, root=root) == 1


def test_cgroup_v1_without_a_quota_leaves_the_affinity(tmp_path: Path) -> None:
    proc, root = v1_tree(tmp_path, "cpu", "/", quota_us=-1)
    assert cgroup_quota(proc_cgroup=proc, root=root) is None
    assert available_cores(proc_cgroup=proc, root=root) == AFFINITY


def test_no_cgroup_filesystem_means_no_quota(tmp_path: Path) -> None:
    assert cgroup_quota(proc_cgroup=tmp_path / "absent", root=tmp_path) is None
    assert available_cores(proc_cgroup=tmp_path / "absent", root=tmp_path) == AFFINITY


def _writable_v1_cpu() -> Path | None:
    cpu = Path("/sys/fs/cgroup/cpu")
    return cpu if (cpu / "cpu.cfs_quota_us").exists() and os.access(cpu, os.W_OK) else None


@pytest.mark.skipif(_writable_v1_cpu() is None, reason="needs a writable cgroup v1 cpu hierarchy (root)")
@pytest.mark.skipif(AFFINITY < 2, reason="a quota under 1 CPU must show against at least 2 cores")
def test_a_quota_set_through_the_kernel_is_read_back(tmp_path: Path) -> None:
    """The kernel's own files: a new cgroup capped at half a CPU, read where the kernel keeps it.

    The process is not moved into the cgroup (on this machine, moving a forked child late in
    the test session was refused with EIO); a ``/proc/self/cgroup`` line in the kernel's
    format names it instead, and everything else is the kernel's.
    """
    mount = _writable_v1_cpu()
    assert mount is not None
    group = mount / f"dgserve-test-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    try:
        (group / "cpu.cfs_quota_us").write_text("50000")
        proc = tmp_path / "proc_cgroup"
        proc.write_text(f"3:cpuset:/\n2:cpuacct:/\n1:{mount.name}:/{group.name}\n0::/\n")
        assert cgroup_quota(proc_cgroup=proc, root=mount.parent) == 0.5
        assert available_cores(proc_cgroup=proc, root=mount.parent) == 1  # the machine has 2 or more
    finally:
        group.rmdir()  # no process was ever in it


def test_visible_gpus_is_what_nvml_counts_and_none_without_a_driver() -> None:
    try:
        import pynvml

        pynvml.nvmlInit()
        expected = pynvml.nvmlDeviceGetCount()
        pynvml.nvmlShutdown()
    except Exception:  # this machine: no driver
        expected = 0
    assert visible_gpus({}) == expected
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == 0
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "-1"}) == 0


@pytest.mark.parametrize(
    ("visible", "count"),
    [(None, 4), ("0,1", 2), ("2", 1), ("0,-1,2", 1), ("0,,1", 1), ("0,1,2,3,4,5", 4), ("GPU-5d1c", 1), ("", 0)],
)
def test_cuda_visible_devices_narrows_the_driver_count(
    monkeypatch: pytest.MonkeyPatch, visible: str | None, count: int
) -> None:
    driver = types.SimpleNamespace(nvmlInit=lambda: None, nvmlShutdown=lambda: None, nvmlDeviceGetCount=lambda: 4)
    monkeypatch.setitem(sys.modules, "pynvml", driver)
    assert visible_gpus({} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}) == count


def test_a_failing_driver_counts_no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail() -> None:
        raise RuntimeError("NVML Shared Library Not Found")

    monkeypatch.setitem(sys.modules, "pynvml", types.SimpleNamespace(nvmlInit=fail, nvmlShutdown=fail))
    assert visible_gpus({}) == 0
