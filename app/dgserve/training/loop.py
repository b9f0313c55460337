"""The training loop: epochs of SGD/AdamW with live progress, an eval after each epoch,
and a checkpoint after each epoch that ``--resume`` continues from bit for bit.

Reproducibility: the initial weights come from ``torch.manual_seed(seed)``; the data
order and the augmentation of epoch ``e`` from generators seeded with ``(seed, e)``;
the only other randomness (Faster R-CNN's proposal sampling) is the global generator,
which the checkpoint saves. Same seed and settings, same weights.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, RandomSampler
from tqdm import tqdm

from dgserve.tasks import Task
from dgserve.training.checkpoint import load_checkpoint, restore, save_checkpoint
from dgserve.training.config import Schedule, TrainConfig
from dgserve.training.model import freeze_batchnorm_stats, param_groups
from dgserve.training.regularizers import DeadEndGuard, edge_l1

EpochCallback = Callable[[int, dict[str, Any]], None]


@dataclass
class History:
    epochs: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    images: int = 0
    resumed_at: int | None = None
    """The epoch a ``--resume`` continued from, if any."""


def epoch_generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    # Distinct, reproducible streams per (seed, epoch, purpose) without carrying state.
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 7 + stream) % (2**63))


POLY_POWER = 0.9
"""The "poly" policy's power, as DeepLab and the GloRe paper's segmentation runs use it."""


def lr_at(step: int, total: int, warmup: int, peak: float, schedule: Schedule = "cosine") -> float:
    """Linear warm-up to ``peak``, then cosine or poly decay to 0 at ``total`` steps."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "poly":
        return peak * (1.0 - progress) ** POLY_POWER
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def sparsity_at(step: int, steps_per_epoch: int, config: TrainConfig) -> float:
    """λ, ramped in linearly over ``sparsity_warmup`` epochs.

    Pruning from the first step closes edges before the network knows which ones it
    needs, and the hard gate's jumps then keep undoing what it has learned.
    """
    ramp = config.sparsity_warmup * steps_per_epoch
    return config.sparsity if ramp <= 0 else config.sparsity * min(1.0, (step + 1) / ramp)


def make_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    groups = param_groups(model, config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=config.lr)


def fit(
    config: TrainConfig,
    model: nn.Module,
    task: Task,
    num_classes: int,
    train_set: Dataset[Any],
    val_set: Dataset[Any],
    on_epoch_end: EpochCallback | None = None,
) -> History:
    optimizer = make_optimizer(config, model)
    steps_per_epoch = math.ceil(len(train_set) / config.batch_size)  # type: ignore[arg-type]
    total_steps = steps_per_epoch * config.epochs
    warmup = max(1, round(config.warmup_epochs * steps_per_epoch))
    history, start_epoch = History(), 0
    if config.resume:
        assert config.checkpoint_dir is not None
        tensors, meta = load_checkpoint(config.checkpoint_dir)
        changed = config.differences(meta["config"])
        if changed:
            raise ValueError(f"cannot resume: settings differ from the checkpoint's ({', '.join(changed)})")
        restore(model, optimizer, tensors, meta)
        start_epoch = meta["epoch"]
        history = History(meta["history"], meta["seconds"], meta["images"], resumed_at=start_epoch)

    for epoch in range(start_epoch, config.epochs):
        started = time.perf_counter()
        losses = _train_epoch(config, model, task, optimizer, train_set, epoch, steps_per_epoch, total_steps, warmup)
        history.seconds += time.perf_counter() - started
        history.images += len(train_set)  # type: ignore[arg-type]
        metrics = evaluate(config, model, task, num_classes, val_set)
        record = {"epoch": epoch + 1, **losses, **metrics}
        history.epochs.append(record)
        _report(config, task, record)
        if config.checkpoint_dir is not None:
            meta = {"epoch": epoch + 1, "config": config.to_json(), "history": history.epochs,
                    "seconds": history.seconds, "images": history.images}  # fmt: skip
            save_checkpoint(config.checkpoint_dir, model, optimizer, meta)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, record)
    return history


def _batches(config: TrainConfig, dataset: Dataset[Any], task: Task, generator: torch.Generator | None) -> DataLoader[Any]:
    sampler = RandomSampler(dataset, generator=generator) if generator is not None else None
    return DataLoader(
        dataset,
        batch_size=config.batch_size,
        sampler=sampler,
        num_workers=config.workers,
        collate_fn=task.collate,
    )


def _train_epoch(
    config: TrainConfig,
    model: nn.Module,
    task: Task,
    optimizer: torch.optim.Optimizer,
    dataset: Dataset[Any],
    epoch: int,
    steps_per_epoch: int,
    total_steps: int,
    warmup: int,
) -> dict[str, float]:
    model.train()
    if config.train != "all":
        freeze_batchnorm_stats(model)
    order, augment = epoch_generator(config.seed, epoch, 0), epoch_generator(config.seed, epoch, 1)
    bar = tqdm(
        _batches(config, dataset, task, order),
        total=steps_per_epoch,
        desc=f"epoch {epoch + 1}/{config.epochs}",
        unit="batch",
        disable=not config.progress,
        mininterval=1.0,
    )
    sums = {"loss": 0.0, "edge_l1": 0.0, "dead_end": 0.0}
    seen, started = 0, time.perf_counter()
    guard = DeadEndGuard(model)
    try:
        for i, batch in enumerate(bar):
            step = epoch * steps_per_epoch + i
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total_steps, warmup, config.lr, config.schedule or task.schedule)
            task_loss, size = task.loss(model, batch, config, augment)
            sparsity = edge_l1(model)
            dead_end = guard.penalty()
            loss = task_loss + sparsity_at(step, steps_per_epoch, config) * sparsity + config.dead_end_penalty * dead_end
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += size
            sums["loss"] += float(task_loss.detach()) * size
            sums["edge_l1"] += float(sparsity.detach()) * size
            sums["dead_end"] += float(dead_end.detach()) * size
            bar.set_postfix(loss=f"{sums['loss'] / seen:.4f}", edges=f"{sums['edge_l1'] / seen:.3f}",
                            img_s=f"{seen / (time.perf_counter() - started):.0f}")  # fmt: skip
    finally:
        bar.close()
        guard.remove()
    return {f"train_{k}" if k != "loss" else "train_loss": v / max(seen, 1) for k, v in sums.items()}


def evaluate(config: TrainConfig, model: nn.Module, task: Task, num_classes: int, val_set: Dataset[Any]) -> dict[str, Any]:
    batches: Iterator[Any] = iter(_batches(config, val_set, task, None))
    return task.evaluate(model, batches, num_classes, config.progress)


def _report(config: TrainConfig, task: Task, record: dict[str, Any]) -> None:
    key, title = task.metric
    parts = [f"epoch {record['epoch']}/{config.epochs}", f"loss {record['train_loss']:.4f}",
             f"held-out {title} {record[key]:.4f}"]  # fmt: skip
    if "connectivity" in record:
        conn = record["connectivity"]
        parts.append(f"closed edges {conn['closed_edge_fraction']:.1%}, {conn['distinct_patterns']} patterns")
    tqdm.write(", ".join(parts))
