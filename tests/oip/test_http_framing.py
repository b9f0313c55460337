"""The HTTP body's framing: JSON, then binary tensor data, both ways."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dgserve.oip.frontend import InferResponse
from dgserve.oip.http import HEADER_LENGTH, parse_request, render_response
from dgserve.oip.tensors import ProtocolError, Tensor, bytes_to_raw


def body(doc: dict[str, object], *blobs: bytes) -> tuple[bytes, str]:
    head = json.dumps(doc).encode()
    return head + b"".join(blobs), str(len(head))


def test_binary_inputs_follow_the_json_in_order() -> None:
    images = bytes_to_raw([b"one", b"two"])
    pixels = np.ones((1, 3, 2, 2), dtype=np.float32).tobytes()
    data, length = body({
        "id": "r1", "parameters": {"timeout": 5},
        "inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": len(images)}},
            {"name": "input", "datatype": "FP32", "shape": [1, 3, 2, 2], "parameters": {"binary_data_size": len(pixels)}},
        ],
        "outputs": [{"name": "scores", "parameters": {"binary_data": True}}, {"name": "labels"}],
    }, images, pixels)  # fmt: skip
    request = parse_request(data, length)
    assert [t.name for t in request.inputs] == ["image", "input"] and request.id == "r1"
    assert list(request.inputs[0].array) == [b"one", b"two"] and request.inputs[1].array.sum() == 12
    assert [(o.name, o.binary) for o in request.outputs or []] == [("scores", True), ("labels", None)]


def test_json_only_requests_need_no_header() -> None:
    data, _ = body({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1], "data": [0.5]}]})
    assert parse_request(data, None).inputs[0].array.tolist() == [0.5]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: (b'{"inputs": []}', "99"), "is 99 but the body has 14 bytes"),
        (lambda: (b'{"inputs": []}', "x1"), "must be a byte count"),
        (lambda: body({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                   "parameters": {"binary_data_size": 40}}]}, bytes_to_raw([b"a"])),
         "runs past the body"),
        (lambda: body({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                   "parameters": {"binary_data_size": 5}}]}, bytes_to_raw([b"a"]), b"extra"),
         "5 bytes of binary data after the last input"),
        (lambda: (b"{not json", None), "not valid JSON"),
        (lambda: body({"inputs": [{"name": "x", "datatype": "FP32"}]}), "needs name, datatype and shape"),
        (lambda: body({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}]}), "neither data nor"),
    ],
)
def test_framing_errors_are_400(make: object, message: str) -> None:
    data, length = make()  # type: ignore[operator]
    with pytest.raises(ProtocolError, match=message):
        parse_request(data, length)


def test_outputs_go_binary_when_asked_and_json_otherwise() -> None:
    scores = Tensor("scores", "FP32", np.array([[0.75, 0.25]], dtype=np.float32))
    labels = Tensor("labels", "BYTES", np.array([[b"cat", b"dog"]], dtype=object))
    response = InferResponse("m", "1", "r1", [(scores, True), (labels, None)])
    content, headers = render_response(response, binary_default=False)
    length = int(headers[HEADER_LENGTH])
    doc = json.loads(content[:length])
    assert doc["id"] == "r1" and doc["outputs"][0]["parameters"] == {"binary_data_size": 8}
    assert doc["outputs"][1]["data"] == ["cat", "dog"] and doc["outputs"][1]["shape"] == [1, 2]
    assert np.frombuffer(content[length:], dtype="<f4").tolist() == [0.75, 0.25]
    plain, plain_headers = render_response(InferResponse("m", "1", None, [(scores, None)]), binary_default=False)
    assert plain_headers == {} and json.loads(plain)["outputs"][0]["data"] == [0.75, 0.25]
