"""The Open Inference Protocol working group's generated REST client, JSON only, against dgserve."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from open_inference.openapi.client import OpenInferenceClient
from open_inference.openapi.errors import BadRequestError
from open_inference.openapi.types import InferenceRequest, RequestInput, RequestOutput
from PIL import Image

from dgserve.imaging import preprocess
from dgserve.model_store import ModelStore

pytestmark = pytest.mark.timeout(300)

STORE = Path(__file__).resolve().parents[2] / "model_store"


def pixels(images: list[bytes]) -> np.ndarray:
    manifest = ModelStore(STORE).resolve("shapes-dgnet", 1).manifest
    return np.stack([preprocess(Image.open(io.BytesIO(data)).convert("RGB"), manifest.preprocessing).numpy()
                     for data in images])  # fmt: skip


@pytest.fixture
def client(server: Any) -> Iterator[OpenInferenceClient]:
    with httpx.Client(timeout=60) as http:  # the client would leave its own open
        yield OpenInferenceClient(base_url=server.base, httpx_client=http)


def test_json_inference_matches_v1(server: Any, client: OpenInferenceClient, shapes: list[bytes]) -> None:
    client.check_server_liveness()
    client.check_server_readiness()
    client.check_model_readiness("shapes-dgnet")
    meta = client.read_model_metadata("shapes-dgnet")
    assert meta.name == "shapes-dgnet" and {t.name for t in meta.inputs} == {"image", "input"}
    batch = pixels(shapes)
    response = client.model_infer("shapes-dgnet", request=InferenceRequest(
        id="json-1",
        inputs=[RequestInput(name="input", shape=list(batch.shape), datatype="FP32", data=batch.reshape(-1).tolist())],
        outputs=[RequestOutput(name=n) for n in ("scores", "labels", "inspection_id", "stages/layer4")],
    ))  # fmt: skip
    assert response.id == "json-1" and [o.name for o in response.outputs] == ["scores", "labels", "inspection_id",
                                                                             "stages/layer4"]  # fmt: skip
    outputs = {o.name: o for o in response.outputs}
    k = outputs["scores"].shape[1]
    scores = np.array(outputs["scores"].data.__root__, dtype=np.float32).reshape(len(shapes), k)
    labels = np.array(outputs["labels"].data.__root__).reshape(len(shapes), k)
    files = [("images", (f"{i}.png", data, "image/png")) for i, data in enumerate(shapes)]
    expected = httpx.post(f"{server.base}/v1/models/shapes-dgnet/classify", files=files, timeout=60).json()["results"]
    for row, reference in enumerate(expected):
        assert labels[row].tolist() == [p["label"] for p in reference["predictions"]]
        assert np.allclose(scores[row], [p["score"] for p in reference["predictions"]], atol=1e-5)
    for inspection_id in outputs["inspection_id"].data.__root__:
        record = httpx.get(f"{server.base}/v1/inspections/{inspection_id}").json()
        assert record["prediction"]["request_id"] == "json-1"


def test_a_malformed_request_is_a_400_the_client_understands(client: OpenInferenceClient) -> None:
    with pytest.raises(BadRequestError) as info:
        client.model_infer("shapes-dgnet", request=InferenceRequest(
            inputs=[RequestInput(name="input", shape=[1, 3, 8, 8], datatype="FP32", data=[0.0] * 192)],
        ))  # fmt: skip
    assert "[3, 64, 64]" in info.value.body["error"]
    client.check_server_readiness()
