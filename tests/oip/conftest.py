"""A real ``dgserve serve`` on free ports, for the protocol clients to talk to."""

from __future__ import annotations

import io
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "api"))
from server_process import ServerProcess, free_port  # noqa: E402

from dgserve.data.scenes import render_classification, render_detection_scene

MODELS = "shapes-dgnet,shapes-glore,shapes-detector,shapes-segmenter"
MAX_IMAGES = 8


@dataclass(frozen=True)
class Server:
    http: str  # host:port, as tritonclient takes it
    grpc: str

    @property
    def base(self) -> str:
        return f"http://{self.http}"


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    grpc_port = free_port()
    env = {"DGSERVE_GRPC_PORT": str(grpc_port), "DGSERVE_MODELS": MODELS, "DGSERVE_DECODE_THREADS": "2",
           "DGSERVE_MAX_IMAGES_PER_REQUEST": str(MAX_IMAGES)}  # fmt: skip
    with ServerProcess(tmp_path_factory.mktemp("oip-data"), env) as proc:
        yield Server(f"127.0.0.1:{proc.port}", f"127.0.0.1:{grpc_port}")


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


