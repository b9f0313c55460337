"""Prometheus: the config and the alert rules pass promtool, and every alert is unit-tested."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any


def test_config_is_valid_and_loads_the_rules(lib: SimpleNamespace, promtool: str) -> None:
    rules = lib.rule_files()
    assert rules, f"no rule files in {lib.RULES_DIR}"
    result = lib.run_promtool(promtool, "check", "config", lib.PROMETHEUS_CONFIG)
    # rule_files are resolved relative to the config, as in the container: the check
    # must have found and checked every rule file, not matched nothing.
    assert f"SUCCESS: {len(rules)} rule files found" in result.stdout + result.stderr


def test_rule_files_are_valid(lib: SimpleNamespace, promtool: str) -> None:
    lib.run_promtool(promtool, "check", "rules", *lib.rule_files())


def test_alert_unit_tests_pass(lib: SimpleNamespace, promtool: str) -> None:
    tests = sorted(lib.RULE_TESTS_DIR.glob("*.test.yml"))
    assert tests, f"no promtool unit tests in {lib.RULE_TESTS_DIR}"
    # rule_files in the tests are relative to the test file
    lib.run_promtool(promtool, "test", "rules", *tests)


def test_every_alert_fires_in_one_case_and_stays_silent_in_another(lib: SimpleNamespace) -> None:
    fired: set[str] = set()
    silent: set[str] = set()
    loaded: set[str] = set()
    for path in sorted(lib.RULE_TESTS_DIR.glob("*.test.yml")):
        suite = lib.load_yaml(path)
        loaded |= {(path.parent / f).resolve().name for f in suite["rule_files"]}
        for case in suite["tests"]:
            for check in case.get("alert_rule_test", []):
                (fired if check.get("exp_alerts") else silent).add(check["alertname"])
    assert loaded == {p.name for p in lib.rule_files()}, "the unit tests must load every rule file"
    alerts = {rule["alert"] for rule in lib.alert_rules()}
    assert alerts - fired == set(), "alerts never shown firing in a unit test"
    assert alerts - silent == set(), "alerts never shown silent in a unit test"
    assert (fired | silent) - alerts == set(), "unit tests for alerts that do not exist"


def test_alerts_cover_what_operators_need(lib: SimpleNamespace) -> None:
    exprs = {rule["alert"]: rule["expr"] for rule in lib.alert_rules()}
    joined = "\n".join(exprs.values())
    assert 'status=~"5.."' in joined, "an alert on the 5xx ratio"
    assert 'reason="queue_full"' in joined, "an alert on queue saturation (queue_full rejections)"
    assert "histogram_quantile(0.99" in joined and "dgserve_request_duration_seconds_bucket" in joined, "p99 latency"
    assert "dgserve_model_ready == 0" in joined, "an alert on a model that is not ready"


def test_alerts_are_labelled_and_explained(lib: SimpleNamespace) -> None:
    rules: list[dict[str, Any]] = lib.alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)), "alert names must be unique"
    for rule in rules:
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert rule.get("for"), f"{rule['alert']}: a `for:` keeps one bad scrape from paging"
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]


def test_scrape_config_targets_the_compose_service(lib: SimpleNamespace) -> None:
    config = lib.load_yaml(lib.PROMETHEUS_CONFIG)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    dgserve = jobs["dgserve"]
    assert dgserve.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in dgserve["static_configs"] for t in sc["targets"]]
    compose = lib.load_compose(lib.COMPOSE)
    assert "dgserve" in compose["services"]
    assert targets == ["dgserve:8000"], "the compose service name and the server's container port"
    # The DgserveDown alert selects this job by name.
    assert any('job="dgserve"' in rule["expr"] for rule in lib.alert_rules())
