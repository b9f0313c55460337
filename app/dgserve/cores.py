"""How many CPU cores this process may use: its affinity mask, and its cgroup's CPU quota.

``os.cpu_count()`` counts the machine's cores. A container limited with ``docker run
--cpus=2`` or a Kubernetes ``limits.cpu`` sees every core of its host but is held to a
CFS quota: each period (100 ms by default) its threads together may run for the quota,
and then all of them wait for the next period. A pool sized from the host's cores (64
torch threads in a 2-CPU container) spends the quota in the first few milliseconds and
stalls for the rest, and every forward in flight stalls with it. So the thread counts
the server derives (torch's intra-op threads per CPU worker, the decode threads) start
from ``available_cores()``:

* the affinity mask (``taskset``, a cpuset: ``docker run --cpuset-cpus``), then
* the quota of the process's cgroup and of each cgroup above it, since a parent's limit
  binds its children too: cgroup v2's ``cpu.max`` (``"max 100000"`` or ``"150000 100000"``)
  or cgroup v1's ``cpu.cfs_quota_us`` over ``cpu.cfs_period_us`` (-1: none),

rounded down, as Go's automaxprocs does: 1.5 CPUs give 1 thread, which never waits on the
quota, where 2 threads would stall every period. Never less than 1.

``visible_gpus()`` counts the NVIDIA GPUs the process would compute on, for the supervisor
of several server processes, which imports no torch: NVML's count (nvidia-ml-py), narrowed
by ``CUDA_VISIBLE_DEVICES`` as the CUDA runtime narrows it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

__all__ = ["available_cores", "cgroup_quota", "visible_gpus"]

_PROC_CGROUP = Path("/proc/self/cgroup")
_CGROUP_ROOT = Path("/sys/fs/cgroup")


def available_cores(*, proc_cgroup: Path = _PROC_CGROUP, root: Path = _CGROUP_ROOT) -> int:
    """The cores this process may keep busy (see the module's docstring); at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_quota(proc_cgroup=proc_cgroup, root=root)
    if quota is not None:
        cores = min(cores, math.floor(quota))
    return max(1, cores)


def visible_gpus(environ: Mapping[str, str] = os.environ) -> int:
    """NVIDIA GPUs this process would see, without torch or a CUDA context; 0 without a driver.

    ``CUDA_VISIBLE_DEVICES``, when set, lists the GPUs CUDA shows, up to its first entry that
    names none (empty, or negative such as ``-1``).
    """
    listed: int | None = None
    if (visible := environ.get("CUDA_VISIBLE_DEVICES")) is not None:
        entries = [e.strip() for e in visible.split(",")]
        listed = next((i for i, e in enumerate(entries) if not e or e.startswith("-")), len(entries))
        if listed == 0:
            return 0
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            count = int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no driver, no library, no device: nothing to compute on
        return 0
    return count if listed is None else min(count, listed)


def cgroup_quota(*, proc_cgroup: Path = _PROC_CGROUP, root: Path = _CGROUP_ROOT) -> float | None:
    """The tightest CPU quota, in CPUs, on the process's cgroup and those above it; None without one.

    Unreadable or absent files (another OS, no cgroup filesystem) count as no quota.
    """
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    quotas: list[float] = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":  # cgroup v2: one unified tree
            quotas += [q for d in _levels(root, path) if (q := _v2_quota(d)) is not None]
        elif "cpu" in controllers.split(","):  # cgroup v1: the cpu controller's own tree
            mount = next((root / name for name in (controllers, "cpu", "cpu,cpuacct") if (root / name).is_dir()), None)
            if mount is not None:
                quotas += [q for d in _levels(mount, path) if (q := _v1_quota(d)) is not None]
    return min(quotas) if quotas else None


def _levels(mount: Path, path: str) -> list[Path]:
    """The process's cgroup directory and each one above it, up to the mount.

    In a container with its own cgroup namespace the path is ``/`` and the mount is the
    container's cgroup; without one the path is the host's, and the directory is looked
    up under the mount. A path that is not there (a namespace hides it) leaves the mount.
    """
    parts = [p for p in path.strip("/").split("/") if p]
    levels = [mount.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]
    return [d for d in levels if d.is_dir()]


def _v2_quota(directory: Path) -> float | None:
    try:
        quota, _, period = (directory / "cpu.max").read_text().strip().partition(" ")
        return None if quota == "max" else int(quota) / int(period or 100_000)
    except (OSError, ValueError):
        return None


def _v1_quota(directory: Path) -> float | None:
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period
