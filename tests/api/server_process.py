"""A real ``dgserve serve`` process on a free port, for tests that need the real HTTP
server (uvicorn and its connection handling) rather than the app in-process, or that
kill it.

``ServerProcess(env).start()`` starts it serving the bundled ``shapes-dgnet`` (the
smallest model) and waits for ``/readyz``; ``kill()`` is ``kill -9``, ``kill_all()`` is
``kill -9`` of every process it started, server processes included; ``stop()`` asks it
to shut down. The log goes to a file, shown when it fails to start.

It runs one server process (``DGSERVE_SERVER_PROCESSES=1``) unless ``env`` says otherwise:
most tests are about one server's behaviour, and ``auto`` would start two on this
machine. Tests of several processes, and of the default, ask for them.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).parents[1]))
sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
from processes import pid_running  # noqa: E402
from serve_throughput import listeners, server_children, tree_pids  # noqa: E402

__all__ = ["ServerProcess", "free_port", "requests_answered", "server_children"]

READY_TIMEOUT_S = 180.0


def _own_metrics(sock_path: Path) -> str:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(sock_path))
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode()


def requests_answered(exposition: str, endpoint: str = "/v1/models/{name}/classify") -> float:
    """``dgserve_requests_total`` of ``endpoint`` in a Prometheus exposition."""
    return sum(
        s.value for f in text_string_to_metric_families(exposition) for s in f.samples
        if s.name == "dgserve_requests_total" and s.labels.get("endpoint") == endpoint
    )  # fmt: skip



def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """``dgserve serve`` with ``env`` (``DGSERVE_*`` values) on top of quiet test defaults."""

    def __init__(self, data_dir: Path, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.env = {
            **os.environ, "DGSERVE_HOST": "127.0.0.1", "DGSERVE_PORT": str(self.port), "DGSERVE_GRPC_PORT": "off",
            "DGSERVE_DATA_DIR": str(data_dir), "DGSERVE_MODELS": "shapes-dgnet", "DGSERVE_TORCH_THREADS": "1",
            "DGSERVE_DECODE_THREADS": "1", "DGSERVE_ACCESS_LOG": "false", "DGSERVE_SERVER_PROCESSES": "1",
            **(env or {}),
        }  # fmt: skip
        self.log = data_dir / f"server-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait_ready: bool = True) -> ServerProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", "from dgserve.cli import main; main()", "serve"],
                env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if httpx.get(f"{self.base}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dgserve did not become ready:\n{self.log_text()}")
            time.sleep(0.2)

    def listeners(self) -> int:
        """Sockets listening on its port: one per server process that has opened its listener."""
        return listeners(self.port)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""

    def kill(self) -> None:
        """``kill -9``: no shutdown, no flush."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def kill_all(self) -> None:
        """``kill -9`` of the whole tree at once: the supervisor, each server process (each in
        a process group of its own) and their children. All are stopped first, so none runs
        a handler (a server process's SIGTERM on its parent's death) before the SIGKILL."""
        if self.proc is None or self.proc.poll() is not None:
            return
        tree = tree_pids(self.proc.pid)  # the supervisor first
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            for pid in tree:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        self.proc.wait()
        deadline = time.monotonic() + 30
        while any(pid_running(pid) for pid in tree[1:]):
            assert time.monotonic() < deadline, f"still running after kill -9: {tree}"
            time.sleep(0.05)

    def connections_per_process(self) -> list[int]:
        """Established connections on its port that each server process holds, from the
        kernel's tables and each process's open sockets."""
        assert self.proc is not None
        established: set[str] = set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with open(table) as lines:
                next(lines)  # the header
                for line in lines:
                    fields = line.split()
                    if fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == self.port:
                        established.add(f"socket:[{fields[9]}]")
        counts = []
        for pid in server_children(self.proc.pid) or [self.proc.pid]:
            links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir() if fd.is_symlink()]
            counts.append(sum(link in established for link in links))
        return counts

    def requests_per_process(self) -> list[float]:
        """Requests each server process has answered, from its own metrics over its socket
        in the supervisor's runtime directory (several processes only)."""
        found = re.search(r"metrics sockets are in ([^\s)]+)", self.log_text())
        assert found is not None, self.log_text()
        sockets = sorted(Path(found[1]).glob("metrics-*.sock"))
        return [requests_answered(_own_metrics(path)) for path in sockets]

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            self.kill()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
