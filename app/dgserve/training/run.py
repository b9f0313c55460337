"""One ``dgserve train`` run end to end: data, model, loop, then a new store version with its card."""

from __future__ import annotations

from typing import Any

import torch

from dgserve.models.registry import get_entry
from dgserve.model_store import ModelStore, StoredVersion
from dgserve.tasks import get_task
from dgserve.training.card import render_card
from dgserve.training.config import TrainConfig
from dgserve.training.loop import EpochCallback, History, fit
from dgserve.training.model import build_model, resolve_architecture, resolve_preprocessing


def train(config: TrainConfig, on_epoch_end: EpochCallback | None = None) -> tuple[StoredVersion, History]:
    """Train as ``config`` says and write the result as a new version of ``config.name``."""
    config.validate()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    architecture, _, _ = resolve_architecture(config)
    task = get_task(get_entry(architecture).task)
    pre = resolve_preprocessing(config)
    # The labels, hence the head's size, come from the data.
    data = task.datasets(config, pre)
    num_classes = task.head_size(data.labels)
    built = build_model(config, num_classes, pre)
    history = fit(config, built.model, task, num_classes, data.train, data.val, on_epoch_end)

    card = render_card(
        config=config,
        task=task,
        name=config.name,
        architecture=architecture,
        arch_kwargs=built.arch_kwargs,
        labels=data.labels,
        data_description=data.description,
        init_notes=built.notes,
        history=history,
        num_params=sum(p.numel() for p in built.model.parameters()),
        input_size=pre.input_size[0],
    )
    final: dict[str, Any] = history.epochs[-1]
    metric = task.headline(final)
    stored = ModelStore(config.store).save(
        built.model,
        name=config.name,
        architecture=architecture,
        arch_kwargs=built.arch_kwargs,
        labels=data.labels,
        preprocessing=pre,
        description=config.description or f"{architecture} trained by dgserve train ({metric} on held-out data)",
        dtype=config.storage_dtype,
        card=card,
    )
    return stored, history
