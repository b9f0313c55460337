"""Tags on /v1 and the Open Inference Protocol, the connectivity summary, and the Parquet
export, through the app (``main_client`` serves a DG-Net "clf" and a GloRe "glore").

Each test tags its requests with a fresh ``run`` tag, so it sees only its own records
in the session's shared store.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import httpx
import numpy as np
import pandas as pd
import polars as pl
import pytest

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(600)]

Encode = Callable[..., bytes]


def run_tag() -> str:
    return f"run:{uuid.uuid4().hex[:12]}"


async def classify(client: httpx.AsyncClient, image: Encode, tags: list[str], seed: int, model: str = "clf") -> dict[str, Any]:
    response = await client.post(f"/v1/models/{model}/classify", params=[("tag", t) for t in tags],
                                 content=image(seed=seed), headers={"content-type": "image/jpeg"})  # fmt: skip
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()["results"][0]
    return result


async def test_v1_tags_are_stored_and_filter_the_listing(main_client: httpx.AsyncClient, image: Encode) -> None:
    run = run_tag()
    results = [await classify(main_client, image, [run, f"truth:{t}"], seed=i) for i, t in enumerate(["cat", "dog", "cat"])]
    record = (await main_client.get(f"/v1/inspections/{results[0]['id']}")).json()
    assert record["tags"] == {"run": run[4:], "truth": "cat"}
    listed = (await main_client.get("/v1/inspections", params=[("tag", run), ("tag", "truth:cat"), ("limit", "100")])).json()
    assert [r["id"] for r in listed["records"]] == [results[0]["id"], results[2]["id"]]
    label = results[1]["predictions"][0]["label"]
    by_label = (await main_client.get("/v1/inspections", params=[("tag", run), ("label", label)])).json()
    assert results[1]["id"] in {r["id"] for r in by_label["records"]}


@pytest.mark.parametrize("tags", [["nocolon"], ["bad key:x"], ["k:has space"], ["k:a", "k:b"],
                                  [f"k{i}:v" for i in range(17)], ["k:" + "v" * 129]])  # fmt: skip
async def test_bad_tags_are_422_before_the_body_is_read(main_client: httpx.AsyncClient, tags: list[str]) -> None:
    response = await main_client.post("/v1/models/clf/classify", params=[("tag", t) for t in tags], content=b"not an image",
                                      headers={"content-type": "image/jpeg"})  # fmt: skip
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_tag"
    listing = await main_client.get("/v1/inspections", params=[("tag", t) for t in tags])
    assert listing.status_code == 422 and listing.json()["error"]["code"] == "invalid_tag"


async def test_oip_tags_parameter(main_client: httpx.AsyncClient) -> None:
    run = run_tag()
    body = {"parameters": {"tags": f"{run},truth:owl"}, "outputs": [{"name": "inspection_id"}],
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 64, 64], "data": [0.0] * (3 * 64 * 64)}]}  # fmt: skip
    response = await main_client.post("/v2/models/clf/infer", json=body)
    assert response.status_code == 200, response.text
    [inspection_id] = response.json()["outputs"][0]["data"]
    record = (await main_client.get(f"/v1/inspections/{inspection_id}")).json()
    assert record["tags"] == {"run": run[4:], "truth": "owl"}
    for bad in ("truth:owl,truth:cat", 7, "no-colon"):
        refused = await main_client.post("/v2/models/clf/infer", json={**body, "parameters": {"tags": bad}})
        assert refused.status_code == 400 and "tag" in refused.json()["error"]


async def test_connectivity_summary_groups_by_tag_and_label(main_client: httpx.AsyncClient, image: Encode) -> None:
    run = run_tag()
    truths = ["cat", "dog", "cat", "owl", "dog", "cat"]
    results = [await classify(main_client, image, [run, f"truth:{t}"], seed=20 + i) for i, t in enumerate(truths)]
    response = await main_client.get("/v1/models/clf/connectivity", params=[("tag", run), ("group_by", "tag:truth")])
    assert response.status_code == 200, response.text
    summary = response.json()
    assert summary["count"] == 6 and summary["group_by"] == "tag:truth" and summary["tags"] == {"run": run[4:]}
    assert [(g["key"], g["count"]) for g in summary["groups"]] == [("cat", 3), ("dog", 2), ("owl", 1)]
    cats = [r for r, t in zip(results, truths, strict=True) if t == "cat"]
    for index, stage in enumerate(summary["groups"][0]["stages"]):
        adjacency = np.array([r["connectivity"]["stages"][index]["adjacency"] for r in cats])
        np.testing.assert_allclose(stage["adjacency_open_frequency"], (adjacency != 0).mean(0), atol=1e-6)
        np.testing.assert_allclose(stage["adjacency_mean"], adjacency.mean(0), atol=1e-5)
        assert stage["stage"] == results[0]["connectivity"]["stages"][index]["stage"]
    assert len(summary["distance"]["matrix"]) == 3 and summary["distance"]["keys"] == ["cat", "dog", "owl"]
    assert [m["name"] for m in summary["modules"]["stages"]] == [s["stage"] for s in results[0]["connectivity"]["stages"]]
    by_label = (await main_client.get("/v1/models/clf/connectivity", params=[("tag", run), ("group_by", "label")])).json()
    labels = sorted({r["predictions"][0]["label"] for r in results})
    assert [g["key"] for g in by_label["groups"]] == labels and sum(g["count"] for g in by_label["groups"]) == 6


@pytest.mark.parametrize(("path", "params", "status", "code"), [
    ("/v1/models/clf/connectivity", [("group_by", "tag:nosuchkey")], 422, "invalid_analysis"),
    ("/v1/models/clf/connectivity", [("tag", "nosuchkey:x")], 422, "invalid_analysis"),
    ("/v1/models/clf/connectivity", [("since", "yesterday")], 422, "invalid_request"),
    ("/v1/models/clf/connectivity", [("until", "9999-12-31T23:59:59-23:59")], 422, "invalid_analysis"),
    ("/v1/models/clf/connectivity", [("version", str(2**40))], 422, "invalid_request"),
    ("/v1/models/clf/connectivity", [("since", "2025-01-02T00:00:00Z"), ("until", "2025-01-01T00:00:00Z")], 422, "invalid_analysis"),
    ("/v1/models/clf/connectivity", [("group_by", "stage")], 422, "invalid_analysis"),
    ("/v1/models/clf/connectivity", [("group_by", "tag:bad key")], 422, "invalid_tag"),
    ("/v1/models/clf/connectivity", [("kind", "glore_units")], 422, "invalid_analysis"),
    ("/v1/models/clf/connectivity", [("top_k", "0")], 422, "invalid_request"),
    ("/v1/models/no-such-model/connectivity", [], 404, "model_not_found"),
    ("/v1/inspections/export", [("format", "csv")], 422, "invalid_request"),
    ("/v1/inspections/export", [("until", "not a time")], 422, "invalid_request"),
])  # fmt: skip
async def test_bad_analysis_parameters_get_clear_errors(
    main_client: httpx.AsyncClient, image: Encode, path: str, params: list[tuple[str, str]], status: int, code: str
) -> None:
    await classify(main_client, image, [run_tag()], seed=1)  # clf has records, and tag key "run"
    response = await main_client.get(path, params=params)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"]


async def test_parquet_export_reads_in_pandas_polars_and_duckdb(
    main_client: httpx.AsyncClient, image: Encode, tmp_path: Path
) -> None:
    run = run_tag()
    results = [await classify(main_client, image, [run, "split:val"], seed=40 + i) for i in range(5)]
    response = await main_client.get("/v1/inspections/export", params=[("format", "parquet"), ("model", "clf"), ("tag", run)])
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/vnd.apache.parquet"
    data = response.content
    frame = pd.read_parquet(io.BytesIO(data))
    assert list(frame["id"]) == [r["id"] for r in results]
    stages = results[0]["connectivity"]["stages"]
    for index, stage in enumerate(stages):
        column = f"stages/{stage['stage']}/adjacency"
        exported = np.stack(frame[column].to_numpy())
        want = np.array([np.ravel(r["connectivity"]["stages"][index]["adjacency"]) for r in results], np.float32)
        np.testing.assert_array_equal(exported, want)
        executed = np.stack(frame[f"stages/{stage['stage']}/executed"].to_numpy())
        assert executed.tolist() == [r["connectivity"]["stages"][index]["executed"] for r in results]
    assert list(frame["label"]) == [r["predictions"][0]["label"] for r in results]
    np.testing.assert_allclose(frame["score"], [r["predictions"][0]["score"] for r in results])
    assert dict(frame["tags"][0]) == {"run": run[4:], "split": "val"}
    assert str(frame["created_at"].dtype) == "datetime64[us, UTC]"
    polars = pl.read_parquet(io.BytesIO(data))
    assert polars["id"].to_list() == [r["id"] for r in results]
    assert polars[f"stages/{stages[0]['stage']}/adjacency"].to_list()[0] == pytest.approx(
        np.ravel(results[0]["connectivity"]["stages"][0]["adjacency"]).tolist()
    )
    path = tmp_path / "export.parquet"
    path.write_bytes(data)
    column = f"stages/{stages[0]['stage']}/adjacency"
    with duckdb.connect() as db:
        count, tag, width = db.execute(  # type: ignore[misc]
            f'SELECT count(*), any_value(tags[\'run\']), max(len("{column}")) FROM read_parquet(?)', [str(path)]
        ).fetchone()
    assert (count, tag, width) == (5, run[4:], len(stages[0]["nodes"]) ** 2)


async def test_glore_export_has_each_units_projection_map(main_client: httpx.AsyncClient, image: Encode) -> None:
    run = run_tag()
    results = [await classify(main_client, image, [run], seed=60 + i, model="glore") for i in range(2)]
    response = await main_client.get("/v1/inspections/export", params=[("model", "glore"), ("tag", run)])
    frame = pd.read_parquet(io.BytesIO(response.content))
    assert len(frame) == 2
    for index, unit in enumerate(results[0]["connectivity"]["glore_units"]):
        for row, result in enumerate(results):
            projection = result["connectivity"]["glore_units"][index]["projection"]
            assert [list(r) for r in frame[f"glore_units/{unit['unit']}/projection"][row]] == projection
            shares = np.bincount(np.ravel(projection), minlength=unit["num_nodes"]) / np.size(projection)
            np.testing.assert_allclose(frame[f"glore_units/{unit['unit']}/projection_share"][row], shares, atol=1e-6)
    summary = (await main_client.get("/v1/models/glore/connectivity", params=[("tag", run)])).json()
    assert summary["count"] == 2 and set(summary["groups"][0]) == {"key", "count", "glore_units"}
    first = results[0]["connectivity"]["glore_units"][0]
    assert len(summary["groups"][0]["glore_units"][0]["projection_share"]) == first["num_nodes"]
