"""A real PostgreSQL for the tests: the one ``DGSERVE_TEST_POSTGRES_URL`` names, or one
started here from Debian's binaries (``apt-get install postgresql``).

``PostgresServer`` is a throwaway cluster in its own directory under /tmp, listening on
127.0.0.1 and a Unix socket there; as root it runs as the ``postgres`` user, because
``initdb`` refuses root. Tests that stop and start the database get their own.
Without a server, ``unavailable`` fails the test in CI (``CI=true``), where PostgreSQL
is part of the set-up, and skips it elsewhere, saying why.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import NoReturn

import psycopg
import pytest

__all__ = [
    "ENV",
    "PostgresServer",
    "create_schema",
    "drop_schema",
    "find_bin_dir",
    "free_port",
    "unavailable",
    "with_schema",
]

ENV = "DGSERVE_TEST_POSTGRES_URL"
_DEBIAN_BINARIES = Path("/usr/lib/postgresql")
# Crash safety is not what these tests check; without fsync, initdb and commits are fast.
_SERVER_OPTIONS = "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"


def unavailable(reason: str) -> NoReturn:
    """A test that needs PostgreSQL and has none: a failure in CI, a skip elsewhere."""
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(f"PostgreSQL is needed in CI: {reason}", pytrace=False)
    pytest.skip(f"no PostgreSQL: {reason}")


def find_bin_dir() -> Path | None:
    """The newest Debian PostgreSQL's bin directory, else the one holding ``initdb`` on PATH."""
    versions = sorted(
        (p for p in _DEBIAN_BINARIES.glob("*/bin") if (p / "initdb").is_file()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    if versions:
        return versions[-1]
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PostgresServer:
    """A PostgreSQL cluster of its own, for tests that stop and start the database."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="dgserve-pg-", dir="/tmp"))
        self.data = self.root / "data"
        self._user = "postgres" if os.geteuid() == 0 else None
        if self._user is not None:
            entry = pwd.getpwnam(self._user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self.running = False

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        command = [str(self.bin_dir / args[0]), *args[1:]]
        if self._user is not None:
            command = ["runuser", "-u", self._user, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            log = self.root / "log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"{' '.join(args[:1])} failed ({done.returncode}): {done.stderr.strip()}\n{tail}")

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-N", "-E", "UTF8", "--no-locale")

    def start(self) -> None:
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} {_SERVER_OPTIONS}"
        log = str(self.root / "log")
        self._run("pg_ctl", "-D", str(self.data), "-l", log, "-o", options, "-w", "-t", "60", "start")
        self.running = True

    def stop(self) -> None:
        """A fast shutdown: clients are disconnected, as when a database is restarted."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")
        self.running = False

    def close(self) -> None:
        try:
            if self.running:
                self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def with_schema(url: str, schema: str) -> str:
    """``url`` with ``schema`` as the search path, so the store's tables go there."""
    return f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{schema}"


def create_schema(url: str) -> str:
    """A new, empty schema in the database at ``url``; returns its name."""
    schema = f"dgserve_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    return schema


def drop_schema(url: str, schema: str) -> None:
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
