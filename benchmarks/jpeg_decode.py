"""JPEG uploads to model inputs: PIL on the CPU (the server's path) against torchvision's
decode_jpeg on the CPU and, with a GPU, nvJPEG (``decode_jpeg(device="cuda")``, batched).

Each method turns the same B encoded JPEGs into B preprocessed model inputs (decode,
resize, crop, normalise, as ``dgserve.imaging.preprocess`` does), in alternating rounds,
so each round's ratios compare measurements taken side by side. Printed per round:
images/s of each method; at the end each method's ratio to PIL as min/median/max.
Decode-only figures (no resize) are printed too, since that is what nvJPEG replaces.

Usage::

    python benchmarks/jpeg_decode.py --device cuda --width 640 --height 480 --batch 32 --rounds 5
    python benchmarks/jpeg_decode.py --device cpu --batch 8 --rounds 3     # a CPU smoke run
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

from dgserve.data.scenes import render_classification
from dgserve.imaging import IMAGENET_MEAN, IMAGENET_STD, preprocess, preprocess_pixels
from dgserve.model_store import Preprocessing
from dgserve.serving.decode import decode_image, decode_jpegs_pixels

MAX_PIXELS = 10**9


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda[:N]")
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--input-size", type=int, default=224, help="model input (square, center_crop)")
    p.add_argument("--batch", type=int, default=32, help="JPEGs per timed pass (one nvJPEG batch)")
    p.add_argument("--passes", type=int, default=3, help="timed passes per method per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the decode pool pins 1)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return p.parse_args()


def jpegs(args: argparse.Namespace) -> list[bytes]:
    out = []
    for seed in range(args.batch):
        scene, _ = render_classification(seed, seed, 128)
        buf = io.BytesIO()
        scene.resize((args.width, args.height), Image.Resampling.BICUBIC).save(buf, "JPEG", quality=args.quality)
        out.append(buf.getvalue())
    return out


def methods(data: list[bytes], pre: Preprocessing, device: torch.device) -> dict[str, Callable[[], object]]:
    def pil_full() -> object:
        return [preprocess(decode_image(d, max_pixels=MAX_PIXELS), pre) for d in data]

    def pil_decode() -> object:
        return [decode_image(d, max_pixels=MAX_PIXELS) for d in data]

    def tv_cpu_full() -> object:
        # One image at a time, as a decode-pool thread would.
        return [preprocess_pixels(decode_jpegs_pixels([d], max_pixels=MAX_PIXELS)[0], pre)  # type: ignore[arg-type]
                for d in data]

    def tv_cpu_decode() -> object:
        return [decode_jpegs_pixels([d], max_pixels=MAX_PIXELS)[0] for d in data]

    out: dict[str, Callable[[], object]] = {
        "pil+preprocess": pil_full, "torchvision-cpu+preprocess": tv_cpu_full,
        "pil decode only": pil_decode, "torchvision-cpu decode only": tv_cpu_decode,
    }
    if device.type == "cuda":
        def gpu_full() -> object:
            pixels = decode_jpegs_pixels(data, max_pixels=MAX_PIXELS, device=device)
            batch = torch.stack([preprocess_pixels(p, pre) for p in pixels])  # type: ignore[arg-type]
            torch.cuda.synchronize(device)
            return batch

        def gpu_decode() -> object:
            pixels = decode_jpegs_pixels(data, max_pixels=MAX_PIXELS, device=device)
            torch.cuda.synchronize(device)
            return pixels

        out["nvjpeg-batched+preprocess"] = gpu_full
        out["nvjpeg-batched decode only"] = gpu_decode
    return out


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    pre = Preprocessing(input_size=(args.input_size, args.input_size), mean=IMAGENET_MEAN, std=IMAGENET_STD)
    data = jpegs(args)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {device} ({name}); {args.batch} JPEGs of {args.width}x{args.height} "
          f"(mean {sum(map(len, data)) / len(data) / 1024:.0f} KiB) -> {args.input_size}px, "
          f"{args.passes} passes x {args.rounds} rounds, torch threads {args.threads}")
    table = methods(data, pre, device)
    for fn in table.values():  # warm-up: nvJPEG handles, allocator, oneDNN
        fn()
    rounds: list[dict[str, float]] = []
    for r in range(args.rounds):
        rates = {}
        for label, fn in table.items():
            started = time.perf_counter()
            for _ in range(args.passes):
                fn()
            rates[label] = args.passes * len(data) / (time.perf_counter() - started)
        rounds.append(rates)
        print(f"round {r + 1}: " + " | ".join(f"{k} {v:.0f} img/s" for k, v in rates.items()), flush=True)
    summary = {}
    for label in table:
        base = "pil decode only" if "decode only" in label else "pil+preprocess"
        if label == base:
            continue
        ratios = sorted(rd[label] / rd[base] for rd in rounds)
        summary[label] = {"min": ratios[0], "median": statistics.median(ratios), "max": ratios[-1]}
        print(f"{label} / {base}: median {summary[label]['median']:.2f}x "
              f"(min {ratios[0]:.2f}, max {ratios[-1]:.2f}, {len(ratios)} rounds)")
    if args.json is not None:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "rounds": rounds, "ratios": summary}, indent=2))


if __name__ == "__main__":
    main()
