"""Triton's own clients against a running dgserve: nothing changed on their side.

``tritonclient.http`` and ``tritonclient.grpc`` run the same checks. Each one's
answers are compared with ``/v1`` on the same images (same labels, scores within
1e-5, same boxes and paths), and each inspection id it gets back is read through
``GET /v1/inspections/{id}``.
"""

from __future__ import annotations

import io
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from dgserve.imaging import preprocess
from dgserve.model_store import ModelStore

STORE = Path(__file__).resolve().parents[2] / "model_store"

pytestmark = pytest.mark.timeout(300)

PROTOCOLS = ["http", "grpc"]


def connect(server: Any, protocol: str) -> tuple[ModuleType, Any]:
    module = httpclient if protocol == "http" else grpcclient
    return module, module.InferenceServerClient(url=server.http if protocol == "http" else server.grpc)


def bytes_input(module: ModuleType, images: list[bytes], name: str = "image") -> Any:
    tensor = module.InferInput(name, [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_))  # binary by default over HTTP, as users send it
    return tensor


def metadata(client: Any, protocol: str, name: str) -> dict[str, Any]:
    meta = client.get_model_metadata(name) if protocol == "http" else client.get_model_metadata(name, as_json=True)
    for tensor in meta["inputs"] + meta["outputs"]:
        tensor["shape"] = [int(d) for d in tensor["shape"]]  # protobuf JSON writes int64 as text
    return dict(meta)


def v1(server: Any, name: str, endpoint: str, images: list[bytes], query: str = "") -> list[dict[str, Any]]:
    files = [("images", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    response = httpx.post(f"{server.base}/v1/models/{name}/{endpoint}{query}", files=files, timeout=120)
    assert response.status_code == 200, response.text
    return list(response.json()["results"])


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_health_and_metadata(server: Any, protocol: str) -> None:
    _, client = connect(server, protocol)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("shapes-dgnet") and client.is_model_ready("shapes-dgnet", "1")
    assert not client.is_model_ready("shapes-dgnet", "7")
    server_meta = client.get_server_metadata() if protocol == "http" else client.get_server_metadata(as_json=True)
    assert "binary_tensor_data" in server_meta["extensions"]
    meta = metadata(client, protocol, "shapes-dgnet")
    assert meta["name"] == "shapes-dgnet" and meta["versions"] == ["1"]
    inputs = {t["name"]: (t["datatype"], t["shape"]) for t in meta["inputs"]}
    assert inputs == {"image": ("BYTES", [-1]), "input": ("FP32", [-1, 3, 64, 64])}
    outputs = {t["name"]: (t["datatype"], t["shape"]) for t in meta["outputs"]}
    assert outputs["scores"] == ("FP32", [-1, -1]) and outputs["labels"] == ("BYTES", [-1, -1])
    assert outputs["inspection_id"] == ("BYTES", [-1])
    assert outputs["stages/layer1"] == ("FP32", [-1, 4, 4])  # input, two blocks, output
    glore = {t["name"] for t in metadata(client, protocol, "shapes-glore")["outputs"]}
    assert {n for n in glore if n.startswith("glore_units/")} == {"glore_units/layer2.units.0", "glore_units/layer3.units.0"}


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_classification_matches_v1_and_is_recorded(server: Any, protocol: str, shapes: list[bytes]) -> None:
    module, client = connect(server, protocol)
    result = client.infer("shapes-dgnet", [bytes_input(module, shapes)], request_id=f"req-{protocol}",
                          parameters={"top_k": 3})  # fmt: skip
    scores, labels = result.as_numpy("scores"), result.as_numpy("labels")
    indices, ids = result.as_numpy("class_indices"), result.as_numpy("inspection_id")
    assert scores.shape == (3, 3) and labels.shape == (3, 3) and ids.shape == (3,)
    expected = v1(server, "shapes-dgnet", "classify", shapes, "?top_k=3")
    for row, reference in enumerate(expected):
        assert [label.decode() for label in labels[row]] == [p["label"] for p in reference["predictions"]]
        assert indices[row].tolist() == [p["index"] for p in reference["predictions"]]
        assert np.allclose(scores[row], [p["score"] for p in reference["predictions"]], atol=1e-5)
        for stage in reference["connectivity"]["stages"]:
            assert np.allclose(result.as_numpy(f"stages/{stage['stage']}")[row], stage["adjacency"], atol=1e-6)
        record = httpx.get(f"{server.base}/v1/inspections/{ids[row].decode()}").json()
        assert record["model"] == "shapes-dgnet" and record["prediction"]["request_id"] == f"req-{protocol}"
        assert record["prediction"]["predictions"] == result_predictions(labels[row], indices[row], scores[row])


def result_predictions(labels: Any, indices: Any, scores: Any) -> list[dict[str, Any]]:
    return [{"label": lab.decode(), "index": int(i), "score": pytest.approx(float(s), abs=1e-6)}
            for lab, i, s in zip(labels, indices, scores, strict=True)]  # fmt: skip


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_preprocessed_fp32_input_gives_what_the_encoded_image_gives(
    server: Any, protocol: str, shapes: list[bytes]
) -> None:
    manifest = ModelStore(STORE).resolve("shapes-dgnet", 1).manifest
    pixels = np.stack([preprocess(Image.open(io.BytesIO(data)).convert("RGB"), manifest.preprocessing).numpy()
                       for data in shapes])  # fmt: skip
    module, client = connect(server, protocol)
    tensor = module.InferInput("input", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels)
    wanted = [module.InferRequestedOutput(name) for name in ("scores", "labels", "inspection_id")]
    from_pixels = client.infer("shapes-dgnet", [tensor], outputs=wanted)
    from_bytes = client.infer("shapes-dgnet", [bytes_input(module, shapes)], outputs=wanted)
    assert np.allclose(from_pixels.as_numpy("scores"), from_bytes.as_numpy("scores"), atol=1e-5)
    assert from_pixels.as_numpy("labels").tolist() == from_bytes.as_numpy("labels").tolist()
    assert from_pixels.as_numpy("stages/layer1") is None  # not asked for, not sent
    record = httpx.get(f"{server.base}/v1/inspections/{from_pixels.as_numpy('inspection_id')[0].decode()}").json()
    assert record["prediction"]["image"] == {"part": None, "width": 64, "height": 64}


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_detection_matches_v1(server: Any, protocol: str, scenes: list[bytes]) -> None:
    module, client = connect(server, protocol)
    result = client.infer("shapes-detector", [bytes_input(module, scenes)])
    counts = result.as_numpy("num_detections")
    boxes, labels, scores = result.as_numpy("boxes"), result.as_numpy("labels"), result.as_numpy("scores")
    expected = v1(server, "shapes-detector", "detect", scenes)
    assert counts.tolist() == [len(r["predictions"]) for r in expected] and max(counts) > 0
    for row, reference in enumerate(expected):
        n = int(counts[row])
        assert np.allclose(boxes[row, :n], [p["box"] for p in reference["predictions"]], atol=1e-4)
        assert [lab.decode() for lab in labels[row, :n]] == [p["label"] for p in reference["predictions"]]
        assert np.allclose(scores[row, :n], [p["score"] for p in reference["predictions"]], atol=1e-5)
        assert not boxes[row, n:].any() and all(lab == b"" for lab in labels[row, n:])  # padding
    for stage in expected[0]["connectivity"]["stages"]:
        assert np.allclose(result.as_numpy(f"stages/{stage['stage']}")[0], stage["adjacency"], atol=1e-6)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_glore_projection_maps_come_as_tensors(server: Any, protocol: str, shapes: list[bytes]) -> None:
    module, client = connect(server, protocol)
    result = client.infer("shapes-glore", [bytes_input(module, shapes[:2])])
    expected = v1(server, "shapes-glore", "classify", shapes[:2])
    for unit in expected[0]["connectivity"]["glore_units"]:
        maps = result.as_numpy(f"glore_units/{unit['unit']}")
        assert maps.dtype == np.int32 and maps[0].tolist() == unit["projection"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_segmentation_label_maps_come_as_an_int_tensor_padded_per_batch(
    server: Any, protocol: str, scenes: list[bytes], shapes: list[bytes]
) -> None:
    from dgserve.tasks.segmentation import decode_label_map

    module, client = connect(server, protocol)
    meta = metadata(client, protocol, "shapes-segmenter")
    outputs = {t["name"]: t for t in meta["outputs"]}
    assert outputs["label_map"]["datatype"] == "INT32" and outputs["label_map"]["shape"] == [-1, -1, -1]
    images = [scenes[0], shapes[0]]  # 160x160 and 64x64: the smaller map is padded with -1
    result = client.infer("shapes-segmenter", [bytes_input(module, images)])
    label_map, fractions = result.as_numpy("label_map"), result.as_numpy("class_fractions")
    assert label_map.dtype == np.int32 and label_map.shape == (2, 160, 160) and fractions.shape == (2, 9)
    expected = v1(server, "shapes-segmenter", "segment", images)
    np.testing.assert_array_equal(label_map[0], decode_label_map(expected[0]["predictions"]))
    np.testing.assert_array_equal(label_map[1, :64, :64], decode_label_map(expected[1]["predictions"]))
    assert (label_map[1, 64:] == -1).all() and (label_map[1, :, 64:] == -1).all()
    np.testing.assert_allclose(fractions.sum(1), 1.0, rtol=1e-5)
    [unit] = expected[0]["connectivity"]["glore_units"]
    assert result.as_numpy(f"glore_units/{unit['unit']}")[0].tolist() == unit["projection"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda m, shapes: [_typed(m, "image", np.zeros(2, np.float32), "FP32")], "must be BYTES of shape [N]"),
        (lambda m, shapes: [_typed(m, "input", np.zeros((1, 3, 32, 32), np.float32), "FP32")], "[3, 64, 64]"),
        (lambda m, shapes: [_typed(m, "pixels", np.zeros((1, 3, 64, 64), np.float32), "FP32")], "exactly one input"),
        (lambda m, shapes: [bytes_input(m, [shapes[0], b"definitely not an image"])], "image[1]"),
        (lambda m, shapes: [bytes_input(m, [shapes[0]] * 9)], "9 images; send 1 to 8"),
    ],
    ids=["wrong-datatype", "wrong-shape", "unknown-input", "undecodable", "over-the-limit"],
)
def test_bad_input_is_a_clear_error_and_the_server_stays_healthy(
    server: Any, protocol: str, shapes: list[bytes], build: Any, message: str
) -> None:
    module, client = connect(server, protocol)
    with pytest.raises(InferenceServerException) as info:
        client.infer("shapes-dgnet", build(module, shapes))
    assert message in str(info.value)
    assert client.is_server_ready() and client.is_model_ready("shapes-dgnet")
    if protocol == "http":
        assert info.value.status() == "400"
    else:
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT"


def _typed(module: ModuleType, name: str, array: np.ndarray, datatype: str) -> Any:
    tensor = module.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_unknown_model_and_version_are_not_found(server: Any, protocol: str, shapes: list[bytes]) -> None:
    module, client = connect(server, protocol)
    for name, version in (("nope", ""), ("shapes-dgnet", "9")):
        with pytest.raises(InferenceServerException) as info:
            client.infer(name, [bytes_input(module, shapes[:1])], model_version=version)
        assert info.value.status() in ("404", "StatusCode.NOT_FOUND")
