"""Every metric the dashboard and the alert rules query is one the server exports.

Names are compared with ``dgserve.metrics.METRIC_NAMES`` through ``metric_family_of``
(``_bucket``/``_sum``/``_count`` map to their histogram), and each family must also be
in the exposition of a freshly built ``Metrics``, as ``GET /metrics`` serves it.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from dgserve import metrics

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"' + r"|'(?:[^'\\]|\\.)*'")
_DGSERVE_NAME = re.compile(r"\bdgserve_[A-Za-z0-9_]*\b")


def metric_names_in(expr: str) -> set[str]:
    # label values ("dgserve-..." model names, regexes) are not metric names
    return set(_DGSERVE_NAME.findall(_STRING.sub('""', expr)))


def exported_families() -> set[str]:
    body, _ = metrics.Metrics().render()
    return {line.split()[2] for line in body.decode().splitlines() if line.startswith("# TYPE ")}


def queried_names(lib: SimpleNamespace) -> dict[str, set[str]]:
    """name -> where it is queried (alerts, dashboard panels, dashboard variables)."""
    where: dict[str, set[str]] = {}
    for rule in lib.alert_rules():
        for name in metric_names_in(rule["expr"]):
            where.setdefault(name, set()).add(f"alert {rule['alert']}")
    for path, dashboard in lib.load_dashboards().items():
        for place, expr in [*lib.dashboard_exprs(dashboard), *lib.variable_selectors(dashboard)]:
            for name in metric_names_in(expr):
                where.setdefault(name, set()).add(f"{path.name} {place}")
    return where


def test_the_name_extraction_sees_through_labels_and_suffixes() -> None:
    expr = 'sum by (le) (rate(dgserve_compute_seconds_bucket{model=~"dgserve_fake"}[5m])) / dgserve_x_total'
    assert metric_names_in(expr) == {"dgserve_compute_seconds_bucket", "dgserve_x_total"}


def test_every_queried_metric_is_exported_by_the_server(lib: SimpleNamespace) -> None:
    where = queried_names(lib)
    assert where, "no dgserve metric found in the alerts or the dashboard"
    unknown = {name: sorted(places) for name, places in where.items() if metrics.metric_family_of(name) is None}
    assert unknown == {}, f"not in dgserve.metrics.METRIC_NAMES: {unknown}"
    exported = exported_families()
    missing = {
        name: sorted(places) for name, places in where.items() if metrics.metric_family_of(name) not in exported
    }
    assert missing == {}, f"named in METRIC_NAMES but absent from GET /metrics: {missing}"


@pytest.mark.parametrize(
    "family",
    [
        metrics.REQUESTS,
        metrics.REQUEST_DURATION_SECONDS,
        metrics.QUEUE_WAIT_SECONDS,
        metrics.COMPUTE_SECONDS,
        metrics.BATCH_SIZE,
        metrics.QUEUE_DEPTH,
        metrics.REJECTIONS,
        metrics.MODEL_READY,
        metrics.GPU_MEMORY_ALLOCATED_BYTES,
        metrics.GPU_UTILIZATION_RATIO,
        metrics.GPU_MEMORY_USED_BYTES,
        metrics.GPU_MEMORY_TOTAL_BYTES,
        metrics.GPU_TEMPERATURE_CELSIUS,
        metrics.ACTIVE_EDGE_FRACTION,
        metrics.SKIPPED_NODES,
    ],
)
def test_the_dashboard_shows(lib: SimpleNamespace, family: str) -> None:
    shown = {
        metrics.metric_family_of(name)
        for dashboard in lib.load_dashboards().values()
        for _, expr in lib.dashboard_exprs(dashboard)
        for name in metric_names_in(expr)
    }
    assert family in shown
