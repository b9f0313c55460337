"""Tags, summaries and analysis pages on every backend (``open_store`` runs each test once
per backend in ``BACKENDS``).

Summaries are checked against figures computed here, independently, from the records'
connectivity dicts with plain Python and numpy: open frequency, mean and std weight,
executed frequency, active-edge fraction, path patterns and entropy, GloRe node shares,
and the group distance matrix. Records span several hours and the windows start and
end mid-hour, so both the rollups and the edge-of-window records are exercised.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest

from dgserve.errors import InvalidAnalysisError, InvalidTagError
from dgserve.inspection import InspectionRecord, InspectionStore, new_inspection_id
from dgserve.inspection.backend import Filters
from dgserve.inspection.record import to_us

pytestmark = pytest.mark.timeout(60)

StoreFactory = Callable[..., Awaitable[InspectionStore]]

T0 = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)
LABELS = ["cat", "dog", "owl"]
MODEL = "m"


def connectivity(rng: np.random.Generator, nodes: int = 4) -> dict[str, Any]:
    stages = []
    for s in range(2):
        adjacency = np.zeros((nodes, nodes))
        for target in range(1, nodes):
            for source in range(target):
                if rng.random() < 0.6:
                    adjacency[target, source] = round(float(rng.uniform(0.1, 1.0)), 4)
        executed = [True, *(bool(rng.random() < 0.8) for _ in range(nodes - 2)), True]
        stages.append({"stage": f"layer{s + 1}", "nodes": [str(i) for i in range(nodes)],
                       "adjacency": adjacency.tolist(), "thresholds": [None] * nodes, "executed": executed,
                       "open_edges": int((adjacency != 0).sum()), "possible_edges": nodes * (nodes - 1) // 2,
                       "active_edge_fraction": float((adjacency != 0).sum()) / (nodes * (nodes - 1) // 2)})  # fmt: skip
    unit = {"unit": "u0", "num_nodes": 3, "projection": rng.integers(0, 3, size=(4, 4)).tolist()}
    return {"stages": stages, "glore_units": [unit]}


def make_records(n: int = 48, seed: int = 0) -> list[InspectionRecord]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        label = LABELS[i % 3]
        out.append(InspectionRecord(
            id=new_inspection_id(), model=MODEL, version=1, task="classification",
            created_at=T0 + timedelta(minutes=13 * i), connectivity=connectivity(rng),
            prediction={"predictions": [{"label": label, "score": 0.9}, {"label": "x", "score": 0.1}]},
            tags={"truth": LABELS[(i // 2) % 3], "split": "val" if i % 4 else "train"},
        ))  # fmt: skip
    return out


def expected(records: Sequence[InspectionRecord]) -> dict[str, Any]:
    """The figures of one group, from the connectivity dicts."""
    out: dict[str, Any] = {"count": len(records), "stages": []}
    for s in range(2):
        adj = np.array([r.connectivity["stages"][s]["adjacency"] for r in records])
        patterns = Counter(tuple(map(tuple, np.argwhere(a != 0).tolist())) for a in adj)
        shares = np.array(list(patterns.values())) / len(records)
        out["stages"].append({
            "open": (adj != 0).mean(0), "mean": adj.mean(0), "std": adj.std(0),
            "executed": np.array([r.connectivity["stages"][s]["executed"] for r in records], float).mean(0),
            "active": np.mean([r.connectivity["stages"][s]["active_edge_fraction"] for r in records]),
            "distinct": len(patterns), "entropy": float(-(shares * np.log2(shares)).sum()),
            "top": patterns.most_common(1)[0],
        })  # fmt: skip
    projections = np.array([r.connectivity["glore_units"][0]["projection"] for r in records]).reshape(len(records), -1)
    out["share"] = np.stack([(projections == k).mean(1) for k in range(3)], 1).mean(0)
    return out


def check(group: dict[str, Any], want: dict[str, Any]) -> None:
    assert group["count"] == want["count"]
    for got, exp in zip(group["stages"], want["stages"], strict=True):
        np.testing.assert_allclose(got["adjacency_open_frequency"], exp["open"], atol=1e-6)
        np.testing.assert_allclose(got["adjacency_mean"], exp["mean"], atol=1e-5)
        np.testing.assert_allclose(got["adjacency_std"], exp["std"], atol=1e-4)
        np.testing.assert_allclose(got["executed_frequency"], exp["executed"], atol=1e-6)
        assert math.isclose(got["active_edge_fraction_mean"], exp["active"], abs_tol=1e-5)
        patterns = got["adjacency_patterns"]
        assert patterns["distinct"] == exp["distinct"]
        assert math.isclose(patterns["entropy_bits"], exp["entropy"], abs_tol=1e-5)
        top_open, top_count = exp["top"]
        assert patterns["top"][0]["count"] == top_count
        assert math.isclose(patterns["top"][0]["share"], top_count / want["count"], abs_tol=1e-6)
    np.testing.assert_allclose(group["glore_units"][0]["projection_share"], want["share"], atol=1e-6)


def us(t: datetime) -> int:
    return to_us(t, "t")


async def filled(open_store: StoreFactory, records: Sequence[InspectionRecord]) -> InspectionStore:
    store = await open_store(flush_interval_s=3600.0)
    for r in records:
        await store.put(r)
    await store.flush()
    return store


@pytest.mark.asyncio
async def test_tags_are_kept_listed_and_filtered_queued_or_written(open_store: StoreFactory) -> None:
    records = make_records(12)
    store = await filled(open_store, records[:6])
    for r in records[6:]:
        await store.put(r)  # these stay queued
    assert (await store.get(records[0].id)).tags == records[0].tags
    assert (await store.get(records[7].id)).tags == records[7].tags
    by_tag = [r async for r in store.list(filters=Filters(tags=(("split", "val"), ("truth", "dog"))))]
    assert [r.id for r in by_tag] == [r.id for r in records if r.tags == {"split": "val", "truth": "dog"}]
    window = Filters(label="cat", since_us=us(records[2].created_at), until_us=us(records[9].created_at))
    assert [r.id for r in [x async for x in store.list(filters=window)]] == [
        r.id for r in records[2:9] if r.prediction["predictions"][0]["label"] == "cat"
    ]
    assert [r async for r in store.list(filters=Filters(version=2))] == []


@pytest.mark.asyncio
async def test_summary_equals_the_records_figures_whole_and_in_an_unaligned_window(open_store: StoreFactory) -> None:
    records = make_records()
    store = await filled(open_store, records)
    whole = await store.summary(Filters(model=MODEL))
    assert whole["count"] == len(records) and len(whole["groups"]) == 1
    check(whole["groups"][0], expected(records))
    since, until = T0 + timedelta(minutes=50), T0 + timedelta(hours=7, minutes=13)
    inside = [r for r in records if since <= r.created_at < until]
    window = await store.summary(Filters(model=MODEL, since_us=us(since), until_us=us(until)))
    check(window["groups"][0], expected(inside))
    short = [r for r in records if T0 + timedelta(minutes=5) <= r.created_at < T0 + timedelta(minutes=40)]
    within_an_hour = await store.summary(Filters(model=MODEL, since_us=us(T0) + 300_000_000, until_us=us(T0) + 2_400_000_000))
    check(within_an_hour["groups"][0], expected(short))
    assert (await store.summary(Filters(model="other")))["count"] == 0


@pytest.mark.asyncio
async def test_summary_filters_and_groups_by_label_and_tag(open_store: StoreFactory) -> None:
    records = make_records()
    store = await filled(open_store, records)
    val = Filters(model=MODEL, tags=(("split", "val"),), since_us=us(T0 + timedelta(minutes=20)))
    chosen = [r for r in records if r.tags["split"] == "val" and r.created_at >= T0 + timedelta(minutes=20)]
    by_truth = await store.summary(val, group_by="tag:truth")
    assert [g["key"] for g in by_truth["groups"]] == sorted({r.tags["truth"] for r in chosen})
    for group in by_truth["groups"]:
        check(group, expected([r for r in chosen if r.tags["truth"] == group["key"]]))
    profiles = {g["key"]: np.concatenate([np.ravel(s["adjacency_open_frequency"]) for s in g["stages"]]
                                         + [g["glore_units"][0]["projection_share"]]) for g in by_truth["groups"]}  # fmt: skip
    keys = by_truth["distance"]["keys"]
    stacked = np.array([profiles[k] for k in keys])
    used = stacked.any(0)
    want = np.abs(stacked[:, None, used] - stacked[None, :, used]).mean(2)
    np.testing.assert_allclose(by_truth["distance"]["matrix"], want, atol=1e-5)
    by_label = await store.summary(Filters(model=MODEL, label="dog"), group_by="label")
    assert [g["key"] for g in by_label["groups"]] == ["dog"]
    check(by_label["groups"][0], expected([r for r in records if r.prediction["predictions"][0]["label"] == "dog"]))
    only_stages = await store.summary(Filters(model=MODEL), kind="stages")
    assert set(only_stages["groups"][0]) == {"key", "count", "stages"} and set(only_stages["modules"]) == {"stages"}


@pytest.mark.asyncio
async def test_replacing_and_deleting_records_keeps_the_rollups_exact(open_store: StoreFactory) -> None:
    records = make_records(24)
    store = await open_store(flush_interval_s=3600.0, max_records=16)
    for r in records:
        await store.put(r)
    await store.flush()
    replaced = make_records(24, seed=7)
    await store.put(InspectionRecord(**{**replaced[-1].__dict__, "id": records[-1].id, "connectivity_json": None}))
    await store.flush()
    await store.enforce_retention()
    kept = [*records[8:23], replaced[-1]]
    summary = await store.summary(Filters(model=MODEL), group_by="tag:truth")
    assert summary["count"] == 16
    for group in summary["groups"]:
        check(group, expected([r for r in kept if r.tags["truth"] == group["key"]]))
    listed = [r async for r in store.list(filters=Filters(tags=(("truth", "cat"),)))]
    assert {r.id for r in listed} == {r.id for r in [*records[8:23], records[-1]] if r.tags["truth"] == "cat"}


@pytest.mark.asyncio
async def test_bad_analyses_are_refused_with_reasons(open_store: StoreFactory) -> None:
    records = make_records(6)
    store = await filled(open_store, records)
    with pytest.raises(InvalidAnalysisError, match="tag key 'camera'.*split, truth"):
        await store.summary(Filters(model=MODEL), group_by="tag:camera")
    with pytest.raises(InvalidAnalysisError, match="camera"):
        await store.summary(Filters(model=MODEL, tags=(("camera", "7"),)))
    with pytest.raises(InvalidAnalysisError, match="no 'detector_heads' modules"):
        await store.summary(Filters(model=MODEL), kind="detector_heads")
    rng = np.random.default_rng(3)
    wider = InspectionRecord.new(model=MODEL, version=2, task="classification", prediction={}, connectivity=connectivity(rng, nodes=5))
    await store.put(wider)
    await store.flush()
    with pytest.raises(InvalidAnalysisError, match="choose one with \\?version="):
        await store.summary(Filters(model=MODEL))
    assert (await store.summary(Filters(model=MODEL, version=2)))["count"] == 1
    with pytest.raises(InvalidTagError):
        InspectionRecord.new(model=MODEL, version=1, task="t", prediction={}, connectivity={}, tags={"bad key": "x"})


@pytest.mark.asyncio
async def test_analysis_pages_give_every_selected_record_once_in_order(open_store: StoreFactory) -> None:
    records = make_records(30)
    store = await filled(open_store, records)
    filters = Filters(model=MODEL, tags=(("split", "val"),))
    pages = list(store.analysis_pages(filters, page_size=7, include_connectivity=False))
    rows = [row for page in pages for row in page]
    want = [r for r in records if r.tags["split"] == "val"]
    assert [row.id for row in rows] == [r.id for r in want]
    assert all(len(page) <= 7 for page in pages) and rows[0].connectivity is None
    assert rows[0].label == want[0].prediction["predictions"][0]["label"] and rows[0].score == 0.9
    assert rows[0].features is not None and rows[0].tags == '{"split":"val","truth":"cat"}'
    layouts = await store.layouts(filters)
    assert set(layouts) == {rows[0].layout}


@pytest.mark.asyncio
async def test_export_pages_follow_records_written_again_at_another_time_and_deleted(open_store: StoreFactory) -> None:
    # A model's export reads the narrow table (sqlrows.ANALYSIS_TABLE), keyed by time:
    # a record written again at another time must move there, and retention must reach it.
    records = make_records(10)
    store = await open_store(flush_interval_s=3600.0, max_records=8)
    for r in records:
        await store.put(r)
    await store.flush()
    moved = InspectionRecord(**{**records[5].__dict__, "created_at": T0 + timedelta(days=1), "connectivity_json": None})
    await store.put(moved)
    await store.flush()
    await store.enforce_retention()  # keeps the newest 8: records[0] and [1] go
    want = [*records[2:5], *records[6:], moved]
    rows = [row for page in store.analysis_pages(Filters(model=MODEL), page_size=3, include_connectivity=False)
            for row in page]  # fmt: skip
    assert [(row.id, row.created_at_us) for row in rows] == [(r.id, to_us(r.created_at, "t")) for r in want]
    assert rows[-1].features is not None and rows[-1].label == moved.prediction["predictions"][0]["label"]
    listed = [r.id async for r in store.list(filters=Filters(model=MODEL))]
    assert listed == [r.id for r in want]
