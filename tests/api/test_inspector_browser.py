"""The web inspector (``GET /inspector``) in a real browser: Debian's chromium, headless,
driven by playwright against a real ``dgserve serve``.

Upload an image of a known class and see its label and one graph per DG-Net stage; see a
GloRe model's projection maps; list the records and compare two; open the aggregate view
and see its groups and distance matrix; with API keys on, load the page without a key and
use it with one. Every console message and page error fails the test, so a script error,
a missing asset or a blocked load (the page's CSP allows only the server itself) shows.

Needs the ``chromium`` binary (``.ci/run`` installs Debian's package); without it the tests
skip, saying so, except under ``CI=true``, where they fail.
"""

from __future__ import annotations

import io
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from server_process import ServerProcess  # noqa: E402

from dgserve.data.scenes import render_classification

pytestmark = [pytest.mark.timeout(600)]

MODELS = "shapes-dgnet,shapes-glore,shapes-detector"
DGNET_STAGES = 4  # shapes-dgnet's layer1..layer4
GLORE_UNITS = 2  # shapes-glore's layer2.units.0, layer3.units.0
SEEDED = 8  # records sent before the page opens, one per class index
KEY = "inspector-key-0123456789abcdef"
WAIT_MS = 60_000  # CPU inference on a shared 2-core machine, with the server just warmed up


def _chromium() -> str:
    """The system chromium, with playwright to drive it; else skip, or fail under ``CI=true``."""
    path = shutil.which("chromium")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        reason = "no playwright (pip install -e '.[test]')"
    else:
        if path is not None:
            return path
        reason = "no chromium on PATH (apt-get install chromium; .ci/run does)"
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def _png(server: ServerProcess, seed: int, index: int, path: Path) -> tuple[Path, str]:
    """A generated scene saved as PNG, and its class's name in the served model's labels."""
    image, label = render_classification(seed, index, 64)
    image.save(path, "PNG")
    model = httpx.get(f"{server.base}/v1/models/shapes-dgnet", headers={"Authorization": f"Bearer {KEY}"}).json()
    return path, model["versions"][0]["labels"][label]


def _png_bytes(seed: int, index: int) -> bytes:
    buf = io.BytesIO()
    render_classification(seed, index, 64)[0].save(buf, "PNG")
    return buf.getvalue()


class Browser:
    """One headless chromium page that records every console message and page error."""

    def __init__(self, executable: str) -> None:
        from playwright.sync_api import sync_playwright

        self._playwright = sync_playwright().start()
        self._browser = self._playwright.chromium.launch(executable_path=executable, headless=True)
        self.page = self._browser.new_page(viewport={"width": 1400, "height": 1000})
        self.page.set_default_timeout(WAIT_MS)
        self.console: list[str] = []
        self.page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        self.page.on("pageerror", lambda e: self.console.append(f"pageerror: {e}"))

    def close(self) -> None:
        self._browser.close()
        self._playwright.stop()


@pytest.fixture
def browser() -> Iterator[Browser]:
    opened = Browser(_chromium())
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    with ServerProcess(tmp_path / "server", {"DGSERVE_MODELS": MODELS}) as running:
        yield running


def _expect() -> Any:
    from playwright.sync_api import expect

    expect.set_options(timeout=WAIT_MS)
    return expect


def test_inspector_upload_records_and_aggregate(browser: Browser, server: ServerProcess, tmp_path: Path) -> None:
    expect = _expect()
    # Records of several classes first, so the aggregate has groups to tell apart.
    seeded: set[str] = set()
    for index in range(SEEDED):
        answer = httpx.post(f"{server.base}/v1/models/shapes-dgnet/classify", content=_png_bytes(11, index),
                            headers={"content-type": "image/png"}, timeout=60)  # fmt: skip
        assert answer.status_code == 200, answer.text
        seeded.add(answer.json()["results"][0]["predictions"][0]["label"])

    page = browser.page
    page.goto(f"{server.base}/inspector")
    expect(page.locator("#model option")).to_have_count(3)

    # One image of a known class: the right label on top, one graph per stage.
    image, label = _png(server, 7, 3, tmp_path / "known.png")
    page.select_option("#model", "shapes-dgnet")
    page.set_input_files("#file", str(image))
    expect(page.locator("#stages svg[data-stage]")).to_have_count(DGNET_STAGES)
    expect(page.locator("#predictions li").first).to_have_attribute("data-label", label)
    stages = page.locator("#stages svg[data-stage]").evaluate_all("els => els.map(e => e.dataset.stage)")
    assert stages == ["layer1", "layer2", "layer3", "layer4"]
    # Each stage's graph draws its open edges and its heatmap cells (4 nodes: 16 cells).
    first = page.locator("#stages svg[data-stage='layer1']")
    assert first.locator("path[data-open='true']").count() >= 1
    expect(first.locator("g.heatmap rect")).to_have_count(16)
    dgnet_id = page.locator("#record-link code").inner_text()

    # GloRe: a projection map per unit, over the image.
    page.select_option("#model", "shapes-glore")
    page.set_input_files("#file", str(image))
    expect(page.locator("#glore figure[data-unit]")).to_have_count(GLORE_UNITS)
    expect(page.locator("#stages svg[data-stage]")).to_have_count(0)
    expect(page.locator("#predictions li").first).to_have_attribute("data-label", label)

    # Records: the newest first; open two side by side and see where their paths differ.
    page.click("button.tab[data-view='records']")
    page.select_option("#records-model", "shapes-dgnet")
    page.click("#records-form button[type='submit']")
    expect(page.locator("#records tbody tr")).to_have_count(SEEDED + 1)  # and the page's upload
    assert page.locator("#records tbody tr").first.get_attribute("data-id") == dgnet_id
    page.locator("#records tbody tr").nth(0).locator("button[data-pane='a']").click()
    page.locator("#records tbody tr").nth(1).locator("button[data-pane='b']").click()
    expect(page.locator("#record-a svg[data-stage]")).to_have_count(DGNET_STAGES)
    expect(page.locator("#record-b svg[data-stage]")).to_have_count(DGNET_STAGES)
    expect(page.locator("#compare-diff")).to_contain_text("layer1:")

    # The aggregate view: one heatmap per group per stage, and the group distance matrix.
    page.click("button.tab[data-view='aggregate']")
    page.select_option("#aggregate-model", "shapes-dgnet")
    page.click("#aggregate-form button[type='submit']")
    summary = httpx.get(f"{server.base}/v1/models/shapes-dgnet/connectivity", params={"group_by": "label"}).json()
    groups = summary["distance"]["keys"]
    assert set(groups) == seeded | {label}
    expect(page.locator("#distance-matrix rect")).to_have_count(len(groups) ** 2)
    expect(page.locator("#groups .group-row[data-stage]")).to_have_count(DGNET_STAGES)
    expect(page.locator("#groups .group-row[data-stage='layer1'] svg[data-group]")).to_have_count(len(groups))
    expect(page.locator("#patterns table[data-stage]")).to_have_count(DGNET_STAGES)
    expect(page.locator("#aggregate-count")).to_contain_text(f"{summary['count']} images")

    assert browser.console == []


def test_inspector_with_api_keys(tmp_path: Path, browser: Browser) -> None:
    expect = _expect()
    with ServerProcess(tmp_path / "server", {"DGSERVE_API_KEYS": KEY}) as server:
        # The page's own files load without a key; the API behind it does not.
        for asset in ("/inspector", "/inspector/inspector.js", "/inspector/inspector.css"):
            answer = httpx.get(server.base + asset)
            assert answer.status_code == 200, asset
            assert "default-src 'self'" in answer.headers["content-security-policy"]
        assert httpx.get(f"{server.base}/inspector/auth.py").status_code == 404  # only the page's files
        assert httpx.get(f"{server.base}/v1/models").status_code == 401
        paths = httpx.get(f"{server.base}/openapi.json").json()["paths"]
        assert not [p for p in paths if p.startswith("/inspector")]  # a page, not the API

        page = browser.page
        page.goto(f"{server.base}/inspector")
        expect(page.locator("#status")).to_contain_text("API key")  # the 401, explained
        before_key = len(browser.console)
        page.fill("#api-key", KEY)
        page.click("#key-form button[type='submit']")
        expect(page.locator("#model option")).to_have_count(1)
        image, label = _png(server, 7, 3, tmp_path / "known.png")
        page.set_input_files("#file", str(image))
        expect(page.locator("#stages svg[data-stage]")).to_have_count(DGNET_STAGES)
        expect(page.locator("#predictions li").first).to_have_attribute("data-label", label)
        assert page.evaluate("sessionStorage.getItem('dgserve.apiKey')") == KEY

    # Before the key, the only message is the browser's note of the refused /v1/models.
    assert all("401" in line for line in browser.console[:before_key]), browser.console
    assert browser.console[before_key:] == []
