"""Model workers in processes of their own (``DGSERVE_MODEL_WORKERS=process``).

A ``ModelWorker`` computes in a thread of the server's process, so its forward pass
takes turns on one GIL with the event loop, the decode threads and the store's
writer. For a model whose forward is mostly Python (a small DG-Net routes and skips
per node) that turn-taking is most of the cost, and under overload the event loop,
busy refusing requests, starves the model outright. ``ProcessModelWorker`` is the
same batch handler with the replica in a child process, as Triton's Python backend
and LitServe place theirs: the child has its own interpreter, so the model computes
at its own pace whatever the event loop is doing.

What crosses the pipe, and why it is cheap:

* to the child: each item's tensor as a NumPy array (pickle protocol 5 copies its
  bytes once; a torch tensor would go through ``torch.save``), with its image info,
  options and the task's context;
* back: ``ImageResult`` as ``ModelWorker.infer_batch`` made it. The child also
  serialises the connectivity JSON, which moves that work out of the server too.

The child is the same ``ModelWorker`` code (``infer_batch``), loaded from the same
store with the same checks, so the two modes give identical answers. A child that
dies (killed, out of memory) fails the batch it held with a 503 ``worker_crashed``
and is started again before the next batch; a child whose parent dies sees its pipe
close and exits, so no process outlives the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import json
import logging
import multiprocessing.connection
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dgserve.allocator import keep_large_blocks
from dgserve.errors import DGServeError, RetryableError, ShuttingDownError, WorkerCrashedError
from dgserve.model_store import Manifest, ModelStore
from dgserve.model_store.manifest import Precision
from dgserve.models.connectivity import describe_graph
from dgserve.serving.threads import compute_thread
from dgserve.serving.worker import ImageResult, MemoryFormat, ModelWorker
from dgserve.tasks import ImageInfo, InferenceItem, get_task

__all__ = ["ProcessModelWorker"]

log = logging.getLogger(__name__)

# How long a child may take to import torch, read and verify its weights and warm up.
_START_TIMEOUT_S = 300.0
# How long a child asked to exit gets before it is killed.
_EXIT_TIMEOUT_S = 5.0


@dataclasses.dataclass(frozen=True)
class _Ready:
    manifest: Manifest
    graph: dict[str, Any]
    pid: int


@dataclasses.dataclass(frozen=True)
class _Failed:
    """An error in the child: a ``DGServeError``'s code and status, or (``status`` None) anything else."""

    code: str
    message: str
    status: int | None
    retry_after_s: float | None = None

    @classmethod
    def of(cls, exc: BaseException) -> _Failed:
        if isinstance(exc, DGServeError):
            retry = exc.retry_after_s if isinstance(exc, RetryableError) else None
            return cls(exc.code, exc.message, exc.status_code, retry)
        return cls(type(exc).__name__, f"{type(exc).__name__}: {exc}", None)

    def error(self) -> Exception:
        """The child's error as the parent raises it: same code, status and message."""
        if self.status is None:
            # Unexpected: the app's handler logs it with the request id and answers a plain 500.
            return RuntimeError(f"model worker process: {self.message}")
        error = RetryableError(self.message, self.retry_after_s) if self.retry_after_s is not None else DGServeError(
            self.message
        )
        error.code, error.status_code = self.code, self.status
        return error


def _child_env() -> dict[str, str]:
    # OpenMP threads that spin while waiting for work take the cores from the server's
    # own process (and from each other on a busy machine): a batch of a small model
    # went from 30 ms to 600 ms with two spinning threads on two shared cores.
    return {"OMP_WAIT_POLICY": "PASSIVE", **os.environ}


# pickle is safe on this pipe, and only here: its two ends are a socketpair this process
# made, one kept, the other passed to the child it started (pass_fds), so nothing but the
# server and its own child can write to it. Nothing read from a client or a file is unpickled.
def _dumps(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=5)


def _to_wire(item: InferenceItem) -> InferenceItem:
    return dataclasses.replace(item, tensor=item.tensor.numpy())  # type: ignore[arg-type]


def _from_wire(item: InferenceItem) -> InferenceItem:
    array: np.ndarray = item.tensor  # type: ignore[assignment]
    return dataclasses.replace(item, tensor=torch.from_numpy(array))


class ProcessModelWorker:
    """One replica of one model version on one device, in a child process; an async batch handler."""

    def __init__(
        self,
        store_root: Path,
        model: str,
        version: int,
        device: torch.device,
        *,
        name: str,
        threads: int | None,
        nice: int = 0,
        precision: Precision | None = None,
        memory_format: MemoryFormat = "channels_last",
        torch_compile: bool | None = None,
        max_batch_size: int | None = None,
        malloc_keep_large_blocks: bool = True,
    ) -> None:
        self.store_root = store_root
        self.malloc_keep_large_blocks = malloc_keep_large_blocks
        self.model = model
        self.version = version
        self.device = device
        self.name = name
        self.threads = threads
        self.nice = nice
        self.precision = precision
        self.memory_format = memory_format
        self.torch_compile = torch_compile
        self.max_batch_size = max_batch_size
        self.manifest: Manifest | None = None
        self.graph: dict[str, Any] | None = None
        self.pid: int | None = None
        self.restarts = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._conn: multiprocessing.connection.Connection | None = None
        self._closed = False
        self._closer: threading.Thread | None = None
        self._lock = threading.Lock()  # one batch on the pipe at a time; close() waits for it
        # Pickling, the pipe and unpickling block: they run in this thread, never on the loop.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    async def start(self) -> None:
        """Start the child and wait until its replica is loaded; raises what the load raised."""
        await asyncio.get_running_loop().run_in_executor(self._executor, self._start)

    async def __call__(self, items: list[InferenceItem]) -> list[ImageResult]:
        if self._closed:
            raise ShuttingDownError(f"{self.name} is closed")
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.infer_batch, items)

    async def warm_up(self) -> float:
        """Run one dummy batch (results discarded); returns the seconds it took."""
        assert self.manifest is not None, "start() first"
        task = get_task(self.manifest.task)
        height, width = self.manifest.preprocessing.input_size
        tensor, context = task.prepare(Image.new("RGB", (width, height)), self.manifest.preprocessing)
        dummy = InferenceItem(tensor, ImageInfo(None, width, height), task.Options(), context)
        started = time.perf_counter()
        await self([dummy])
        return time.perf_counter() - started

    def close(self) -> None:
        """Ask the child to exit (killed after a few seconds), without waiting on the event loop."""
        if self._closed:
            return
        self._closed = True
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._closer = threading.Thread(target=self._stop_child, name=f"{self.name}-close", daemon=True)
        self._closer.start()

    def join(self, timeout: float = _EXIT_TIMEOUT_S + 1.0) -> None:
        """After ``close``: wait until the child has exited (tests, and a clean exit)."""
        if self._closer is not None:
            self._closer.join(timeout)

    # --- runs in the worker's thread -------------------------------------------

    def infer_batch(self, items: Sequence[InferenceItem]) -> list[ImageResult]:
        with self._lock:
            if self._closed:
                raise ShuttingDownError(f"{self.name} is closed")
            if not self._child_alive():
                self._restart()  # it died between batches: this batch has lost nothing
            assert self._conn is not None
            payload = _dumps([_to_wire(i) for i in items])
            try:
                self._conn.send_bytes(payload)
            except OSError:
                self._restart()  # it died before it got the batch
                assert self._conn is not None
                self._conn.send_bytes(payload)
            try:
                reply = pickle.loads(self._conn.recv_bytes())
            except (EOFError, OSError) as exc:
                self._discard_child()
                raise WorkerCrashedError(
                    f"{self.name}: the model worker process died computing this batch ({type(exc).__name__})"
                ) from None
        if isinstance(reply, _Failed):
            raise reply.error()
        return reply  # type: ignore[no-any-return]

    def _child_alive(self) -> bool:
        if self._conn is None or self._process is None or self._process.poll() is not None:
            return False
        # The child never speaks unasked: a readable pipe between batches means it closed.
        return not self._conn.poll(0)

    def _start(self) -> None:
        with self._lock:
            self._spawn()

    def _restart(self) -> None:
        self.restarts += 1
        log.warning("%s: model worker process is gone; starting another (restart %d)", self.name, self.restarts)
        self._discard_child()
        self._spawn()

    def _spawn(self) -> None:
        # A plain ``python -m`` child, not multiprocessing's spawn: that one re-runs the
        # parent's ``__main__`` (a test runner's, a user's script), which is not ours to run.
        ours, theirs = socket.socketpair()
        spec = json.dumps({"store": str(self.store_root), "model": self.model, "version": self.version,
                           "device": str(self.device), "threads": self.threads, "nice": self.nice,
                           "precision": self.precision, "memory_format": self.memory_format,
                           "torch_compile": self.torch_compile, "max_batch_size": self.max_batch_size,
                           "keep_large_blocks": self.malloc_keep_large_blocks, "fd": theirs.fileno()})  # fmt: skip
        with theirs:
            process = subprocess.Popen(
                [sys.executable, "-m", "dgserve.serving.process_worker", spec],
                pass_fds=(theirs.fileno(),),
                env=_child_env(),
            )
        conn = multiprocessing.connection.Connection(ours.detach())
        self._process, self._conn = process, conn
        if not conn.poll(_START_TIMEOUT_S):
            self._discard_child()
            raise WorkerCrashedError(f"{self.name}: the model worker did not start in {_START_TIMEOUT_S:.0f} s")
        try:
            ready = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            self._discard_child()
            raise WorkerCrashedError(
                f"{self.name}: the model worker exited while loading (exit code {process.returncode})"
            ) from None
        if isinstance(ready, _Failed):
            self._discard_child()
            raise ready.error()
        self.manifest, self.graph, self.pid = ready.manifest, ready.graph, ready.pid

    def _discard_child(self) -> None:
        conn, process = self._conn, self._process
        self._conn = self._process = None
        if conn is not None:
            conn.close()
        if process is not None:
            try:
                process.wait(_EXIT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def _stop_child(self) -> None:
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(OSError):
                    self._conn.send_bytes(_dumps(None))
            self._discard_child()


# --- the child process ------------------------------------------------------------------


def _child_main(spec: dict[str, Any]) -> None:
    """Load the replica, say so, then compute every batch the pipe brings until told to stop."""
    conn = multiprocessing.connection.Connection(spec["fd"])
    if spec.get("keep_large_blocks", True):
        keep_large_blocks()
    if spec["threads"] is not None:  # a CPU replica: as a worker thread would be (serving/threads.py)
        compute_thread(spec["threads"], spec.get("nice", 0))
    device = torch.device(spec["device"])
    try:
        loaded = ModelStore(Path(spec["store"])).load(spec["model"], spec["version"], device)
        worker = ModelWorker(loaded, device, name=f"{spec['model']}-v{spec['version']}", threads=None,
                             precision=spec.get("precision"), memory_format=spec["memory_format"],
                             torch_compile=spec.get("torch_compile"), max_batch_size=spec.get("max_batch_size"))  # fmt: skip
        if worker.manifest.torch_compile:
            # Compiled before the child says it is ready, so a child started again after a
            # crash is as warm as the first one, whatever DGSERVE_WARMUP says.
            worker.run_warm_up()
        conn.send_bytes(_dumps(_Ready(worker.manifest, describe_graph(loaded.model), os.getpid())))
    except Exception as exc:  # the parent raises it as the load's failure
        conn.send_bytes(_dumps(_Failed.of(exc)))
        return
    # The replica lives as long as this process: out of the cyclic GC's walks, as in the
    # server's own process (ServingService.freeze_after_load).
    gc.collect()
    gc.freeze()
    while True:
        try:
            message = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return  # the server is gone
        if message is None:
            return
        try:
            reply: Any = worker.infer_batch([_from_wire(i) for i in message])
        except Exception as exc:
            if not isinstance(exc, DGServeError):
                log.exception("%s: batch failed", worker.name)
            reply = _Failed.of(exc)
        conn.send_bytes(_dumps(reply))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Through the module's importable name: what the child pickles must unpickle in the parent.
    from dgserve.serving import process_worker

    process_worker._child_main(json.loads(sys.argv[1]))
