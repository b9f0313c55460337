"""A real model store, real apps and real encoded images for the API tests.

The store is built once per session from registered architectures with random
weights (throughput and plumbing do not depend on the weights): a DG-Net ResNet-18
classifier, a GloRe ResNet-50 classifier, a DG-Net Faster R-CNN and a GloRe FCN
segmenter, all at tiny input sizes. ``main_client`` serves all three for the whole session; tests that need odd
settings (tiny queues, a blocked worker, a broken store) start their own app with
``running(...)``, serving only the small classifier.

ASGITransport does not run the lifespan, so ``running`` drives
``app.router.lifespan_context`` itself.
"""

from __future__ import annotations

import asyncio
import io
import shutil
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
import torch
from fastapi import FastAPI
from PIL import Image

from dgserve.api.deps import AppState
from dgserve.api.app import create_app
from dgserve.models.registry import create_model
from dgserve.serving.served_models import ServedModel
from dgserve.serving.worker import ImageResult
from dgserve.tasks import InferenceItem
from dgserve.settings import Settings
from dgserve.model_store import ModelStore

LABELS = ["cat", "dog", "bird"]
PRE_64 = {"input_size": [64, 64], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
MAIN_MODELS = ["clf", "glore", "det"]
MAX_BODY = 300_000
MAX_PIXELS = 100_000
READY_TIMEOUT_S = 300.0


def encode(fmt: str = "JPEG", size: tuple[int, int] = (48, 40), seed: int = 0) -> bytes:
    """A noisy RGB image (so predictions differ between images) encoded as ``fmt``."""
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=gen, dtype=torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, fmt)
    return buf.getvalue()


Encode = Callable[..., bytes]
Running = Callable[..., Any]


@pytest.fixture(scope="session")
def image() -> Encode:
    """``image(fmt="JPEG", size=(w, h), seed=0) -> bytes``."""
    return encode


@pytest.fixture(scope="session")
def run_app() -> Running:
    """``async with run_app(settings, wait_ready=True) as (app, client)``."""
    return running


@pytest.fixture(scope="session")
def make_settings(store_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Settings]:
    """Settings for the session store, serving only "clf", with a fresh data dir."""

    def make(**overrides: Any) -> Settings:
        overrides.setdefault("model_store", store_root)
        return settings_for(overrides.pop("model_store"), tmp_path_factory.mktemp("data"), **overrides)

    return make


@pytest.fixture(scope="session")
def store_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("model_store")
    store = ModelStore(root)
    torch.manual_seed(0)
    store.save(
        create_model("dgnet_resnet18", num_classes=3),
        name="clf", architecture="dgnet_resnet18", arch_kwargs={"num_classes": 3}, labels=LABELS,
        preprocessing=PRE_64, batching={"max_batch_size": 4, "max_delay_ms": 20},
    )
    store.save(
        create_model("glore_resnet50", num_classes=3),
        name="glore", architecture="glore_resnet50", arch_kwargs={"num_classes": 3}, labels=LABELS,
        preprocessing=PRE_64,
    )
    # box_score_thresh=0 so that random weights still give boxes to check.
    det_kwargs = {"num_classes": 3, "min_size": 128, "max_size": 160, "frozen_bn": False,
                  "box_score_thresh": 0.0, "box_detections_per_img": 20}
    store.save(
        create_model("fasterrcnn_dgnet_resnet50_fpn", **det_kwargs),
        name="det", architecture="fasterrcnn_dgnet_resnet50_fpn", arch_kwargs=det_kwargs, labels=["ball", "box"],
        preprocessing={**PRE_64, "input_size": [128, 128], "resize": "letterbox"},
        thresholds={"score_threshold": 0.0, "max_detections": 10},
    )
    # A GloRe FCN segmenter, letterboxed like the bundled one; served by tests/api/test_segment.py.
    store.save(
        create_model("fcn_glore_resnet_slim", num_classes=3),
        name="seg", architecture="fcn_glore_resnet_slim", arch_kwargs={"num_classes": 3},
        labels=["background", "disc", "bar"], preprocessing={**PRE_64, "resize": "letterbox"},
    )
    return root


def settings_for(root: Path, data_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "model_store": root, "data_dir": data_dir, "models": ["clf"], "max_body_bytes": MAX_BODY,
        "max_image_pixels": MAX_PIXELS, "decode_threads": 2, "torch_threads": 2, "grpc_port": None,
    }
    values.update(overrides)
    return Settings(**values)


@asynccontextmanager
async def running(settings: Settings, *, wait_ready: bool = True) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as client:
            if wait_ready:
                await until_ready(client)
            yield app, client


async def until_ready(client: httpx.AsyncClient, timeout: float = READY_TIMEOUT_S) -> None:
    async def poll() -> None:
        while (await client.get("/readyz")).status_code != 200:
            await asyncio.sleep(0.05)

    await asyncio.wait_for(poll(), timeout)


def state_of(app: FastAPI) -> AppState:
    state: AppState = app.state.dgserve
    return state


def served(app: FastAPI, name: str = "clf") -> ServedModel:
    return state_of(app).service.models.lookup(name)


class Gate:
    """Blocks a model's worker thread in ``infer_batch`` until opened; records batches."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.batches: list[list[InferenceItem]] = []

    def install(self, model: ServedModel) -> None:
        for worker in model.workers:
            original: Callable[[Sequence[InferenceItem]], list[ImageResult]] = worker.infer_batch

            def blocked(items: Sequence[InferenceItem], run: Any = original) -> list[ImageResult]:
                self.batches.append(list(items))
                self.event.wait(timeout=60)
                return run(items)

            worker.infer_batch = blocked  # type: ignore[method-assign]

    def open(self) -> None:
        self.event.set()


@pytest.fixture
def gate() -> Iterator[Gate]:
    g = Gate()
    yield g
    g.open()  # never leave a worker thread blocked


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def main_app(
    store_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    settings = settings_for(store_root, tmp_path_factory.mktemp("data"), models=MAIN_MODELS)
    async with running(settings) as pair:
        yield pair


@pytest.fixture
def main_client(main_app: tuple[FastAPI, httpx.AsyncClient]) -> httpx.AsyncClient:
    return main_app[1]


@pytest.fixture
def broken_store(store_root: Path, tmp_path: Path) -> Path:
    """The classifier, plus one model whose manifest is garbage and one whose weights are corrupt."""
    root = tmp_path / "store"
    shutil.copytree(store_root / "clf", root / "clf")
    (root / "broken" / "1").mkdir(parents=True)
    (root / "broken" / "1" / "manifest.json").write_text("{not json")
    shutil.copytree(store_root / "clf", root / "badweights")
    manifest = root / "badweights" / "1" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"name": "clf"', '"name": "badweights"'))
    weights = root / "badweights" / "1" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100] + b"\0" * 100)
    return root
