"""Screenshots of the web inspector for the README: the single-image view after an upload,
and the aggregate view, from a running server, with Debian's chromium driven by playwright.

    .venv/bin/dgserve serve &      # DGSERVE_MODELS=shapes-dgnet is enough
    .venv/bin/python scripts/inspector_screenshots.py --base http://127.0.0.1:8000

First it sends ``--images`` generated scenes (every class in turn) to the model, tagged
``truth:<class>``, so that the aggregate view has groups to show; ``--images 0`` sends none.
Writes ``docs/inspector-image.png`` and ``docs/inspector-aggregate.png`` (``--out``).
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import tempfile
from pathlib import Path

import httpx
from playwright.sync_api import expect, sync_playwright

from dgserve.data.scenes import render_classification

WAIT_MS = 60_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="http://127.0.0.1:8000", help="the running dgserve")
    parser.add_argument("--model", default="shapes-dgnet")
    parser.add_argument("--key", default=None, help="an API key, if the server has keys on")
    parser.add_argument("--images", type=int, default=48, help="scenes to send first, for the aggregate")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "docs")
    args = parser.parse_args()
    chromium = shutil.which("chromium")
    if chromium is None:
        sys.exit("needs the chromium binary: apt-get install chromium")

    headers = {"Authorization": f"Bearer {args.key}"} if args.key else {}
    labels = httpx.get(f"{args.base}/v1/models/{args.model}", headers=headers).raise_for_status().json()
    labels = labels["versions"][0]["labels"]
    for index in range(args.images):
        buf = io.BytesIO()
        image, label = render_classification(2026, index, 64)
        image.save(buf, "PNG")
        httpx.post(f"{args.base}/v1/models/{args.model}/classify", params={"tag": f"truth:{labels[label]}"},
                   content=buf.getvalue(), headers={**headers, "content-type": "image/png"},
                   timeout=60).raise_for_status()  # fmt: skip

    args.out.mkdir(parents=True, exist_ok=True)
    expect.set_options(timeout=WAIT_MS)
    with sync_playwright() as playwright, tempfile.TemporaryDirectory() as tmp:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(f"{args.base}/inspector")
        if args.key:
            page.fill("#api-key", args.key)
            page.click("#key-form button[type='submit']")
        expect(page.locator(f"#model option[value='{args.model}']")).to_have_count(1)

        picture = Path(tmp) / "heart.png"
        render_classification(7, 3, 64)[0].save(picture)  # the README's example image
        page.select_option("#model", args.model)
        page.set_input_files("#file", str(picture))
        expect(page.locator("#stages svg[data-stage]").first).to_be_visible()
        page.screenshot(path=args.out / "inspector-image.png", full_page=True)

        page.click("button.tab[data-view='aggregate']")
        page.select_option("#aggregate-model", args.model)
        page.fill("#aggregate-group", "tag:truth" if args.images else "label")
        page.fill("#aggregate-topk", "3")
        page.click("#aggregate-form button[type='submit']")
        expect(page.locator("#distance-matrix")).to_be_visible()
        page.screenshot(path=args.out / "inspector-aggregate.png", full_page=True)
        browser.close()
    print(f"wrote {args.out / 'inspector-image.png'} and {args.out / 'inspector-aggregate.png'}")


if __name__ == "__main__":
    main()
