"""Checkpoints without pickle: safetensors for every tensor, JSON for everything else.

A checkpoint directory holds two files, replaced together at the end of each epoch:

* ``checkpoint.safetensors``: ``model.<key>`` (the state dict, float32),
  ``optim.<param index>.<name>`` (the optimizer's per-parameter state: momentum,
  Adam moments, step counters) and ``rng.torch`` (the global CPU generator, which
  Faster R-CNN's proposal sampler draws from);
* ``checkpoint.json``: the epoch, step, optimizer hyper-parameters (param groups),
  the metric history, the run's configuration, and the sha256 of the tensors file so
  that a tensors file from another run is refused.

Nothing is ever unpickled: a checkpoint from an untrusted source cannot run code.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import Tensor, nn

TENSORS = "checkpoint.safetensors"
META = "checkpoint.json"


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into flat tensors and the JSON-able rest."""
    state = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, per_param in state["state"].items():
        for name, value in per_param.items():
            if isinstance(value, Tensor):
                tensors[f"optim.{index}.{name}"] = value.detach().cpu().contiguous().clone()
            elif value is not None:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(
    directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, meta: dict[str, Any]
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    optim_tensors, optim_meta = optimizer_tensors(optimizer)
    tensors.update(optim_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    blob = save(tensors, metadata={"format": "pt"})
    full_meta = {**meta, "optimizer": optim_meta, "tensors_sha256": hashlib.sha256(blob).hexdigest()}
    # Tensors first, JSON last: the JSON names the tensors' hash, so a crash between the
    # two replacements leaves a pair that load_checkpoint refuses rather than mixes.
    _replace(directory / TENSORS, blob)
    _replace(directory / META, (json.dumps(full_meta, indent=2) + "\n").encode())


def load_checkpoint(directory: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    meta_path, tensors_path = directory / META, directory / TENSORS
    if not meta_path.is_file() or not tensors_path.is_file():
        raise FileNotFoundError(f"no checkpoint in {directory} (need {META} and {TENSORS})")
    meta = json.loads(meta_path.read_text())
    digest = hashlib.sha256(tensors_path.read_bytes()).hexdigest()
    if digest != meta.get("tensors_sha256"):
        raise ValueError(f"{tensors_path} does not belong to {meta_path} (sha256 mismatch)")
    return load_file(str(tensors_path)), meta


def restore(
    model: nn.Module, optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict[str, Any]
) -> None:
    model.load_state_dict({k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})
    restore_optimizer(optimizer, tensors, meta["optimizer"])
    torch.set_rng_state(tensors["rng.torch"])


def _replace(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
