"""Heavy reads through the reader processes (``DGSERVE_READ_WORKERS``) answer exactly what
the in-process reads answer, and the processes end with the app.

One app, one store: each read is made through the reader processes, then again with the
pool taken away (``AppState.readers = None``, the in-process path), and the two answers
compared byte for byte (Parquet: table for table; pictures as PNG, since an SVG carries its date).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from dgserve.settings import Settings

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(600)]

Encode = Callable[..., bytes]

READS = [
    ("/v1/inspections", {"limit": "50"}, {}),
    ("/v1/inspections", {"limit": "50", "format": "ndjson"}, {}),
    ("/v1/inspections", {"limit": "3", "connectivity": "false"}, {"accept": "application/x-ndjson"}),
    ("/v1/inspections", {"limit": "50", "tag": "truth:cat"}, {}),
    ("/v1/inspections", {"model": "nobody"}, {}),
    ("/v1/models/clf/connectivity", {"group_by": "label"}, {}),
    ("/v1/models/clf/connectivity", {"group_by": "tag:truth", "top_k": "2"}, {}),
    ("/v1/models/clf/connectivity", {"group_by": "tag:nope"}, {}),  # 422 from the reader process
    ("/v1/models/clf/connectivity.png", {"group_by": "tag:truth"}, {}),
]


async def test_reader_processes_answer_as_the_server_does(
    run_app: Any, make_settings: Callable[..., Settings], image: Encode
) -> None:
    async with run_app(make_settings(read_workers=1, read_nice=19)) as (app, client):
        ids = []
        for seed, truth in enumerate(["cat", "dog", "cat", "owl"]):
            response = await client.post("/v1/models/clf/classify", params={"tag": f"truth:{truth}"},
                                         content=image(seed=seed), headers={"content-type": "image/jpeg"})  # fmt: skip
            assert response.status_code == 200
            ids.append(response.json()["results"][0]["id"])
        state = app.state.dgserve
        pool = state.readers
        assert pool is not None

        async def both(path: str, params: dict[str, str], headers: dict[str, str]) -> tuple[Any, Any]:
            state.readers = pool
            through = await client.get(path, params=params, headers=headers)
            state.readers = None
            try:
                here = await client.get(path, params=params, headers=headers)
            finally:
                state.readers = pool
            return through, here

        for path, params, headers in READS:
            through, here = await both(path, params, headers)
            assert (through.status_code, through.headers["content-type"]) == (here.status_code, here.headers["content-type"])
            if here.status_code == 200:
                assert through.content == here.content, (path, params)
            else:
                assert through.json()["error"]["code"] == here.json()["error"]["code"] == "invalid_analysis"
        listing = await client.get("/v1/inspections", params={"limit": "50", "format": "ndjson"})
        assert listing.text.count("\n") == 4  # every answered record, committed before the read

        through, here = await both("/v1/inspections/export", {"format": "parquet"}, {})
        assert through.status_code == here.status_code == 200
        assert through.headers["content-disposition"] == here.headers["content-disposition"]
        assert pq.read_table(io.BytesIO(through.content)).equals(pq.read_table(io.BytesIO(here.content)))
        through, here = await both(f"/v1/inspections/{ids[0]}/connectivity.png", {}, {})
        assert through.status_code == 200 and through.content == here.content

        pids = pool.pids
        assert len(pids) == 1
    assert not Path(f"/proc/{pids[0]}").exists()  # the app's end stopped its reader process
