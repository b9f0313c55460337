"""The export's Arrow batch, built column by column: a backend's ``AnalysisPage`` and a plain
list of rows give the same file, and a page that mixes layouts (or has records without
numbers) puts each record's numbers in its own row, with nulls where it has none."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dgserve.analysis import export
from dgserve.analysis.layout import Layout, extract
from dgserve.inspection.backend import AnalysisPage, AnalysisRow


def stage(name: str, adjacency: np.ndarray) -> dict[str, Any]:
    n = len(adjacency)
    return {"stage": name, "nodes": [str(i) for i in range(n)], "adjacency": adjacency.tolist(),
            "executed": [bool(i % 2) or i == 0 for i in range(n)]}  # fmt: skip


def records() -> tuple[list[AnalysisRow], dict[str, Layout], list[dict[str, np.ndarray]]]:
    rng = np.random.default_rng(0)
    rows, layouts, truth = [], {}, []
    for i in range(7):
        # Records with one stage and with two, in one page; record 5 has no numbers at all.
        names = ["layer1"] if i % 3 else ["layer1", "layer2"]
        adjacency = {n: np.tril(rng.random((3, 3)), -1).astype(np.float32) for n in names}
        numbers = None if i == 5 else extract({"stages": [stage(n, a) for n, a in adjacency.items()]})
        if numbers is not None:
            layouts[numbers[0].digest] = numbers[0]
        truth.append({} if numbers is None else adjacency)
        rows.append(AnalysisRow(
            f"r{i}", "m", 1, "classification", 1_700_000_000_000_000 + i, "" if i == 2 else "cat",
            None if i == 2 else 0.5, '{"truth":"cat"}' if i % 2 else '{"split":"val","truth":"dog"}',
            None if numbers is None else numbers[0].digest, None if numbers is None else numbers[1], None,
        ))  # fmt: skip
    return rows, layouts, truth


def exported(plan: export.Plan, page: Any) -> pa.Table:
    data = b"".join(export.parquet_chunks(plan, iter([page])))
    return pq.read_table(io.BytesIO(data))


def test_a_page_of_columns_and_a_list_of_rows_export_alike_whatever_their_layouts() -> None:
    rows, layouts, truth = records()
    assert len(layouts) == 2
    plan = export.plan(layouts)
    columns = [[getattr(r, f) for r in rows] for f in ("id", "model", "version", "task", "created_at_us", "label",
                                                        "score", "tags", "layout", "features", "connectivity")]  # fmt: skip
    page = AnalysisPage(columns, len(rows))
    assert page[-1] == rows[-1] and page[1:3] == rows[1:3]
    from_list, from_page = exported(plan, rows), exported(plan, page)
    assert from_list.equals(from_page)
    table = from_page.to_pylist()
    assert [r["id"] for r in table] == [f"r{i}" for i in range(7)]
    assert table[2]["label"] is None and table[2]["score"] is None and table[0]["label"] == "cat"
    assert dict(table[1]["tags"]) == {"truth": "cat"} and dict(table[0]["tags"]) == {"split": "val", "truth": "dog"}
    for row, want in zip(table, truth, strict=True):
        for name in ("layer1", "layer2"):
            got = row[f"stages/{name}/adjacency"]
            if name in want:
                assert np.array_equal(np.asarray(got, np.float32), want[name].reshape(-1))
            else:
                assert got is None
