"""Send labelled generated shapes to a running server, tagged with their true class.

    .venv/bin/python scripts/labelled_shapes.py --per-class 100 [--url http://127.0.0.1:8000]
    .venv/bin/dgserve inspect summary shapes-dgnet --group-by tag:truth

Each image is one of the eight shapes, drawn from a seed no training run used, and is
posted as a PNG to ``/classify`` with ``?tag=truth:<class>&tag=split:<--split>``, the way
a researcher sends a labelled validation set through the server. The summary grouped by
``tag:truth`` then shows which path each true class takes (docs/dgnet.md reads one).
Prints the top-1 accuracy of the answers.
"""

from __future__ import annotations

import argparse
import io
import os

import httpx

from dgserve.data.scenes import render_classification
from dgserve.data.shapes import CLASSES

SEED = 777  # not a training or validation seed of the bundled models


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=os.environ.get("DGSERVE_URL", "http://127.0.0.1:8000"))
    p.add_argument("--model", default="shapes-dgnet")
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--split", default="val")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--api-key", default=os.environ.get("DGSERVE_API_KEY"))
    args = p.parse_args()

    headers = {"Content-Type": "image/png"}
    if args.api_key:
        headers["Authorization"] = f"Bearer {args.api_key}"
    total, right = args.per_class * len(CLASSES), 0
    with httpx.Client(base_url=args.url, timeout=60) as client:
        # render_classification cycles through the classes, so every prefix is balanced.
        for index in range(total):
            image, label = render_classification(SEED, index, args.size)
            buf = io.BytesIO()
            image.save(buf, "PNG")
            tags = [("tag", f"truth:{CLASSES[label]}"), ("tag", f"split:{args.split}")]
            r = client.post(f"/v1/models/{args.model}/classify", content=buf.getvalue(), headers=headers, params=tags)
            r.raise_for_status()
            right += r.json()["results"][0]["predictions"][0]["label"] == CLASSES[label]
    print(f"{total} images sent to {args.model}; top-1 accuracy {right / total:.3f}")


if __name__ == "__main__":
    main()
