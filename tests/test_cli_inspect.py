"""``dgserve inspect summary|export|plot`` against a real running server."""

from __future__ import annotations

import io
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from dgserve.cli import app
from dgserve.data.scenes import render_classification

sys.path.insert(0, str(Path(__file__).parent / "api"))
from server_process import ServerProcess  # noqa: E402

pytestmark = pytest.mark.timeout(600)
IMAGES = 16  # two per class: labels cycle through the eight classes


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    process = ServerProcess(tmp_path_factory.mktemp("inspect-cli")).start()
    try:
        for index in range(IMAGES):
            image, label = render_classification(31, index, 64)
            buffer = io.BytesIO()
            image.save(buffer, "PNG")
            response = httpx.post(f"{process.base}/v1/models/shapes-dgnet/classify",
                                  params=[("tag", f"truth:{label}"), ("tag", "split:val")],
                                  content=buffer.getvalue(), headers={"content-type": "image/png"}, timeout=60)  # fmt: skip
            assert response.status_code == 200, response.text
        yield process
    finally:
        process.stop()


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def test_summary_prints_a_table_per_group_and_the_distances(server: ServerProcess) -> None:
    code, output = run("inspect", "summary", "shapes-dgnet", "--group-by", "tag:truth", "--tag", "split:val",
                       "--url", server.base)  # fmt: skip
    assert code == 0, output
    assert f"shapes-dgnet: {IMAGES} images, grouped by tag:truth" in output
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        assert stage in output
    assert "distance between groups" in output
    code, output = run("inspect", "summary", "shapes-dgnet", "--json", "--url", server.base)
    assert code == 0 and f'"count": {IMAGES}' in output


def test_export_writes_a_parquet_file_pandas_reads(server: ServerProcess, tmp_path: Path) -> None:
    out = tmp_path / "paths.parquet"
    code, output = run("inspect", "export", str(out), "--model", "shapes-dgnet", "--url", server.base)
    assert code == 0, output
    frame = pd.read_parquet(out)
    assert len(frame) == IMAGES and set(frame["model"]) == {"shapes-dgnet"}
    assert not (tmp_path / "paths.parquet.part").exists()


def test_plot_draws_a_record_or_a_summary(server: ServerProcess, tmp_path: Path) -> None:
    listing = httpx.get(f"{server.base}/v1/inspections", params={"limit": 1}, timeout=30).json()
    record_id = listing["records"][0]["id"]
    png = tmp_path / "one.png"
    assert run("inspect", "plot", str(png), "--id", record_id, "--url", server.base)[0] == 0
    with Image.open(png) as picture:
        assert picture.format == "PNG"
    svg = tmp_path / "all.svg"
    code, output = run("inspect", "plot", str(svg), "--model", "shapes-dgnet", "--group-by", "label", "--url", server.base)
    assert code == 0, output
    assert b"<svg" in svg.read_bytes()[:2000]


def test_errors_come_back_as_the_servers_message(server: ServerProcess, tmp_path: Path) -> None:
    code, output = run("inspect", "summary", "shapes-dgnet", "--group-by", "colour", "--url", server.base)
    assert code == 2 and "group_by must be" in output
    code, output = run("inspect", "summary", "no-such-model", "--url", server.base)
    assert code == 2 and "404" in output
    code, output = run("inspect", "plot", str(tmp_path / "x.gif"), "--model", "shapes-dgnet", "--url", server.base)
    assert code != 0
