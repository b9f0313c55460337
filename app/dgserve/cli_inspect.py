"""``dgserve inspect summary|export|plot``: the analysis endpoints from a terminal.

Each command calls a running server's HTTP API (``--url``, ``DGSERVE_URL``; an API key
with ``--api-key`` or ``DGSERVE_API_KEY`` when keys are on) and takes the filters the
endpoints take: ``--version``, ``--since``, ``--until``, ``--label`` and repeatable
``--tag key:value``. Tables are drawn with rich; a long export shows its progress.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, SpinnerColumn, TextColumn, TransferSpeedColumn
from rich.table import Table

__all__ = ["inspect_app"]

inspect_app = typer.Typer(help="Analyse stored paths on a running server: summary, export, plot.", no_args_is_help=True)

Url = Annotated[str, typer.Option(envvar="DGSERVE_URL", help="The server's base URL.")]
ApiKey = Annotated[str | None, typer.Option(envvar="DGSERVE_API_KEY", help="An API key with the read scope.")]
Version = Annotated[int | None, typer.Option(help="Only this model version.")]
Since = Annotated[str | None, typer.Option(help="ISO 8601; created at or after.")]
Until = Annotated[str | None, typer.Option(help="ISO 8601; created before.")]
Label = Annotated[str | None, typer.Option(help="Only this top predicted label.")]
Tags = Annotated[list[str] | None, typer.Option("--tag", help="key:value, repeatable; every one must hold.")]
DEFAULT_URL = "http://127.0.0.1:8000"


def _params(version: int | None, since: str | None, until: str | None, label: str | None,
            tags: list[str] | None, **more: Any) -> list[tuple[str, Any]]:  # fmt: skip
    pairs = [("version", version), ("since", since), ("until", until), ("label", label), *more.items()]
    return [(k, v) for k, v in pairs if v is not None] + [("tag", t) for t in tags or []]


def _client(url: str, api_key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.Client(base_url=url, headers=headers, timeout=120)


def _fail(response: httpx.Response) -> None:
    """Exit with the server's own error message (status 2) unless the call succeeded."""
    if response.status_code < 400:
        return
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text[:300]
    Console(stderr=True).print(f"[red]{response.status_code}[/red] {message}")
    raise typer.Exit(2)


@inspect_app.command("summary")
def summary(
    model: Annotated[str, typer.Argument(help="A served model's name.")],
    group_by: Annotated[str | None, typer.Option(help="label, or tag:KEY.")] = None,
    top_k: Annotated[int, typer.Option(help="Most frequent path patterns per stage.")] = 3,
    version: Version = None, since: Since = None, until: Until = None, label: Label = None, tag: Tags = None,
    url: Url = DEFAULT_URL, api_key: ApiKey = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the JSON body instead of tables.")] = False,
) -> None:  # fmt: skip
    """Per group: images and, per stage, the active-edge fraction, distinct paths and their entropy."""
    with _client(url, api_key) as client:
        response = client.get(f"/v1/models/{model}/connectivity",
                              params=_params(version, since, until, label, tag, group_by=group_by, top_k=top_k))
    _fail(response)
    body = response.json()
    console = Console()
    if as_json:
        console.print_json(response.text)
        return
    console.print(f"[bold]{model}[/bold]: {body['count']} images, grouped by {body.get('group_by') or 'nothing'}")
    for group in body["groups"]:
        table = Table(title=f"{group['key']} ({group['count']} images)", title_justify="left")
        for column in ("module", "active-edge fraction", "distinct paths", "entropy (bits)", "top path share"):
            table.add_column(column, justify="left" if column == "module" else "right")
        for stage in group.get("stages", []):
            patterns = stage.get("adjacency_patterns", {})
            top = patterns.get("top") or [{}]
            table.add_row(stage["stage"], _f(stage.get("active_edge_fraction_mean")), str(patterns.get("distinct", "")),
                          _f(patterns.get("entropy_bits")), _f(top[0].get("share")))  # fmt: skip
        for unit in group.get("glore_units", []):
            shares = unit.get("projection_share") or []
            busiest = max(range(len(shares)), key=lambda n: shares[n]) if shares else None
            detail = f"node {busiest} holds {shares[busiest]:.1%}" if busiest is not None else ""
            table.add_row(unit["unit"], "", "", "", detail)
        console.print(table)
    distance = body.get("distance") or {}
    keys = distance.get("keys", [])
    if len(keys) > 1:
        table = Table(title=f"distance between groups ({distance.get('metric', '')})", title_justify="left")
        table.add_column("")
        for key in keys:
            table.add_column(str(key), justify="right")
        for key, row in zip(keys, distance["matrix"], strict=True):
            table.add_row(str(key), *(_f(v) for v in row))
        console.print(table)


def _f(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


@inspect_app.command("export")
def export(
    out: Annotated[Path, typer.Argument(help="The Parquet file to write.")],
    model: Annotated[str | None, typer.Option(help="Only this model's records.")] = None,
    version: Version = None, since: Since = None, until: Until = None, label: Label = None, tag: Tags = None,
    url: Url = DEFAULT_URL, api_key: ApiKey = None,
) -> None:  # fmt: skip
    """Stream the matching records into a Parquet file, one row per image, with a progress bar."""
    params = _params(version, since, until, label, tag, model=model, format="parquet")
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    partial = out.with_name(out.name + ".part")  # never leave a truncated file under the real name
    with _client(url, api_key) as client, client.stream("GET", "/v1/inspections/export", params=params) as response:
        if response.status_code >= 400:
            response.read()
            _fail(response)
        with Progress(*columns, console=Console(stderr=True), transient=True) as progress, partial.open("wb") as file:
            task = progress.add_task(f"exporting to {out}", total=None)
            for chunk in response.iter_bytes():
                file.write(chunk)
                progress.advance(task, len(chunk))
    partial.replace(out)
    Console(stderr=True).print(f"wrote {out} ({out.stat().st_size:,} bytes)")


@inspect_app.command("plot")
def plot(
    out: Annotated[Path, typer.Argument(help="The picture to write: .png or .svg.")],
    model: Annotated[str | None, typer.Option(help="Draw the summary of this model's records.")] = None,
    record: Annotated[str | None, typer.Option("--id", help="Draw this one record's path instead.")] = None,
    group_by: Annotated[str | None, typer.Option(help="label, or tag:KEY (summaries).")] = None,
    version: Version = None, since: Since = None, until: Until = None, label: Label = None, tag: Tags = None,
    url: Url = DEFAULT_URL, api_key: ApiKey = None,
) -> None:  # fmt: skip
    """Draw one record's path (``--id``) or a model's summary (``--model``) into a PNG or SVG."""
    fmt = out.suffix.lower().lstrip(".")
    if fmt not in ("png", "svg") or (model is None) == (record is None):
        raise typer.BadParameter("give --model or --id (one of them), and an OUT ending in .png or .svg")
    with _client(url, api_key) as client:
        if record is not None:
            response = client.get(f"/v1/inspections/{record}/connectivity.{fmt}")
        else:
            params = _params(version, since, until, label, tag, group_by=group_by)
            response = client.get(f"/v1/models/{model}/connectivity.{fmt}", params=params)
    _fail(response)
    out.write_bytes(response.content)
    Console(stderr=True).print(f"wrote {out} ({len(response.content):,} bytes)")
