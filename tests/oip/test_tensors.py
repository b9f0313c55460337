"""OIP tensors: datatypes, the binary layout, and the refusals a malformed input gets."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from dgserve.oip.tensors import ProtocolError, Tensor, bytes_from_raw, bytes_to_raw, from_json_data, from_raw


def test_bytes_elements_are_length_prefixed_little_endian() -> None:
    raw = bytes_to_raw([b"ab", b"", "é"])
    assert raw == struct.pack("<I", 2) + b"ab" + struct.pack("<I", 0) + struct.pack("<I", 2) + "é".encode()
    assert bytes_from_raw("x", raw) == [b"ab", b"", "é".encode()]


@pytest.mark.parametrize("datatype", ["FP32", "FP16", "INT64", "UINT8", "BOOL", "FP64", "INT32"])
def test_numeric_raw_round_trip(datatype: str) -> None:
    array = (np.arange(24) % 2 == 0) if datatype == "BOOL" else np.arange(24).astype(
        {"FP32": "<f4", "FP16": "<f2", "INT64": "<i8", "UINT8": "<u1", "FP64": "<f8", "INT32": "<i4"}[datatype])
    tensor = Tensor("t", datatype, array.reshape(2, 3, 4))
    back = from_raw("t", datatype, [2, 3, 4], tensor.raw())
    assert back.shape == [2, 3, 4] and np.array_equal(back.array, tensor.array)


def test_json_data_may_be_flat_or_nested() -> None:
    flat = from_json_data("t", "FP32", [2, 2], [1, 2, 3, 4])
    nested = from_json_data("t", "FP32", [2, 2], [[1, 2], [3, 4]])
    assert np.array_equal(flat.array, nested.array) and flat.array.dtype == np.float32
    assert from_json_data("s", "BYTES", [2], ["a", "b"]).json_data() == ["a", "b"]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: from_raw("t", "FP32", [2, 2], b"\0" * 12), "needs 16 bytes, got 12"),
        (lambda: from_raw("t", "FLOAT", [1], b"\0" * 4), "unknown datatype 'FLOAT'"),
        (lambda: from_raw("t", "FP32", [-1, 2], b""), "negative dimension"),
        (lambda: from_raw("t", "FP32", ["a"], b""), "list of integers"),
        (lambda: from_raw("t", "BYTES", [2], bytes_to_raw([b"a"])), "needs 2 BYTES elements, got 1"),
        (lambda: from_raw("t", "BYTES", [1], struct.pack("<I", 9) + b"abc"), "claims 9 bytes, only 3 remain"),
        (lambda: from_raw("t", "BYTES", [1], b"\1\0"), "inside an element's 4-byte length"),
        (lambda: from_json_data("t", "INT32", [3], [1, 2]), "needs 3 elements, got 2"),
        (lambda: from_json_data("t", "INT32", [1], ["x"]), "does not fit INT32"),
    ],
)
def test_malformed_tensors_are_protocol_errors(call: object, message: str) -> None:
    with pytest.raises(ProtocolError, match=message) as info:
        call()  # type: ignore[operator]
    assert info.value.status_code == 400
