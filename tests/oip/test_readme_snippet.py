"""The README's tritonclient snippet runs as written (pointed at this test's server)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path
from typing import Any

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_snippet_runs_and_prints_what_it_says(server: Any) -> None:
    section = README.read_text().split("## Using Triton and KServe clients", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert code is not None
    source = code.group(1).replace('url="localhost:8000"', f'url="{server.http}"')
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(source, str(README), "exec"), {})  # noqa: S102 (our own README)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[[b'heart' b'cross']]")
    assert re.fullmatch(r"[0-9A-Z]{26}", lines[-1])  # the inspection id
