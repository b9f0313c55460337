"""DG-Net's own cost: a DG-Net against its static backbone with the same weights, in one run.

    nice -n 10 .venv/bin/python benchmarks/dgnet_cost.py --device cpu \\
        --models shapes-dgnet,dgnet_resnet50 --batch-sizes 1,8 --rounds 5

For each model and batch size B the same input batch goes through:

* ``plain``: the static torchvision backbone (the blocks' weights copied from the DG-Net);
* ``open``: the DG-Net with every edge open (τ below any α), so it computes every block
  like the backbone and adds only routers, weighted sums and records;
* ``routed`` (store models only): the DG-Net as stored, on the model's own kind of
  images (generated scenes), so its trained routers close what they close;
* ``close-Q``: τ of each stage raised to the Q-quantile of the α its routers give with
  every edge open, so that about a fraction Q of the edges close.

each under every ``--executions`` mode (``skip`` runs a block only on the images that
reach it; ``masked`` runs every block and multiplies by the open-edge mask).

The machine may be shared and drift, so the variants are timed in alternating rounds
(order reversed every other round), each variant's time in a round is the median of its
single forwards there, and each round's ratios compare timings taken side by side; the
summary is min/median/max over rounds:

* overhead = t(open) / t(plain) − 1 (target ≤ 5%);
* speed-up = t(open) / t(skipped), FLOP speed-up = F(open) / F(skipped), and their
  ratio (1.0: faster exactly in proportion to the FLOPs skipped). F is what
  torch.utils.flop_counter counts in that very forward (convolutions and matrix
  products, as multiply-adds): a block run on a sub-batch counts only those images.

``--create ARCH`` models get random weights (``--image-size``, default 224); a name
from the store (``--store``) loads its weights and preprocessing.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from dgserve.allocator import keep_large_blocks
from dgserve.imaging import preprocess
from dgserve.model_store import ModelStore
from dgserve.models.dgnet import dg_stages, set_execution
from dgserve.models.dgnet.backbones import TORCHVISION_BUILDERS, build_plain
from dgserve.models.registry import create_model, list_models
from dgserve.models.widths import slim_resnet18
from dgserve.serving.worker import configure_compiling_thread, set_memory_format
from dgserve.settings import default_model_store


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="shapes-dgnet,dgnet_resnet50",
                   help="comma-separated: store model names or registered DG-Net architectures")
    p.add_argument("--store", type=Path, default=None, help="model store (default: the bundled one)")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--image-size", type=int, default=224, help="input side for architectures (not store models)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--executions", default="skip,masked", help="comma-separated DG-Net execution modes")
    p.add_argument("--close", default="0.3,0.6", help="comma-separated edge fractions to close by raising τ")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--min-time", type=float, default=0.3, help="seconds per variant per round (sets the iterations)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (0: torch's default; 1 keeps a shared machine's timings steadier)")
    p.add_argument("--compile", action="store_true",
                   help="time every variant through torch.compile (inductor), the backbone too, weights frozen into "
                        "the graph; DG-Net runs masked, as execution auto does under compile (DGSERVE_TORCH_COMPILE)")
    p.add_argument("--profile", action="store_true", help="also print torch.profiler's top ops for `open`")
    p.add_argument("--malloc", choices=["kept", "default"], default="kept",
                   help="kept: glibc keeps large blocks, as the server does (dgserve.allocator); default: glibc's own")
    p.add_argument("--memory-format", choices=["channels_last", "contiguous"], default="channels_last",
                   help="convolution layout of both models (the server's DGSERVE_MEMORY_FORMAT; its default first)")
    return p.parse_args()


@dataclass
class Variant:
    name: str
    model: nn.Module
    execution: str | None  # None: the static backbone
    taus: list[Tensor] | None = None  # per stage; None: as built
    flops: float = 0.0
    times: list[float] = field(default_factory=list)
    active: float = 1.0  # mean active-edge fraction
    skipped: float = 0.0  # mean fraction of blocks skipped

    def prepare(self) -> None:
        if self.execution is None:
            return
        set_execution(self.model, self.execution)  # type: ignore[arg-type]
        if self.taus is not None:
            with torch.no_grad():
                for (_, stage), tau in zip(dg_stages(self.model), self.taus, strict=True):
                    stage.tau.copy_(tau)


def plain_twin(arch: str, kwargs: dict[str, object], dg: nn.Module) -> nn.Module:
    """The static backbone of ``arch`` with the DG-Net's block, stem and head weights."""
    num_classes = int(kwargs.get("num_classes", 1000))  # type: ignore[call-overload]
    if arch in TORCHVISION_BUILDERS:
        plain = build_plain(arch, num_classes=num_classes)
    elif arch == "dgnet_resnet18_slim":
        plain = slim_resnet18(int(kwargs.get("width", 32)), num_classes)  # type: ignore[call-overload]
    else:
        raise SystemExit(f"no static twin known for {arch}")
    routing_only = (".tau", "wiring_mask")
    state = {k: v for k, v in dg.state_dict().items() if ".routers." not in k and not k.endswith(routing_only)}
    plain.load_state_dict(state, strict=True)  # every backbone weight, nothing else
    return plain


def load(name: str, args: argparse.Namespace, device: torch.device) -> tuple[nn.Module, nn.Module, Tensor, bool]:
    """(DG-Net, its static twin, one batch of the largest size, whether the images are real)."""
    batch = max(int(b) for b in args.batch_sizes.split(","))
    if name in list_models(family="dgnet", task="classification"):
        torch.manual_seed(0)
        dg = create_model(name).eval()
        plain = plain_twin(name, {}, dg)
        x = torch.randn(batch, 3, args.image_size, args.image_size)
        return dg.to(device), plain.eval().to(device), x.to(device), False
    loaded = ModelStore(args.store or default_model_store()).load(name)
    manifest = loaded.manifest
    plain = plain_twin(manifest.architecture, dict(manifest.arch_kwargs), loaded.model)
    from dgserve.data.scenes import render_classification

    images = [render_classification(7, i, manifest.preprocessing.input_size[0])[0] for i in range(batch)]
    x = torch.stack([preprocess(img, manifest.preprocessing) for img in images])
    return loaded.model.eval().to(device), plain.eval().to(device), x.to(device), True


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], iters: int, device: torch.device) -> float:
    """The median of ``iters`` single forwards: a shared machine's stray stalls do not move it."""
    times = []
    for _ in range(iters):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def close_taus(dg: nn.Module, x: Tensor, fraction: float) -> list[Tensor]:
    """Per stage, τ at the ``fraction``-quantile of the α its routers give with every edge open."""
    stages = dg_stages(dg)
    with torch.no_grad():
        for _, stage in stages:
            stage.tau.fill_(-1.0)
        dg(x)
        taus = []
        for _, stage in stages:
            adj = stage.last_adjacency
            assert adj is not None
            alphas = adj[:, stage.wiring_mask.to(adj.device)].flatten().float()
            taus.append(torch.full_like(stage.tau, float(torch.quantile(alphas, fraction))))
    return taus


def observe(v: Variant, x: Tensor) -> None:
    """FLOPs of one forward as it runs, and how many edges and blocks it used."""
    v.prepare()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        v.model(x)
    v.flops = counter.get_total_flops() / 2
    if v.execution is None:
        return
    opened, possible, skipped, blocks = 0.0, 0, 0.0, 0
    for _, stage in dg_stages(v.model):
        adj, ran = stage.last_adjacency, stage.last_executed
        assert adj is not None and ran is not None
        opened += float((adj[:, stage.wiring_mask.to(adj.device)] > 0).float().sum(dim=1).mean())
        possible += stage.possible_edges
        skipped += float((~ran[:, 1:-1]).float().sum(dim=1).mean())
        blocks += stage.num_blocks
    v.active, v.skipped = opened / possible, skipped / blocks


def spread(values: list[float], fmt: str = "{:.3f}") -> str:
    return "/".join(fmt.format(f(values)) for f in (min, statistics.median, max))


def bench(name: str, args: argparse.Namespace, device: torch.device) -> None:
    dg, plain, full_x, real = load(name, args, device)
    for model in (dg, plain):
        set_memory_format(model, args.memory_format)
    executions = ["masked"] if args.compile else args.executions.split(",")  # what auto runs under compile
    if args.compile:
        configure_compiling_thread()  # as a serving worker compiles: weights frozen into the graph
    # One compiled wrapper per module. Compiled, the weights are frozen into the graph, τ
    # with them, so each DG-Net variant compiles its own copy with its own τ.
    runs: dict[int, Callable[[Tensor], object]] = {}

    def run(v: Variant) -> Callable[[Tensor], object]:
        if id(v.model) not in runs:
            runs[id(v.model)] = torch.compile(v.model) if args.compile else v.model
        return runs[id(v.model)]

    def own(model: nn.Module) -> nn.Module:
        return copy.deepcopy(model) if args.compile else model

    stored_taus = [stage.tau.detach().clone() for _, stage in dg_stages(dg)]
    for b in (int(s) for s in args.batch_sizes.split(",")):
        runs.clear()  # the last batch size's copies and graphs go
        x = full_x[:b]
        variants = [Variant("plain", plain, None)]
        open_taus = [torch.full_like(t, -1.0) for t in stored_taus]
        close = {f"close-{q}": close_taus(dg, x, float(q)) for q in args.close.split(",") if q}
        for mode in executions:
            variants.append(Variant(f"open/{mode}", own(dg), mode, open_taus))
            if real:
                variants.append(Variant(f"routed/{mode}", own(dg), mode, stored_taus))
            variants += [Variant(f"{key}/{mode}", own(dg), mode, taus) for key, taus in close.items()]
        with torch.inference_mode():
            for v in variants:
                observe(v, x)
                v.prepare()
                for _ in range(2):  # warm-up (and, with --compile, the compile)
                    run(v)(x)
            base = variants[1]
            base.prepare()
            once = min(timed(lambda: run(base)(x), 1, device) for _ in range(3))
            iters = max(3, int(args.min_time / max(once, 1e-6)))
            for r in range(args.rounds):
                for v in variants if r % 2 == 0 else variants[::-1]:
                    v.prepare()
                    v.times.append(timed(lambda v=v: run(v)(x), iters, device))
            if args.profile:
                profile(base.name, run(base), x, device)
        compiled = ", compiled" if args.compile else ""
        print(f"\n## {name}, batch {b}, {device.type}{compiled}, {args.rounds} rounds × {iters} forwards per variant")
        print("| variant | ms/forward min/med/max | MFLOPs (MACs) | active edges | blocks skipped "
              "| vs plain | speed-up vs open | FLOP speed-up | ratio |")
        print("|---|---|---|---|---|---|---|---|---|")
        plain_v = variants[0]
        for v in variants:
            ms = spread([t * 1e3 for t in v.times], "{:.2f}")
            row = f"| {v.name} | {ms} | {v.flops / 1e6:.0f} | "
            if v.execution is None:
                print(row + "- | - | 1 | - | - | - |")
                continue
            open_v = next(o for o in variants if o.name == f"open/{v.execution}")
            vs_plain = spread([t / p for t, p in zip(v.times, plain_v.times, strict=True)])
            row += f"{v.active:.3f} | {v.skipped:.3f} | {vs_plain} | "
            if v is open_v:
                print(row + "1 | 1 | - |")
                continue
            speed = [o / t for o, t in zip(open_v.times, v.times, strict=True)]
            flop_speed = open_v.flops / v.flops
            print(row + f"{spread(speed)} | {flop_speed:.3f} | {spread([s / flop_speed for s in speed])} |")


def profile(name: str, forward: Callable[[Tensor], object], x: Tensor, device: torch.device) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(5):
            forward(x)
        sync(device)
    print(f"\n### torch.profiler, {name}, batch {x.shape[0]}: top ops by self time")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def main() -> None:
    args = parse_args()
    kept = args.malloc == "kept" and keep_large_blocks()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, "
          f"malloc {'keeping large blocks' if kept else 'as glibc sets it'}, memory format {args.memory_format}",
          file=sys.stderr)
    for name in args.models.split(","):
        bench(name, args, device)


if __name__ == "__main__":
    main()
