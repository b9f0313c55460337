"""A real ``dgserve serve`` process on a free port, for tests that need the real HTTP
server (uvicorn and its connection handling) rather than the app in-process, or that
kill it.

``ServerProcess(env).start()`` starts it serving the bundled ``shapes-dgnet`` (the
smallest model) and waits for ``/readyz``; ``kill()`` is ``kill -9``, ``kill_all()`` is
``kill -9`` of every process it started; ``stop()`` asks it to shut down. The log goes to
a file, shown when it fails to start.

It runs one server process (``DGSERVE_SERVER_PROCESSES=1``) unless ``env`` says otherwise:
most tests are about one server's behaviour, and ``auto`` would start two on this
machine. Tests of several processes, and of the default, ask for them.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

__all__ = ["ServerProcess", "free_port"]

READY_TIMEOUT_S = 180.0


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
        """TCP sockets in LISTEN (state 0A) on its port, from the kernel's tables: one per
        server process that has opened its listener."""
        count = 0
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with open(table) as lines:
                next(lines)  # the header
                for line in lines:
                    fields = line.split()
                    local, state = fields[1], fields[3]
                    count += state == "0A" and int(local.rsplit(":", 1)[1], 16) == self.port
        return count

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""

    def kill(self) -> None:
        """``kill -9``: no shutdown, no flush."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def kill_all(self) -> None:
        """``kill -9`` of its whole session at once: the supervisor and every server process."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

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
