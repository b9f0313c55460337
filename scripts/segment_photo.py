"""POST a real photograph to /segment and draw the answer over it (for docs/segmentation.md).

    .venv/bin/pip install scikit-image   # its wheel ships the photographs; not a dgserve dependency
    .venv/bin/python scripts/segment_photo.py [--photo astronaut] [--model shapes-segmenter] [--out docs/...]

Runs the real app in-process on the bundled store, sends the photo as a PNG exactly
as a client would, prints the response's per-class shares and GloRe projection
summary, and writes a three-panel PNG: the photo, the label map over it (the
response's palette), and the GloRe unit's projection map upsampled over it.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import tempfile
from pathlib import Path
from typing import Any

import httpx
import matplotlib

matplotlib.use("Agg")  # files only; no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from dgserve.api.app import create_app  # noqa: E402
from dgserve.settings import Settings  # noqa: E402
from dgserve.tasks.segmentation import decode_label_map, palette  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


async def segment(png: bytes, model: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as data_dir:
        settings = Settings(model_store=ROOT / "model_store", data_dir=Path(data_dir), models=[model], grpc_port=None)
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://dgserve", timeout=300) as client:
                while (await client.get("/readyz")).status_code != 200:
                    await asyncio.sleep(0.1)
                response = await client.post(f"/v1/models/{model}/segment", content=png,
                                             headers={"content-type": "image/png"})  # fmt: skip
                response.raise_for_status()
                return dict(response.json())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photo", default="astronaut", help="a scikit-image sample (skimage.data.<name>)")
    parser.add_argument("--model", default="shapes-segmenter")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "segmentation-astronaut.png")
    args = parser.parse_args()
    import skimage.data

    photo = Image.fromarray(getattr(skimage.data, args.photo)()).convert("RGB")
    buffer = io.BytesIO()
    photo.save(buffer, "PNG")
    body = asyncio.run(segment(buffer.getvalue(), args.model))
    [result] = body["results"]
    prediction = result["predictions"]
    print(json.dumps({"image": result["image"], "classes": prediction["classes"],
                      "glore_units": [u["projection_summary"] for u in result["connectivity"]["glore_units"]]},
                     indent=1))  # fmt: skip

    label_map = decode_label_map(prediction)
    colours = np.array(palette(), dtype=np.uint8).reshape(256, 3)
    # Class 0 is the bundled models' background: leave the photo as it is there.
    tinted = (0.35 * np.asarray(photo) + 0.65 * colours[label_map]).astype(np.uint8)
    overlay = np.where(label_map[..., None] > 0, tinted, np.asarray(photo))
    figure, axes = plt.subplots(1, 3, figsize=(15, 5.4))
    axes[0].imshow(photo)
    axes[0].set_title(f"{args.photo} ({photo.width}x{photo.height}), as uploaded")
    axes[1].imshow(overlay)
    shares = ", ".join(f"{c['label']} {c['pixel_fraction']:.1%}" for c in prediction["classes"][:4])
    axes[1].set_title(f"label map at the upload's size\n{shares}", fontsize=9)
    units = result["connectivity"]["glore_units"]
    if units:
        projection = np.array(units[0]["projection"])
        axes[2].imshow(photo)
        axes[2].imshow(projection, cmap="tab20", alpha=0.55, extent=(0, photo.width, photo.height, 0),
                       interpolation="nearest")  # fmt: skip
        axes[2].set_title(f"GloRe unit {units[0]['unit']}: node each location projects to\n"
                          f"{projection.shape[0]}x{projection.shape[1]} feature map, "
                          f"{units[0]['projection_summary']['nodes_used']} of {units[0]['num_nodes']} nodes used",
                          fontsize=9)  # fmt: skip
    for axis in axes:
        axis.axis("off")
    figure.suptitle(f"POST /v1/models/{args.model}/segment", fontsize=11)
    figure.tight_layout(rect=(0, 0, 1, 0.94))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=64)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
