"""Open Inference Protocol tensors: datatypes, and the binary layout both front-ends share.

A tensor travels as a name, an OIP datatype (``FP32``, ``BYTES``, ...), a shape and
its data: a JSON list, or raw bytes, little-endian and row-major without padding, as
the binary tensor data extension (HTTP) and ``raw_*_contents`` (gRPC) carry them. A
``BYTES`` element in raw form is a 4-byte little-endian length and then its bytes.

Nothing here knows HTTP, gRPC or a model: ``Tensor`` is a named numpy array, and every
check raises ``ProtocolError`` with a message a client can act on.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from dgserve.errors import InvalidRequestError

__all__ = ["DTYPES", "ProtocolError", "Tensor", "bytes_from_raw", "bytes_to_raw", "from_json_data", "from_raw"]

# OIP datatype -> numpy dtype (little-endian); BYTES elements are Python bytes in an object array.
DTYPES: Final[dict[str, np.dtype[Any]]] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"), "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}  # fmt: skip
_LENGTH = struct.Struct("<I")


class ProtocolError(InvalidRequestError):
    """A request that breaks the protocol: 400 on HTTP, INVALID_ARGUMENT on gRPC."""

    status_code = 400
    code = "invalid_request"


@dataclass(frozen=True, slots=True)
class Tensor:
    name: str
    datatype: str
    array: np.ndarray

    @property
    def shape(self) -> list[int]:
        return list(self.array.shape)

    def raw(self) -> bytes:
        """The binary form (little-endian, row-major; BYTES length-prefixed)."""
        if self.datatype == "BYTES":
            return bytes_to_raw(self.array.reshape(-1))
        return np.ascontiguousarray(self.array, dtype=DTYPES[self.datatype]).tobytes()

    def json_data(self) -> list[Any]:
        """The JSON form: a flat list in row-major order, BYTES elements as UTF-8 text."""
        flat = self.array.reshape(-1)
        if self.datatype == "BYTES":
            return [e.decode("utf-8", "replace") if isinstance(e, bytes) else str(e) for e in flat]
        return flat.tolist()  # type: ignore[no-any-return]


def check_header(name: str, datatype: str, shape: Sequence[int]) -> tuple[np.dtype[Any], int]:
    """``(numpy dtype, element count)`` of a declared input, or the ``ProtocolError`` that says why not."""
    dtype = DTYPES.get(datatype)
    if dtype is None:
        raise ProtocolError(f"input {name!r}: unknown datatype {datatype!r}; use one of {', '.join(DTYPES)}")
    if not isinstance(shape, list | tuple) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise ProtocolError(f"input {name!r}: shape must be a list of integers, got {shape!r}")
    if any(d < 0 for d in shape):
        raise ProtocolError(f"input {name!r}: shape {list(shape)} has a negative dimension")
    return dtype, math.prod(shape)


def from_raw(name: str, datatype: str, shape: Sequence[int], raw: bytes) -> Tensor:
    """A tensor from its binary form, checked against its declared shape."""
    dtype, count = check_header(name, datatype, shape)
    if datatype == "BYTES":
        elements = bytes_from_raw(name, raw)
        if len(elements) != count:
            raise ProtocolError(f"input {name!r}: shape {list(shape)} needs {count} BYTES elements, got {len(elements)}")
        array = np.empty(count, dtype=object)
        array[:] = elements
        return Tensor(name, datatype, array.reshape(shape))
    if len(raw) != count * dtype.itemsize:
        raise ProtocolError(
            f"input {name!r}: shape {list(shape)} of {datatype} needs {count * dtype.itemsize} bytes, got {len(raw)}"
        )
    return Tensor(name, datatype, np.frombuffer(raw, dtype=dtype).reshape(shape))


def from_json_data(name: str, datatype: str, shape: Sequence[int], data: Any) -> Tensor:
    """A tensor from JSON ``data`` (flat or nested, row-major), checked against its shape."""
    dtype, count = check_header(name, datatype, shape)
    flat = list(_flatten(data))
    if len(flat) != count:
        raise ProtocolError(f"input {name!r}: shape {list(shape)} needs {count} elements, got {len(flat)}")
    if datatype == "BYTES":
        array = np.empty(count, dtype=object)
        try:
            array[:] = [e.encode() if isinstance(e, str) else bytes(e) for e in flat]
        except (TypeError, ValueError) as exc:
            raise ProtocolError(f"input {name!r}: BYTES elements must be strings") from exc
        return Tensor(name, datatype, array.reshape(shape))
    try:
        array = np.asarray(flat, dtype=dtype)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError(f"input {name!r}: data does not fit {datatype} ({exc})") from exc
    return Tensor(name, datatype, array.reshape(shape))


def _flatten(data: Any) -> Any:
    if isinstance(data, list):
        for item in data:
            yield from _flatten(item)
    else:
        yield data


def bytes_to_raw(elements: Sequence[Any]) -> bytes:
    parts = []
    for element in elements:
        data = element if isinstance(element, bytes) else str(element).encode()
        parts += [_LENGTH.pack(len(data)), data]
    return b"".join(parts)


def bytes_from_raw(name: str, raw: bytes | memoryview) -> list[bytes]:
    view, out, offset = memoryview(raw), [], 0
    while offset < len(view):
        if offset + 4 > len(view):
            raise ProtocolError(f"input {name!r}: BYTES data ends inside an element's 4-byte length")
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        if offset + length > len(view):
            raise ProtocolError(f"input {name!r}: a BYTES element claims {length} bytes, only {len(view) - offset} remain")
        out.append(bytes(view[offset : offset + length]))
        offset += length
    return out
