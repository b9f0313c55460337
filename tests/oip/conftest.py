"""A real ``dgserve serve`` on free ports, for the protocol clients to talk to."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass


import httpx
import pytest

from dgserve.data.scenes import render_classification, render_detection_scene

MODELS = "shapes-dgnet,shapes-glore,shapes-detector"
MAX_IMAGES = 8


@dataclass(frozen=True)
class Server:
    http: str  # host:port, as tritonclient takes it
    grpc: str

    @property
    def base(self) -> str:
        return f"http://{self.http}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    http_port, grpc_port = _free_port(), _free_port()
    env = {
        **os.environ, "DGSERVE_HOST": "127.0.0.1", "DGSERVE_PORT": str(http_port), "DGSERVE_GRPC_PORT": str(grpc_port),
        "DGSERVE_DATA_DIR": str(tmp_path_factory.mktemp("oip-data")), "DGSERVE_MODELS": MODELS,
        "DGSERVE_TORCH_THREADS": "1", "DGSERVE_MAX_IMAGES_PER_REQUEST": str(MAX_IMAGES), "DGSERVE_ACCESS_LOG": "false",
    }  # fmt: skip
    log = tmp_path_factory.mktemp("oip-log") / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", "from dgserve.cli import main; main()", "serve"], env=env,
                                stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{http_port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not become ready:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield Server(f"127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _png(image: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")  # type: ignore[attr-defined]
    return buf.getvalue()


@pytest.fixture(scope="session")
def shapes() -> list[bytes]:
    """Three encoded shape images of known classes, at the classifiers' size."""
    return [_png(render_classification(11, i, 64)[0]) for i in range(3)]


@pytest.fixture(scope="session")
def scenes() -> list[bytes]:
    """Two encoded detection scenes, larger than the detector's input (boxes map back)."""
    return [_png(render_detection_scene(5, i, 160, 3).image) for i in range(2)]


