"""ProcessModelWorker: the same answers as ModelWorker for every bundled model, convolutions
laid out as DGSERVE_MEMORY_FORMAT says, a child that dies is replaced (its batch failing with
a 503, never hanging), a broken store fails the load with the store's own error, and closing
leaves no process behind."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
import torch

from dgserve.errors import DGServeError, ShuttingDownError, WorkerCrashedError
from dgserve.serving.process_worker import ProcessModelWorker
from dgserve.serving.worker import ImageResult, MemoryFormat, ModelWorker

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from answers import BUNDLED, STORE, assert_close, photo_items  # noqa: E402
from processes import pid_running  # noqa: E402

pytestmark = pytest.mark.timeout(300)

CPU = torch.device("cpu")


@pytest_asyncio.fixture
async def small() -> AsyncIterator[ProcessModelWorker]:
    worker = ProcessModelWorker(STORE.root, "shapes-dgnet", 1, CPU, name="small", threads=1)
    await worker.start()
    yield worker
    worker.close()
    worker.join()


@pytest.mark.asyncio
@pytest.mark.parametrize("model", BUNDLED)
async def test_same_answers_as_the_thread_worker(model: str) -> None:
    version = STORE.versions(model)[-1]
    remote = ProcessModelWorker(STORE.root, model, version, CPU, name=model, threads=1)
    local = ModelWorker(STORE.load(model, version), CPU, name=model, threads=1)
    try:
        await remote.start()
        assert remote.manifest == local.manifest
        batch = photo_items(model)
        theirs: list[ImageResult] = await remote(batch)
        ours: list[ImageResult] = await local(batch)
        assert len(theirs) == len(ours) == len(batch)
        for r, o in zip(theirs, ours, strict=True):
            assert_close(r.predictions, o.predictions)
            assert_close(json.loads(r.connectivity_json), json.loads(o.connectivity_json))
            assert_close(r.connectivity, o.connectivity)
            assert type(r.record) is type(o.record)
    finally:
        remote.close()
        local.close()
        remote.join()


@pytest.mark.asyncio
@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
async def test_the_child_lays_out_its_convolutions_as_the_setting_says(memory_format: MemoryFormat) -> None:
    """Bit for bit what a thread worker with the same DGSERVE_MEMORY_FORMAT computes, and not
    what one with the other computes (the layouts round the convolutions differently)."""
    other: MemoryFormat = "channels_last" if memory_format == "contiguous" else "contiguous"
    remote = ProcessModelWorker(STORE.root, "shapes-dgnet", 1, CPU, name="layout", threads=1,
                                memory_format=memory_format)  # fmt: skip
    same = ModelWorker(STORE.load("shapes-dgnet", 1), CPU, name="same", threads=1, memory_format=memory_format)
    different = ModelWorker(STORE.load("shapes-dgnet", 1), CPU, name="different", threads=1, memory_format=other)
    try:
        await remote.start()
        batch = photo_items("shapes-dgnet")
        theirs = [(r.predictions, r.connectivity_json) for r in await remote(batch)]
        assert theirs == [(r.predictions, r.connectivity_json) for r in await same(batch)]
        assert theirs != [(r.predictions, r.connectivity_json) for r in await different(batch)]
    finally:
        remote.close()
        same.close()
        different.close()
        remote.join()


@pytest.mark.asyncio
async def test_a_child_killed_between_batches_is_replaced(small: ProcessModelWorker) -> None:
    first = small.pid
    assert first is not None and pid_running(first)
    os.kill(first, signal.SIGKILL)
    await asyncio.to_thread(_wait_dead, first)
    [result] = await small(photo_items("shapes-dgnet", 1))
    assert result.predictions
    assert small.restarts == 1 and small.pid not in (None, first)


@pytest.mark.asyncio
async def test_a_child_killed_mid_batch_fails_that_batch_with_a_503_then_serves(small: ProcessModelWorker) -> None:
    # A batch long enough that the kill lands while the child computes it: the batch
    # fails cleanly instead of hanging. (A child found dead before a batch reaches it is
    # replaced and the batch sent to the new one: the other test.)
    big = photo_items("shapes-dgnet", 1) * 600  # 29 MB to send, then seconds of compute
    pid = small.pid
    assert pid is not None
    idle = _cpu_ticks(pid)
    call = asyncio.ensure_future(small(big))
    while _cpu_ticks(pid) < idle + 30 and not call.done():  # it has the batch and computes
        await asyncio.sleep(0.01)
    assert not call.done(), "the batch finished before the kill; make it larger"
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(WorkerCrashedError) as caught:
        await asyncio.wait_for(call, 60)
    assert caught.value.status_code == 503 and caught.value.code == "worker_crashed"
    assert "Retry-After" in caught.value.headers
    [result] = await small(photo_items("shapes-dgnet", 1))
    assert result.predictions and small.restarts == 1


@pytest.mark.asyncio
async def test_a_broken_store_fails_the_load_with_the_stores_error(tmp_path: Path) -> None:
    root = tmp_path / "store"
    shutil.copytree(STORE.root / "shapes-dgnet", root / "shapes-dgnet")
    [weights] = (root / "shapes-dgnet").rglob("*.safetensors")
    weights.write_bytes(weights.read_bytes()[:-16] + b"\0" * 16)
    worker = ProcessModelWorker(root, "shapes-dgnet", 1, CPU, name="broken", threads=1)
    with pytest.raises(DGServeError) as caught:
        await worker.start()
    assert caught.value.code == "invalid_weights" and "sha256" in caught.value.message
    worker.close()


@pytest.mark.asyncio
async def test_close_leaves_no_process_behind(small: ProcessModelWorker) -> None:
    pid = small.pid
    assert pid is not None and pid_running(pid)
    small.close()
    small.join()
    assert not pid_running(pid)
    with pytest.raises(ShuttingDownError):
        await small(photo_items("shapes-dgnet", 1))


def test_the_child_exits_when_its_parent_goes_away() -> None:
    """The child's only tie is its pipe: when the pipe closes (the server died), it exits."""
    import socket
    import subprocess

    ours, theirs = socket.socketpair()
    spec = {"store": str(STORE.root), "model": "shapes-dgnet", "version": 1, "device": "cpu", "threads": 1,
            "fd": theirs.fileno()}  # fmt: skip
    child = subprocess.Popen(
        [sys.executable, "-m", "dgserve.serving.process_worker", json.dumps(spec)], pass_fds=(theirs.fileno(),)
    )
    theirs.close()
    ours.settimeout(120)
    assert ours.recv(1)  # it loaded and said so
    ours.close()  # what the parent's death does to the pipe
    assert child.wait(60) == 0


def _cpu_ticks(pid: int) -> int:
    """User plus system CPU time of ``pid``, in clock ticks (/proc/PID/stat fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().split(")")[-1].split()
    return int(fields[11]) + int(fields[12])


def _wait_dead(pid: int) -> None:
    deadline = time.monotonic() + 10
    while pid_running(pid) and time.monotonic() < deadline:
        time.sleep(0.01)


def test_wire_items_carry_numpy_not_torch() -> None:
    from dgserve.serving.process_worker import _from_wire, _to_wire

    [item] = photo_items("shapes-dgnet", 1)
    wire = _to_wire(item)
    assert isinstance(wire.tensor, np.ndarray)
    assert torch.equal(_from_wire(wire).tensor, item.tensor)


@pytest.mark.asyncio
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
async def test_a_cpu_child_runs_nicer_than_the_event_loop() -> None:
    """DGSERVE_COMPUTE_NICE reaches a replica in a process as it does a worker thread."""
    worker = ProcessModelWorker(STORE.root, "shapes-dgnet", 1, CPU, name="nice", threads=1, nice=6)
    try:
        await worker.start()
        assert worker.pid is not None
        assert os.getpriority(os.PRIO_PROCESS, worker.pid) == min(19, os.getpriority(os.PRIO_PROCESS, 0) + 6)
        assert len(await worker(photo_items("shapes-dgnet", 2))) == 2
    finally:
        worker.close()
        worker.join()


@pytest.mark.asyncio
async def test_a_compiling_child_answers_as_an_eager_thread_worker() -> None:
    """DGSERVE_TORCH_COMPILE reaches the child, whose manifest then says the forward is compiled."""
    # Batches of one: one graph to compile in the child (tests/serving/test_worker.py serves more).
    remote = ProcessModelWorker(STORE.root, "shapes-dgnet", 1, CPU, name="compiled", threads=1,
                                torch_compile=True, max_batch_size=1)  # fmt: skip
    local = ModelWorker(STORE.load("shapes-dgnet", 1), CPU, name="eager", threads=1)
    try:
        await remote.start()
        assert remote.manifest is not None and remote.manifest.torch_compile
        batch = photo_items("shapes-dgnet", 1)
        theirs = await remote(batch)
        for r, o in zip(theirs, local.infer_batch(batch), strict=True):
            assert_close(r.predictions, o.predictions)
            assert_close(r.connectivity, o.connectivity)
    finally:
        remote.close()
        local.close()
        remote.join()
