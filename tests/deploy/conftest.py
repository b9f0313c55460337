"""Shared helpers for the deployment checks: the repo's paths, YAML with compose tags, promtool.

These tests read the Dockerfile, the compose files and docker/ (Prometheus, alert rules,
Grafana) and check them without any container engine. The ones that need ``promtool``
(Debian package ``prometheus``) skip, saying so, where it is not installed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_CPU = ROOT / "docker-compose.cpu.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PROMETHEUS_DIR = ROOT / "docker" / "prometheus"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
RULES_DIR = PROMETHEUS_DIR / "rules"
RULE_TESTS_DIR = PROMETHEUS_DIR / "tests"
GRAFANA_DIR = ROOT / "docker" / "grafana"
GRAFANA_DATASOURCES = GRAFANA_DIR / "provisioning" / "datasources"
GRAFANA_PROVIDERS = GRAFANA_DIR / "provisioning" / "dashboards"
GRAFANA_DASHBOARDS = GRAFANA_DIR / "dashboards"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"
CONTAINER_TEST = ROOT / "scripts" / "container_test.sh"

PROMTOOL_MISSING = "promtool is not installed (Debian: apt-get install -y prometheus)"


class Reset:
    """A compose ``!reset`` value: the key is removed from the merged result."""

    def __repr__(self) -> str:
        return "!reset"


class Override:
    """A compose ``!override`` value: replaces the merged value instead of merging into it."""

    def __init__(self, value: Any) -> None:
        self.value = value


class ComposeLoader(yaml.SafeLoader):
    """``yaml.safe_load`` plus the two tags of the compose spec's merge rules."""


def _reset(loader: yaml.SafeLoader, node: yaml.Node) -> Reset:
    return Reset()


def _override(loader: yaml.SafeLoader, node: yaml.Node) -> Override:
    if isinstance(node, yaml.MappingNode):
        return Override(loader.construct_mapping(node, deep=True))
    if isinstance(node, yaml.SequenceNode):
        return Override(loader.construct_sequence(node, deep=True))
    return Override(loader.construct_scalar(node))  # type: ignore[arg-type]


ComposeLoader.add_constructor("!reset", _reset)
ComposeLoader.add_constructor("!override", _override)


def load_compose(path: Path) -> dict[str, Any]:
    return yaml.load(path.read_text(), Loader=ComposeLoader)  # noqa: S506 - a SafeLoader subclass


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def merge_compose(base: Any, override: Any) -> Any:
    """Compose's merge of an override file into a base (the rules the CPU override relies on).

    Mappings merge key by key, ``!reset`` removes the key, ``!override`` replaces the value,
    sequences are appended to (so a plain ``devices: []`` would keep the GPU), scalars replace.
    """
    if isinstance(override, Override):
        return override.value
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            if isinstance(value, Reset):
                merged.pop(key, None)
            elif key in merged:
                merged[key] = merge_compose(merged[key], value)
            else:
                merged[key] = value.value if isinstance(value, Override) else value
        return merged
    if isinstance(base, list) and isinstance(override, list):
        return [*base, *override]
    return override


def load_dashboards() -> dict[Path, dict[str, Any]]:
    return {path: json.loads(path.read_text()) for path in sorted(GRAFANA_DASHBOARDS.glob("*.json"))}


def rule_files() -> list[Path]:
    return sorted(RULES_DIR.glob("*.yml"))


def alert_rules() -> list[dict[str, Any]]:
    return [
        rule
        for path in rule_files()
        for group in load_yaml(path)["groups"]
        for rule in group["rules"]
        if "alert" in rule
    ]


def iter_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, the ones inside collapsed rows included."""
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


# Grafana's built-in interval variables, and a value PromQL accepts in their place.
GRAFANA_INTERVALS = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h"}
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)")


def dashboard_variables(dashboard: dict[str, Any]) -> set[str]:
    return {var["name"] for var in dashboard.get("templating", {}).get("list", [])}


def used_variables(expr: str) -> set[str]:
    return {next(g for g in m.groups() if g) for m in _VARIABLE.finditer(expr)}


def substitute_variables(expr: str) -> str:
    """A Grafana query as Prometheus would receive it: intervals become durations and
    template variables a match-everything regex (the dashboard uses them in ``=~``)."""

    def value(match: re.Match[str]) -> str:
        name = next(g for g in match.groups() if g)
        return GRAFANA_INTERVALS.get(name, ".*")

    return _VARIABLE.sub(value, expr)


def dashboard_exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for each panel target, as written (variables not substituted)."""
    out = []
    for panel in iter_panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            if target.get("expr"):
                out.append((f"panel {panel.get('id')} {panel.get('title')!r} target {target.get('refId')}", target["expr"]))
    return out


_LABEL_VALUES = re.compile(r"^\s*label_values\((?:(.*),\s*)?(\w+)\)\s*$", re.S)


def variable_selectors(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, series selector) of each ``label_values(selector, label)`` variable query."""
    out = []
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query", "")
        match = _LABEL_VALUES.match(query or "")
        if match and match.group(1):
            out.append((f"variable ${var['name']}", match.group(1)))
    return out


@pytest.fixture
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip(PROMTOOL_MISSING)
    return path


def run_promtool(promtool: str, *args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [promtool, *map(str, args)], capture_output=True, text=True, timeout=120, cwd=cwd, check=False
    )
    assert result.returncode == 0, f"promtool {' '.join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="session")
def lib() -> SimpleNamespace:
    """This module's paths and helpers (tests import nothing from conftest directly)."""
    return SimpleNamespace(**{name: value for name, value in globals().items() if not name.startswith("_")})
