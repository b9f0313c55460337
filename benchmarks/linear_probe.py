"""How hard are the procedural shape scenes? A linear probe on raw pixels vs a tiny CNN.

The generator must be clearly beyond a linear classifier on pixels (otherwise a high
top-1 says nothing about the trained nets) yet learnable by a small convnet within a
CPU minute budget. This script measures both on a fresh train draw and a held-out draw
with a different seed:

    .venv/bin/python benchmarks/linear_probe.py            # linear probe only
    .venv/bin/python benchmarks/linear_probe.py --cnn      # plus the tiny CNN

The probe is multinomial logistic regression on standardised, flattened pixels, fitted
full-batch with L-BFGS for each weight decay of a small grid; the best held-out score is
reported, which flatters the probe, so the gap to the CNN is if anything understated.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from dgserve.data.scenes import CLASSES, NUM_CLASSES, render_classification


def generate(n: int, seed: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [N, 3, H, W] images and int64 [N] labels."""
    images = np.empty((n, size, size, 3), np.uint8)
    labels = np.empty(n, np.int64)
    for i in range(n):
        image, label = render_classification(seed, i, size)
        images[i] = np.asarray(image)
        labels[i] = label
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels)


def linear_probe(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    weight_decays: Sequence[float],
    max_iter: int,
) -> dict[float, tuple[float, float]]:
    """{weight decay: (train top-1, held-out top-1)} for softmax regression on pixels."""
    train = x_train.flatten(1).float() / 255.0
    test = x_test.flatten(1).float() / 255.0
    mean, std = train.mean(0), train.std(0).clamp_min(1e-3)
    train, test = (train - mean) / std, (test - mean) / std
    results: dict[float, tuple[float, float]] = {}
    for wd in weight_decays:
        layer = nn.Linear(train.shape[1], NUM_CLASSES)
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
        opt = torch.optim.LBFGS(layer.parameters(), lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(layer(train), y_train) + 0.5 * wd * layer.weight.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            train_acc = (layer(train).argmax(1) == y_train).float().mean().item()
            test_acc = (layer(test).argmax(1) == y_test).float().mean().item()
        results[wd] = (train_acc, test_acc)
    return results


def tiny_cnn(num_classes: int) -> nn.Module:
    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True), nn.MaxPool2d(2)
        )

    return nn.Sequential(
        block(3, 16), block(16, 32), block(32, 64), block(64, 128),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes),
    )  # fmt: skip


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    # Every class is closed under rotation and reflection, so the dihedral group of the
    # square is free, label-preserving augmentation.
    k = int(torch.randint(4, (1,), generator=gen))
    x = torch.rot90(x, k, (2, 3))
    if torch.rand((), generator=gen) < 0.5:
        x = x.flip(3)
    return x


def train_cnn(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> tuple[float, list[float], float, float]:
    """(held-out top-1, per-class held-out top-1, training wall seconds, training CPU seconds).

    CPU seconds are reported too because wall time on a shared machine says more about
    the neighbours than about the model; with ``threads`` busy cores, CPU / threads is
    the uncontended wall time.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = tiny_cnn(NUM_CLASSES)
    steps = epochs * math.ceil(len(x_train) / batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.2)
    start, cpu_start = time.perf_counter(), time.process_time()
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x_train), generator=gen)
        seen, correct, loss_sum = 0, 0, 0.0
        for b in range(0, len(order), batch_size):
            idx = order[b : b + batch_size]
            x = _augment(x_train[idx].float() / 255.0, gen)
            out = model(x)
            loss = F.cross_entropy(out, y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen += len(idx)
            correct += int((out.argmax(1) == y_train[idx]).sum())
            loss_sum += loss.item() * len(idx)
        print(
            f"  epoch {epoch + 1}/{epochs}: loss {loss_sum / seen:.3f}, train top-1 {correct / seen:.3f},"
            f" {time.perf_counter() - start:.0f}s",
            flush=True,
        )
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    model.eval()
    with torch.no_grad():
        predicted = torch.cat([model(x_test[b : b + 256].float() / 255.0).argmax(1) for b in range(0, len(x_test), 256)])
    hits = predicted == y_test
    per_class = [float(hits[y_test == c].float().mean()) for c in range(NUM_CLASSES)]
    return float(hits.float().mean()), per_class, seconds, cpu_seconds


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--train", type=int, default=5000, help="probe training images")
    parser.add_argument("--test", type=int, default=1000, help="held-out images (both models)")
    parser.add_argument("--seed", type=int, default=0, help="training draw")
    parser.add_argument("--test-seed", type=int, default=1, help="held-out draw; must differ from --seed")
    parser.add_argument("--weight-decays", type=float, nargs="+", default=[1e-3, 1e-2, 1e-1, 1.0])
    parser.add_argument("--lbfgs-iters", type=int, default=150)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cnn", action="store_true", help="also train the tiny CNN")
    parser.add_argument("--cnn-train", type=int, default=10000, help="CNN training images")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=4e-3)
    args = parser.parse_args(argv)
    if args.seed == args.test_seed:
        parser.error("--test-seed must differ from --seed, or the held-out set is the training set")
    torch.set_num_threads(args.threads)

    n_train = max(args.train, args.cnn_train if args.cnn else 0)
    start = time.perf_counter()
    x_train, y_train = generate(n_train, args.seed, args.size)
    x_test, y_test = generate(args.test, args.test_seed, args.size)
    gen_s = time.perf_counter() - start
    print(f"generated {n_train + args.test} images at {args.size}px in {gen_s:.1f}s ({(n_train + args.test) / gen_s:.0f}/s)")
    print(f"chance: {1 / NUM_CLASSES:.3f} ({NUM_CLASSES} classes)")

    start = time.perf_counter()
    probe = linear_probe(
        x_train[: args.train], y_train[: args.train], x_test, y_test, args.weight_decays, args.lbfgs_iters
    )
    for wd, (train_acc, test_acc) in probe.items():
        print(f"linear probe wd={wd:g}: train top-1 {train_acc:.3f}, held-out top-1 {test_acc:.3f}")
    best = max(acc for _, acc in probe.values())
    print(f"linear probe best held-out top-1: {best:.3f} ({time.perf_counter() - start:.0f}s)")

    if args.cnn:
        print(f"tiny CNN: {args.cnn_train} images x {args.epochs} epochs, {args.threads} threads")
        acc, per_class, seconds, cpu_seconds = train_cnn(
            x_train[: args.cnn_train], y_train[: args.cnn_train], x_test, y_test,
            args.epochs, args.batch_size, args.lr, args.seed,
        )  # fmt: skip
        per_class_text = ", ".join(f"{n} {a:.2f}" for n, a in zip(CLASSES, per_class, strict=True))
        print(f"tiny CNN held-out top-1 per class: {per_class_text}")
        print(f"tiny CNN held-out top-1: {acc:.3f} (trained in {seconds:.0f}s wall, {cpu_seconds:.0f}s CPU)")


if __name__ == "__main__":
    main()
