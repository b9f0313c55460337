"""``run(settings)``, what ``dgserve serve`` calls: one server process, or N on one port
(``DGSERVE_SERVER_PROCESSES=N``).

One interpreter runs the event loop, the decode threads and a Python-heavy forward,
and they take turns on its one GIL (docs/performance.md). N processes have N GILs, as
gunicorn's or uvicorn's workers do. Each child is a whole server (``server.serve``):
its own app, batchers, model replicas, connection guards, admission gate and drain.
What they share:

* the port: each child listens on a socket of its own with ``SO_REUSEPORT``, and the
  kernel spreads new connections across them by a hash of their addresses, as
  nginx's ``reuseport`` does. One socket accepted from by every child balances badly
  with keep-alive clients: whichever child wakes first takes a whole burst of new
  connections and keeps them (measured: one round at 388 images/s, the next at 657).
  A child that dies takes the connections queued on its socket with it, unless the
  kernel hands them on (``migration_advice``);
* the inspection store: SQLite in WAL mode takes writers from several processes, and
  migrates under its write lock when they open it at once; PostgreSQL migrates under an
  advisory lock;
* ``/metrics``: whichever child a scrape reaches merges every child's metrics
  (``api/siblings.py``, ``metrics/merge.py``).

The supervisor, the process ``dgserve serve`` started, imports neither torch nor the
app (a test checks). It:

* reserves the port (bound, not listening, so it takes no connection);
* spawns the children, each in a process group of its own, so a terminal's Ctrl+C
  reaches the supervisor alone and is passed on once; each child dies with it
  (``PR_SET_PDEATHSIG``), even after ``kill -9``;
* restarts a child that dies. Each child listens once its models have loaded, so
  nothing answers on the port while every child is still loading. A child that dies
  before it served (before its models loaded: no ``serving_path`` marker yet),
  ``_START_FAILURES`` times in a row, stops the server with exit status 1: that is a
  broken configuration (a key it refuses, a port it cannot bind, a store it cannot
  open), and restarting it would only loop;
* waits for the orphans of a child that died (its reader and model processes, which
  exit when their pipes to it close). It asks to be their parent
  (``PR_SET_CHILD_SUBREAPER``), as it would be as PID 1 in a container, where nobody
  else would wait for them and they would stay zombies;
* passes SIGTERM and SIGINT on to every child, and waits for them. On SIGTERM each
  child drains as a single server does (``api/drain.py``); the port stops taking
  connections when the last child closes its socket. A child still starting ends by
  the signal itself, and SIGINT ends a child's uvicorn with a ``KeyboardInterrupt``:
  both are clean stops, and the exit status stays 0.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType

from dgserve.api.siblings import Siblings, serving_path, socket_path
from dgserve.settings import Settings

__all__ = ["MIGRATE_REQ_SYSCTL", "configure_logging", "migration_advice", "run", "serve_processes"]

log = logging.getLogger(__name__)

_START_FAILURES = 3
_RESTART_PAUSE_S = 1.0
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
# Past each child's own limits (grace, drain timeout, uvicorn's backstop), a child still
# running is stuck: it is killed.
_STUCK_S = 60.0
# Read at start with several processes (migration_advice); a path the tests read and set too.
MIGRATE_REQ_SYSCTL = Path("/proc/sys/net/ipv4/tcp_migrate_req")


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"
    )


def run(settings: Settings) -> None:
    """Serve ``settings``' models until interrupted: in this process, or in several."""
    configure_logging(settings)
    # "auto" becomes a number here, once, so every process sees how many share the host.
    settings = settings.model_copy(update={"server_processes": settings.server_process_count})
    if settings.server_process_count > 1:
        sys.exit(serve_processes(settings))
    from dgserve.api.server import serve  # the app, torch and all: only where it serves

    serve(settings)


def serve_processes(settings: Settings) -> int:
    """Run ``settings.server_process_count`` servers on one port until a signal; the exit status."""
    count = settings.server_process_count
    reserved = _socket(settings.host, settings.port)  # port 0: the port the children all take
    port = reserved.getsockname()[1]
    runtime = Path(tempfile.mkdtemp(prefix="dgserve-"))
    supervisor = _Supervisor(settings.model_copy(update={"port": port}), runtime)
    log.info("serving on %s:%d from %d processes (their metrics sockets are in %s)", settings.host, port, count, runtime)
    if (advice := migration_advice()) is not None:
        log.warning("%s", advice)
    try:
        return supervisor.run()
    finally:
        reserved.close()
        shutil.rmtree(runtime, ignore_errors=True)


def migration_advice(sysctl: Path = MIGRATE_REQ_SYSCTL) -> str | None:
    """What to set, where the kernel would reset the connections a dying child had queued.

    Each child has its own listening socket. When one dies (OOM, a crash, ``kill -9``), the
    connections the kernel had accepted for it and it had not yet taken are reset, unless
    ``net.ipv4.tcp_migrate_req`` hands them to another socket of the group (Linux 5.14 on,
    per network namespace). The supervisor cannot set it in a container, whose ``/proc/sys``
    is read-only: docker-compose.cpu.yml does, and docs/deploy.md says how on Kubernetes.
    """
    reset = "if a server process dies, the connections the kernel queued for it are reset"
    try:
        value = sysctl.read_text().strip()
    except FileNotFoundError:
        if not sys.platform.startswith("linux"):
            return None  # another kernel: none of this applies
        return f"this kernel has no net.ipv4.tcp_migrate_req (Linux 5.14 has): {reset}"
    except OSError:
        return None  # unreadable: nothing known to say
    if value != "0":
        return None
    return (f"net.ipv4.tcp_migrate_req is 0: {reset}; set it to 1 (sysctl, or the container's sysctls) "
            "to hand them to the other processes")  # fmt: skip


class _Supervisor:
    def __init__(self, settings: Settings, runtime: Path) -> None:
        self.settings = settings
        self.runtime = runtime
        self.children: dict[int, BaseProcess] = {}
        self.start_failures = [0] * settings.server_process_count
        self.signals: list[int] = []  # received, not yet passed on
        self.passed_on: set[int] = set()  # a child that ends by one of these did as it was asked
        self.stopping = False
        self._stuck_at = float("inf")
        self.failed = False
        self._context = multiprocessing.get_context("spawn")

    def run(self) -> int:
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        # A signal also writes a byte here, which wakes the wait below at once.
        wakeup, wakeup_writer = socket.socketpair()
        wakeup.setblocking(False)
        wakeup_writer.setblocking(False)
        previous_fd = signal.set_wakeup_fd(wakeup_writer.fileno())
        _prctl(_PR_SET_CHILD_SUBREAPER, 1)
        try:
            for index in range(self.settings.server_process_count):
                self._start(index)
            while self.children:
                self._pass_signals()
                ready = wait([wakeup, *(child.sentinel for child in self.children.values())], timeout=1.0)
                if wakeup in ready:
                    with contextlib.suppress(BlockingIOError):
                        wakeup.recv(64)
                for index, child in list(self.children.items()):
                    if child.sentinel in ready:
                        self._ended(index, child)
                self._reap_orphans()
                if self.stopping and time.monotonic() > self._stuck_at:
                    self._kill_stuck()
            return 1 if self.failed else 0
        finally:
            signal.set_wakeup_fd(previous_fd)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            wakeup.close()
            wakeup_writer.close()

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        self.signals.append(sig)  # the loop passes it on, outside the handler

    def _pass_signals(self) -> None:
        while self.signals:
            sig = self.signals.pop(0)
            self.passed_on.add(sig)
            if not self.stopping:
                self._stop(f"{signal.Signals(sig).name} received")
            for child in self.children.values():
                _send(child, sig)

    def _stop(self, why: str) -> None:
        log.info("stopping the %d server processes: %s", len(self.children), why)
        self.stopping = True
        s = self.settings
        self._stuck_at = time.monotonic() + s.shutdown_grace_s + s.drain_timeout_s + _STUCK_S

    def _start(self, index: int) -> None:
        socket_path(self.runtime, index).unlink(missing_ok=True)  # it makes its own once its app starts
        serving_path(self.runtime, index).unlink(missing_ok=True)  # and this once it serves
        child = self._context.Process(
            target=_child_main, args=(self.settings, self.runtime, index, os.getpid()),
            name=f"dgserve-server-{index}",
        )  # fmt: skip
        child.start()
        self.children[index] = child

    def _ended(self, index: int, child: BaseProcess) -> None:
        del self.children[index]
        child.join()  # it has ended (its sentinel is ready): this reaps it and sets exitcode
        code = child.exitcode
        if self.stopping:
            if code is not None and code < 0 and -code in self.passed_on:
                # uvicorn re-raises the signal it was passed once it has stopped (and before
                # its handlers are in, the default action ends the process by it).
                log.info("server process %d (pid %s) stopped by %s", index, child.pid, signal.Signals(-code).name)
            elif code == 1 and signal.SIGINT in self.passed_on and not self._served(index):
                # It never served, and SIGINT's KeyboardInterrupt in multiprocessing's
                # start-up, before _child_main can catch it, ends a process with status 1:
                # it did as it was asked. (A crash then, -11 say, still counts as one.)
                log.info("server process %d (pid %s) stopped by SIGINT before it served", index, child.pid)
            elif code != 0:
                log.warning("server process %d (pid %s) ended with exit status %s", index, child.pid, code)
                self.failed = True
            return
        starting = not self._served(index)
        self.start_failures[index] = self.start_failures[index] + 1 if starting else 0
        if self.start_failures[index] >= _START_FAILURES:
            log.error("server process %d (pid %s) died with exit status %s", index, child.pid, code)
            self.failed = True
            self._stop(f"server process {index} died {_START_FAILURES} times in a row before it served")
            for other in self.children.values():
                _send(other, signal.SIGTERM)
            return
        log.error("server process %d (pid %s) died with exit status %s; starting another", index, child.pid, code)
        time.sleep(_RESTART_PAUSE_S)
        self._start(index)

    def _served(self, index: int) -> bool:
        """Whether the child now at ``index`` loaded its models and listened (``Siblings.mark_serving``)."""
        return serving_path(self.runtime, index).exists()

    def _reap_orphans(self) -> None:
        """Wait for every ended process that is not one of the server processes (each of
        those is waited for by ``_ended``, through multiprocessing)."""
        while True:
            own = {child.pid for child in self.children.values()}
            try:
                # WNOWAIT: look first, so a server process that has just ended is left to _ended.
                ended = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:  # no child at all
                return
            if ended is None or ended.si_pid in own:
                return
            with contextlib.suppress(ChildProcessError):
                os.waitpid(ended.si_pid, 0)

    def _kill_stuck(self) -> None:
        for index, child in self.children.items():
            log.error("server process %d (pid %s) did not stop; killing it", index, child.pid)
            _send(child, signal.SIGKILL)
        self.failed = True
        self._stuck_at = float("inf")


def _send(child: BaseProcess, sig: int) -> None:
    if child.pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, sig)


def _socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``(host, port)`` with ``SO_REUSEPORT``, not yet listening."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def _child_main(settings: Settings, runtime: Path, index: int, parent: int) -> None:
    """One server process (spawned: the supervisor's state is not inherited)."""
    try:
        os.setpgid(0, 0)  # the supervisor passes signals on; a terminal's reach it alone
        _die_with(parent)
        from dgserve.api.server import serve

        configure_logging(settings)
        siblings = Siblings(runtime, index, settings.server_process_count)
        # Bound, not listening: uvicorn's server listens once the app has started, so the
        # kernel sends this process no connection before then (see Siblings).
        serve(settings, sockets=[_socket(settings.host, settings.port)], siblings=siblings)
    except KeyboardInterrupt:
        # The SIGINT the supervisor passed on (its own process group keeps a terminal's
        # away): uvicorn re-raises it once it has stopped, and before uvicorn's handlers
        # are in, it is raised wherever this process is (importing torch, say). Asked to
        # stop, it stopped.
        pass


def _die_with(parent: int) -> None:
    """SIGTERM this process when the supervisor dies, so no server outlives it (Linux)."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _prctl(option: int, value: int) -> None:
    """Linux's prctl(2); nothing elsewhere."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(option, value)
