"""Grafana: provisioning files and the dashboard JSON, checked structurally; every query parses."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml


def datasources(lib: SimpleNamespace) -> list[dict[str, Any]]:
    files = sorted(lib.GRAFANA_DATASOURCES.glob("*.yml"))
    assert files, f"no datasource provisioning in {lib.GRAFANA_DATASOURCES}"
    return [ds for path in files for ds in lib.load_yaml(path)["datasources"]]


def grafana_mounts(lib: SimpleNamespace) -> dict[str, str]:
    """container path -> host path (relative to the repo) of the grafana service's bind mounts."""
    mounts = {}
    for volume in lib.load_compose(lib.COMPOSE)["services"]["grafana"]["volumes"]:
        source, target, *_ = volume.split(":")
        if source.startswith("."):
            mounts[target] = source
    return mounts


def test_datasource_is_the_stack_prometheus(lib: SimpleNamespace) -> None:
    (ds,) = datasources(lib)
    assert ds["type"] == "prometheus"
    assert ds["access"] == "proxy"
    assert ds["uid"]
    assert ds["url"] == "http://prometheus:9090", "the compose service name and Prometheus' port"
    assert "prometheus" in lib.load_compose(lib.COMPOSE)["services"]


def test_dashboard_provider_reads_the_mounted_folder(lib: SimpleNamespace) -> None:
    files = sorted(lib.GRAFANA_PROVIDERS.glob("*.yml"))
    assert files
    providers = [p for path in files for p in lib.load_yaml(path)["providers"]]
    assert providers
    mounts = grafana_mounts(lib)
    assert mounts.get("/etc/grafana/provisioning") == "./docker/grafana/provisioning"
    for provider in providers:
        assert provider["type"] == "file"
        path = provider["options"]["path"]
        assert path in mounts, f"provider path {path} is not mounted into the grafana container"
        assert (lib.ROOT / mounts[path]).resolve() == lib.GRAFANA_DASHBOARDS.resolve()
    home = lib.load_compose(lib.COMPOSE)["services"]["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert Path(home).parent.as_posix() in mounts
    assert (lib.GRAFANA_DASHBOARDS / Path(home).name).is_file(), "the home dashboard exists"


def test_dashboards_are_valid_and_complete(lib: SimpleNamespace) -> None:
    dashboards = lib.load_dashboards()
    assert dashboards, f"no dashboard JSON in {lib.GRAFANA_DASHBOARDS}"
    uids = set()
    for path, dashboard in dashboards.items():
        json.dumps(dashboard)  # round-trips
        assert dashboard.get("uid") and dashboard.get("title"), path
        assert dashboard["uid"] not in uids
        uids.add(dashboard["uid"])
        panels = list(lib.iter_panels(dashboard["panels"]))
        ids = [p["id"] for p in panels]
        assert len(ids) == len(set(ids)), f"{path.name}: panel ids must be unique"
        graphs = [p for p in panels if p["type"] != "row"]
        assert len(graphs) >= 10, path.name
        for panel in graphs:
            where = f"{path.name} panel {panel['title']!r}"
            grid = panel["gridPos"]
            assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, where
            assert panel.get("targets"), f"{where} has no query"
            assert panel.get("description"), f"{where} needs a description"
            for target in panel["targets"]:
                assert target.get("expr", "").strip(), f"{where} target {target.get('refId')} has no expr"
                assert target.get("refId"), where
            refids = [t["refId"] for t in panel["targets"]]
            assert len(refids) == len(set(refids)), where


def test_every_datasource_reference_is_the_provisioned_uid(lib: SimpleNamespace) -> None:
    (ds,) = datasources(lib)
    for path, dashboard in lib.load_dashboards().items():
        refs = [var["datasource"] for var in dashboard["templating"]["list"] if "datasource" in var]
        for panel in lib.iter_panels(dashboard["panels"]):
            if panel["type"] == "row":
                continue
            refs.append(panel["datasource"])
            refs += [t["datasource"] for t in panel["targets"] if "datasource" in t]
        assert refs
        for ref in refs:
            assert ref == {"type": "prometheus", "uid": ds["uid"]}, f"{path.name}: {ref}"


def test_variables_used_are_defined(lib: SimpleNamespace) -> None:
    for path, dashboard in lib.load_dashboards().items():
        defined = lib.dashboard_variables(dashboard) | set(lib.GRAFANA_INTERVALS)
        queries = [*lib.dashboard_exprs(dashboard), *lib.variable_selectors(dashboard)]
        for where, expr in queries:
            assert lib.used_variables(expr) <= defined, f"{path.name} {where}: {expr}"
        # a regex match on a multi-value variable: Grafana expands $model to (a|b)
        for where, expr in queries:
            for name in lib.used_variables(expr) - set(lib.GRAFANA_INTERVALS):
                assert f'=~"${name}"' in expr, f"{path.name} {where}: use =~ with ${name}"


def test_the_dgnet_connectivity_panels_are_there(lib: SimpleNamespace) -> None:
    exprs = [expr for d in lib.load_dashboards().values() for _, expr in lib.dashboard_exprs(d)]
    assert any("dgserve_active_edge_fraction" in e and "by (model, stage)" in e for e in exprs)
    assert any("dgserve_skipped_nodes_total" in e and "by (model, stage)" in e for e in exprs)


def test_every_query_parses_as_promql(lib: SimpleNamespace, promtool: str, tmp_path: Path) -> None:
    """Each panel query (variables substituted) becomes a recording rule that promtool parses."""
    rules = []
    for path, dashboard in lib.load_dashboards().items():
        for where, expr in [*lib.dashboard_exprs(dashboard), *lib.variable_selectors(dashboard)]:
            rules.append(
                {"record": f"dashboard:query_{len(rules)}", "expr": lib.substitute_variables(expr),
                 "labels": {"where": f"{path.name} {where}"}}
            )
    assert rules
    rule_file = tmp_path / "dashboard-queries.yml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, sort_keys=False))
    result = subprocess.run(
        [promtool, "check", "rules", str(rule_file)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, f"a dashboard query does not parse:\n{result.stdout}\n{result.stderr}"
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_a_broken_query_is_caught(lib: SimpleNamespace, promtool: str, tmp_path: Path) -> None:
    """The parse check above is not vacuous: promtool refuses a malformed query."""
    rule_file = tmp_path / "broken.yml"
    expr = lib.substitute_variables('sum by (model) (rate(dgserve_requests_total{model=~"$model"}[$__rate_interval])')
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [{"record": "x:y", "expr": expr}]}]}))
    result = subprocess.run([promtool, "check", "rules", str(rule_file)], capture_output=True, text=True, check=False)
    assert result.returncode != 0
