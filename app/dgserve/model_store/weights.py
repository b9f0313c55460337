"""Reading, writing and checking weight files.

Only safetensors is ever read: it is a flat header plus raw bytes, so a store that
someone else filled cannot run code in the server the way a pickled ``.pth`` can.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor, nn

from dgserve.errors import WeightsError
from dgserve.model_store.manifest import StorageDtype

_DTYPES: dict[StorageDtype, torch.dtype] = {"float32": torch.float32, "float16": torch.float16}
_SHOWN = 5  # offending keys listed in an error; the rest are counted


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_path(path: Path) -> None:
    """Flush a file or directory to disk, so a rename never publishes half-written data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def storage_state(model: nn.Module, dtype: StorageDtype, path: Path) -> dict[str, Tensor]:
    """The model's state dict as it will be stored: float tensors in ``dtype``, others untouched."""
    target = _DTYPES[dtype]
    out: dict[str, Tensor] = {}
    for key, tensor in model.state_dict().items():
        t = tensor.detach().to("cpu")
        if t.is_floating_point():
            cast = t.to(target)
            # float16 tops out at 65504: a larger weight would be stored as inf.
            if not torch.equal(torch.isfinite(cast), torch.isfinite(t)):
                raise WeightsError(path, f"{key!r} has values outside the {dtype} range; store it as float32")
            t = cast
        # clone: safetensors refuses tensors that share memory (tied weights, views);
        # each key gets its own copy and tied parameters are simply written twice.
        out[key] = t.contiguous().clone()
    return out


def serialize(state: Mapping[str, Tensor]) -> bytes:
    # "format": "pt" is what other safetensors readers (transformers, timm) expect.
    return save(dict(state), metadata={"format": "pt"})


def write_durably(path: Path, data: bytes) -> None:
    with path.open("xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def read_weights(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise WeightsError(path, "weights file is missing")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        # A truncated download, a pickle renamed to .safetensors, random bytes: all
        # end here rather than as a raw parser exception.
        raise WeightsError(path, f"not a readable safetensors file ({exc})") from exc


def stored_float_dtypes(state: Mapping[str, Tensor]) -> set[torch.dtype]:
    return {t.dtype for t in state.values() if t.is_floating_point()}


def load_into(model: nn.Module, state: Mapping[str, Tensor], path: Path) -> None:
    """Load ``state`` strictly: every key present, none extra, every shape and kind equal.

    Float tensors are cast to the model's own dtype (fp16 storage comes back as the
    float32 the model was built with); integer buffers such as BatchNorm's
    ``num_batches_tracked`` must arrive as they were written.
    """
    expected = model.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    shapes = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(expected.keys() & state.keys())
        if state[k].shape != expected[k].shape
    ]
    kinds = [
        f"{k} stored as {state[k].dtype}, model has {expected[k].dtype}"
        for k in sorted(expected.keys() & state.keys())
        if state[k].is_floating_point() != expected[k].is_floating_point()
        or (not state[k].is_floating_point() and state[k].dtype != expected[k].dtype)
    ]
    problems = [
        _listing("missing keys", missing),
        _listing("unexpected keys", unexpected),
        _listing("shape mismatches", shapes),
        _listing("dtype mismatches", kinds),
    ]
    problems = [p for p in problems if p]
    if problems:
        raise WeightsError(path, "weights do not fit the architecture: " + "; ".join(problems))

    cast = {k: t.to(expected[k].dtype) if t.is_floating_point() else t for k, t in state.items()}
    try:
        model.load_state_dict(cast, strict=True)
    except RuntimeError as exc:  # checked above; kept so nothing escapes unwrapped
        raise WeightsError(path, f"weights do not fit the architecture: {exc}") from exc


def _listing(what: str, items: list[str]) -> str:
    if not items:
        return ""
    more = f" (+{len(items) - _SHOWN} more)" if len(items) > _SHOWN else ""
    return f"{len(items)} {what}: {', '.join(items[:_SHOWN])}{more}"
