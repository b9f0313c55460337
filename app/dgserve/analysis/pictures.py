"""Pictures of paths: one image's record, or a summary of many, as PNG or SVG (matplotlib).

matplotlib's object-oriented API only (``Figure`` with the Agg canvas, never ``pyplot``):
it keeps no global state, so pictures can be drawn in worker threads side by side.

* ``record_picture``: per DG-Net stage, its DAG in topological order (open edges drawn
  with width and colour by weight, closed edges faint, skipped nodes grey) beside its
  adjacency heatmap; per GloRe unit, its projection map (the graph node each location
  projects to most), laid over the record's thumbnail where one was kept
  (``DGSERVE_INSPECTION_THUMBNAILS``): the thumbnail is what the model saw, so the map,
  which covers the model's input, is stretched to it exactly, letterbox padding included.
* ``summary_picture``: per stage, each group's open-frequency heatmap on one shared
  colour scale (0 to 1), and the groups' distance matrix.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any, Final, Literal

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from PIL import Image

__all__ = ["FORMATS", "Format", "record_picture", "summary_picture"]

Format = Literal["png", "svg"]
FORMATS: Final[dict[str, str]] = {"png": "image/png", "svg": "image/svg+xml"}

_PANEL: Final = 3.2  # inches per panel
_EDGE_COLOURS: Final = "viridis"
_OVERLAY_ALPHA: Final = 0.5  # the projection map over a thumbnail: both stay readable
_GROUP_LIMIT: Final = 12  # groups drawn in a summary picture; the rest are named as left out


def record_picture(record: dict[str, Any], fmt: Format) -> bytes:
    """One stored record's connectivity (``InspectionRecord.to_dict()``) as a picture.

    ``record["thumbnail"]``, if there (JPEG bytes; the route adds it only with thumbnails
    on), is drawn under each GloRe unit's projection map.
    """
    connectivity = record.get("connectivity", {})
    thumbnail = _thumbnail(record.get("thumbnail"))
    stages, units = connectivity.get("stages", []), connectivity.get("glore_units", [])
    rows = max(1, len(stages) + (1 if units else 0))
    columns = max(2, len(units))
    figure = Figure(figsize=(_PANEL * columns, _PANEL * rows), layout="constrained")
    grid = figure.add_gridspec(rows, columns)
    for row, stage in enumerate(stages):
        _dag(figure.add_subplot(grid[row, 0]), stage)
        _heatmap(figure.add_subplot(grid[row, 1]), np.asarray(stage["adjacency"], dtype=float),
                 f"{stage['stage']}: adjacency[target][source]", stage["nodes"])  # fmt: skip
    for column, unit in enumerate(units):
        axes = figure.add_subplot(grid[len(stages), column])
        projection = np.asarray(unit["projection"])
        overlay: dict[str, Any] = {}
        if thumbnail is not None and projection.ndim == 2:
            height, width = thumbnail.shape[:2]
            axes.imshow(thumbnail, interpolation="bilinear")
            # The map stretched over the whole thumbnail: both cover the model's input.
            overlay = {"alpha": _OVERLAY_ALPHA, "extent": (-0.5, width - 0.5, height - 0.5, -0.5)}
        image = axes.imshow(projection, cmap="tab20", vmin=0, vmax=max(unit["num_nodes"] - 1, 1),
                            interpolation="nearest", **overlay)  # fmt: skip
        over = " over the input" if overlay else ""
        axes.set_title(f"{unit['unit']}: projection{over}\n(node per location, of {unit['num_nodes']})", fontsize=8)
        axes.set_xticks([])
        axes.set_yticks([])
        figure.colorbar(image, ax=axes, shrink=0.8)
    if not stages and not units:
        figure.add_subplot(grid[0, 0]).text(0.5, 0.5, "no connectivity recorded", ha="center", va="center")
    title = f"{record.get('model')} v{record.get('version')} · {record.get('id')}"
    figure.suptitle(title, fontsize=9)
    return _encode(figure, fmt)


def summary_picture(summary: dict[str, Any], fmt: Format) -> bytes:
    """A connectivity summary (``GET /v1/models/{name}/connectivity``'s body) as a picture."""
    groups = summary.get("groups", [])[:_GROUP_LIMIT]
    stage_names = [s["stage"] for s in groups[0].get("stages", [])] if groups else []
    unit_names = [u["unit"] for u in groups[0].get("glore_units", [])] if groups else []
    distance = summary.get("distance") or {}
    has_distance = len(distance.get("keys", [])) > 1
    rows = max(1, len(stage_names) + len(unit_names))
    columns = max(1, len(groups)) + (1 if has_distance else 0)
    figure = Figure(figsize=(_PANEL * columns, _PANEL * rows), layout="constrained")
    grid = figure.add_gridspec(rows, columns)
    scale = Normalize(0.0, 1.0)  # one colour scale for every group and stage: frequencies
    image = None
    for row, name in enumerate(stage_names):
        for column, group in enumerate(groups):
            stage = next(s for s in group["stages"] if s["stage"] == name)
            axes = figure.add_subplot(grid[row, column])
            image = axes.imshow(np.asarray(stage["adjacency_open_frequency"], dtype=float), cmap="magma",
                                norm=scale, interpolation="nearest")  # fmt: skip
            axes.set_title(f"{name} · {group['key']} ({group['count']})", fontsize=8)
            axes.set_xticks([])
            axes.set_yticks([])
    if image is not None:
        figure.colorbar(image, ax=figure.axes, shrink=0.6, label="open frequency")
    for offset, name in enumerate(unit_names):  # GloRe: each node's share of the locations, per group
        for column, group in enumerate(groups):
            unit = next(u for u in group["glore_units"] if u["unit"] == name)
            axes = figure.add_subplot(grid[len(stage_names) + offset, column])
            shares = unit["projection_share"]
            axes.bar(range(len(shares)), shares, color="tab:blue")
            axes.set_ylim(0.0, 1.0)  # shares: one scale for every group
            axes.set_title(f"{name} · {group['key']} ({group['count']})", fontsize=8)
            axes.set_xlabel("graph node", fontsize=7)
            axes.tick_params(labelsize=6)
    if has_distance:
        axes = figure.add_subplot(grid[:, -1])
        _heatmap(axes, np.asarray(distance["matrix"], dtype=float), f"distance ({distance.get('metric', '')})",
                 [str(k) for k in distance["keys"]])  # fmt: skip
    if not groups:
        figure.add_subplot(grid[0, 0]).text(0.5, 0.5, "no records match", ha="center", va="center")
    left_out = len(summary.get("groups", [])) - len(groups)
    suffix = f" · {left_out} more groups not drawn" if left_out > 0 else ""
    figure.suptitle(f"{summary.get('model')} · {summary.get('count', 0)} images{suffix}", fontsize=9)
    return _encode(figure, fmt)


def _dag(axes: Axes, stage: dict[str, Any]) -> None:
    """The stage's nodes left to right in topological order, edges as arcs above them."""
    nodes: Sequence[str] = stage["nodes"]
    adjacency = np.asarray(stage["adjacency"], dtype=float)
    executed: Sequence[bool] = stage.get("executed", [True] * len(nodes))
    top = float(adjacency.max()) if adjacency.size and adjacency.max() > 0 else 1.0
    colours = Normalize(0.0, top)
    cmap = colormaps[_EDGE_COLOURS]
    for target in range(len(nodes)):
        for source in range(target):
            weight = adjacency[target, source]
            span = target - source
            xs = np.linspace(source, target, 24)
            ys = 0.35 * span * np.sin(np.linspace(0, np.pi, 24))  # arcs: longer edges arch higher
            if weight > 0:
                axes.plot(xs, ys, color=cmap(colours(weight)), linewidth=0.8 + 3.2 * weight / top, zorder=1)
            else:
                axes.plot(xs, ys, color="0.85", linewidth=0.5, linestyle=":", zorder=0)
    for index, name in enumerate(nodes):
        ran = executed[index] if index < len(executed) else True
        axes.scatter([index], [0], s=160, color="tab:blue" if ran else "0.75", edgecolors="black", zorder=2)
        axes.annotate(name, (index, 0), textcoords="offset points", xytext=(0, -14), ha="center", fontsize=7)
    axes.set_title(f"{stage['stage']}: {stage.get('open_edges', '?')} of {stage.get('possible_edges', '?')} "
                   f"edges open, {stage.get('skipped_nodes', 0)} skipped", fontsize=8)  # fmt: skip
    axes.set_xlim(-0.6, len(nodes) - 0.4)
    axes.set_ylim(-0.5, 0.4 * max(len(nodes) - 1, 1))
    axes.axis("off")


def _heatmap(axes: Axes, matrix: np.ndarray, title: str, labels: Sequence[str]) -> None:
    image = axes.imshow(matrix, cmap="viridis", interpolation="nearest")
    axes.set_title(title, fontsize=8)
    if len(labels) == matrix.shape[0] <= 16:
        axes.set_yticks(range(len(labels)), labels, fontsize=6)
    else:
        axes.set_yticks([])
    if len(labels) == matrix.shape[1] <= 16:
        axes.set_xticks(range(len(labels)), labels, fontsize=6, rotation=90)
    else:
        axes.set_xticks([])
    axes.figure.colorbar(image, ax=axes, shrink=0.8)


def _thumbnail(data: Any) -> np.ndarray | None:
    """A stored thumbnail as RGB pixels; ``None`` if there is none or it does not decode
    (a picture without the input beats no picture)."""
    if not isinstance(data, bytes | bytearray) or not data:
        return None
    try:
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def _encode(figure: Figure, fmt: Format) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format=fmt, dpi=80)
    return buffer.getvalue()
