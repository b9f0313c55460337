"""Several replicas behind one Prometheus: the metrics, alerts and dashboard still add up.

With Kubernetes (or any load balancer) Prometheus scrapes every replica as its own target,
and gives each series the target's ``instance`` (and ``pod``) label. So:

- no metric may carry a label of its own that differs per process (a pid, a hostname...):
  those would split one replica's series and collide with the labels Prometheus attaches;
- every alert that computes a ratio or a quantile sums the replicas' counters and buckets
  first, so it judges the service, once per model version; the alerts about one target
  (down, a model not ready) name the target. ``docker/prometheus/tests/
  dgserve-alerts-replicas.test.yml`` shows both with two scraped replicas (promtool runs it
  in test_prometheus.py); this file checks the expressions themselves;
- every dashboard query aggregates, so a panel shows one line per model (or whatever it
  groups by), not one per replica with the same legend.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

from prometheus_client.metrics import MetricWrapperBase

from dgserve.metrics import METRIC_NAMES, Metrics

# Labels that differ per process or per target: Prometheus' own target labels, and what a
# server might be tempted to add about itself.
PER_PROCESS_LABELS = frozenset(
    {"instance", "job", "pod", "pod_name", "namespace", "node", "host", "hostname", "pid", "process",
     "process_id", "container", "replica", "server", "ip", "address", "port", "uuid"}
)
AGGREGATIONS = ("sum", "min", "max", "avg", "count", "group", "stddev", "stdvar", "topk", "bottomk",
                "quantile", "count_values")
RANGE_FUNCTIONS = re.compile(r"\b(rate|irate|increase|delta|histogram_quantile)\s*\(")


def metric_label_names(metrics: Metrics) -> dict[str, tuple[str, ...]]:
    """name -> label names of every metric family registered by a fresh Metrics."""
    out: dict[str, tuple[str, ...]] = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            out[value._name] = tuple(value._labelnames)  # noqa: SLF001 - no public accessor
    # Collectors that build their families at scrape time (the GPU memory gauge) describe them.
    collectors = metrics.registry._collector_to_names  # noqa: SLF001
    for collector in collectors:
        if isinstance(collector, MetricWrapperBase) or not hasattr(collector, "describe"):
            continue
        for family in collector.describe():
            out[family.name] = tuple(family._labelnames)  # noqa: SLF001
    return out


def test_no_metric_carries_a_per_process_label() -> None:
    labels = metric_label_names(Metrics())
    # counters are registered without their _total; METRIC_NAMES says how PromQL spells them
    found = {name if name in METRIC_NAMES else f"{name}_total" for name in labels}
    assert found == set(METRIC_NAMES), "every exported family is checked, and nothing else is exported"
    for name, names in labels.items():
        assert not set(names) & PER_PROCESS_LABELS, f"{name} has a per-process label: {names}"


def _blank(expr: str) -> str:
    """The expression with string literals and label matchers emptied (they may hold parens)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    return re.sub(r"\{[^{}]*\}", "{}", expr)


_AGGREGATION_BEFORE_PAREN = re.compile(
    r"\b(?:%s)\s*(?:(?:by|without)\s*\(([^()]*)\))?\s*$" % "|".join(AGGREGATIONS)
)


def aggregation_of(expr: str, position: int) -> set[str] | None:
    """The grouping labels of the innermost aggregation around ``position`` (``set()`` for a
    plain ``sum(...)``), or None when no aggregation encloses it."""
    opens: list[int] = []
    for i, char in enumerate(expr[:position]):
        if char == "(":
            opens.append(i)
        elif char == ")":
            opens.pop()
    for i in reversed(opens):
        match = _AGGREGATION_BEFORE_PAREN.search(expr[:i])
        if match:
            return {label.strip() for label in (match[1] or "").split(",") if label.strip()}
    return None


def selectors(expr: str) -> list[tuple[str, set[str] | None]]:
    """(metric, grouping labels of its aggregation or None) for each series selector."""
    text = _blank(expr)
    return [(m[1], aggregation_of(text, m.start())) for m in re.finditer(r"\b(dgserve_\w+|up)\b(?!\s*\()", text)]


def test_the_aggregation_check_sees_what_it_should() -> None:
    assert selectors('sum by (model) (rate(dgserve_requests_total{a=~"(x)"}[5m]))') == [
        ("dgserve_requests_total", {"model"})
    ]
    assert selectors("histogram_quantile(0.99, sum by (le, model) (rate(dgserve_x_bucket[5m])))") == [
        ("dgserve_x_bucket", {"le", "model"})
    ]
    assert selectors("sum(rate(dgserve_a[1m])) / rate(dgserve_b[1m])") == [("dgserve_a", set()), ("dgserve_b", None)]
    assert selectors('dgserve_model_ready{model=~"$model"}') == [("dgserve_model_ready", None)]


def test_alerts_over_rates_and_quantiles_sum_the_replicas(lib: SimpleNamespace) -> None:
    for rule in lib.alert_rules():
        expr = rule["expr"]
        found = selectors(expr)
        assert found, rule["alert"]
        if RANGE_FUNCTIONS.search(expr):
            for metric, grouping in found:
                assert grouping is not None, f"{rule['alert']}: {metric} is not summed over the replicas"
                assert not grouping & PER_PROCESS_LABELS, f"{rule['alert']}: grouped by {grouping}"
        else:
            # A per-target alert (a scrape failing, a model not loaded): one per replica,
            # and it must say which one.
            assert all(grouping is None for _, grouping in found), rule["alert"]
            assert "$labels.instance" in rule["annotations"]["description"], (
                f"{rule['alert']} fires per replica: its description must name the instance"
            )


def test_dashboard_queries_aggregate_over_replicas(lib: SimpleNamespace) -> None:
    for path, dashboard in lib.load_dashboards().items():
        legends = {
            (f"panel {p.get('id')} {p.get('title')!r} target {t.get('refId')}"): t.get("legendFormat", "")
            for p in lib.iter_panels(dashboard["panels"]) for t in p.get("targets", [])
        }
        for where, expr in lib.dashboard_exprs(dashboard):
            for metric, grouping in selectors(expr):
                assert grouping is not None, f"{path.name} {where}: {metric} is shown per replica, not aggregated"
                # every series it draws has a legend of its own: the grouping labels are in it
                missing = {label for label in grouping - {"le"} if "{{" + label + "}}" not in legends[where]}
                assert not missing, f"{path.name} {where}: legend {legends[where]!r} lacks {missing}"


def test_the_replica_alert_tests_scrape_two_replicas(lib: SimpleNamespace) -> None:
    suite = lib.load_yaml(lib.RULE_TESTS_DIR / "dgserve-alerts-replicas.test.yml")
    alerts = set()
    for case in suite["tests"]:
        instances = {m[1] for s in case["input_series"] for m in [re.search(r'instance="([^"]+)"', s["series"])] if m}
        assert len(instances) == 2, f"{case['name']}: two scraped replicas"
        for check in case["alert_rule_test"]:
            alerts.add(check["alertname"])
            for alert in check["exp_alerts"]:
                aggregated = RANGE_FUNCTIONS.search(
                    next(r["expr"] for r in lib.alert_rules() if r["alert"] == check["alertname"])
                )
                assert ("instance" in alert["exp_labels"]) is not bool(aggregated), (
                    f"{check['alertname']}: one alert per model version, or per replica for a per-target alert"
                )
    assert {"DgserveHigh5xxRatio", "DgserveP99LatencyHigh", "DgserveDown", "DgserveModelNotReady"} <= alerts
