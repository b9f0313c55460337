"""docker-compose.yml and the CPU override: structure, GPU reservation, health gating, env defaults."""

from __future__ import annotations

import os
import re
from types import SimpleNamespace
from typing import Any

import pytest

from dgserve.api.auth import ApiKeys
from dgserve.settings import Settings

_INTERPOLATION = re.compile(r"\$\{([^}]*)\}")
_WITH_DEFAULT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(:?-)(.*)$")


def services(lib: SimpleNamespace) -> dict[str, Any]:
    return lib.load_compose(lib.COMPOSE)["services"]


def split_volume(spec: str) -> list[str]:
    """``source:target[:mode]``, where the source may be ``${VAR:-default}``."""
    hidden: list[str] = []

    def hide(match: re.Match[str]) -> str:
        hidden.append(match.group(0))
        return f"\0{len(hidden) - 1}\0"

    parts = _INTERPOLATION.sub(hide, spec).split(":")
    return [re.sub(r"\0(\d+)\0", lambda m: hidden[int(m.group(1))], part) for part in parts]


def without_comments(text: str) -> str:
    return "\n".join(re.sub(r"(^|\s)#.*$", "", line) for line in text.splitlines())


def gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def test_the_stack_has_its_three_services(lib: SimpleNamespace) -> None:
    assert set(services(lib)) == {"dgserve", "prometheus", "grafana"}


def test_dgserve_reserves_nvidia_gpus_by_env(lib: SimpleNamespace) -> None:
    (device,) = gpu_devices(services(lib)["dgserve"])
    assert device["driver"] == "nvidia"
    assert device["capabilities"] == ["gpu"]
    assert device["count"] == "${DGSERVE_GPU_COUNT:-all}"


def test_dgserve_image_builds_from_this_repo(lib: SimpleNamespace) -> None:
    svc = services(lib)["dgserve"]
    assert svc["build"]["context"] == "."
    assert svc["image"].startswith("${DGSERVE_IMAGE:-")
    assert svc["build"]["args"]["BASE_IMAGE"] == "${DGSERVE_BASE_IMAGE:-python:3.11-slim-bookworm}"
    assert "ARG BASE_IMAGE=python:3.11-slim-bookworm" in lib.DOCKERFILE.read_text()


def test_every_service_has_a_healthcheck(lib: SimpleNamespace) -> None:
    for name, svc in services(lib).items():
        check = svc.get("healthcheck")
        assert check and check.get("test"), f"{name} has no healthcheck"
        assert not check.get("disable"), name
    test = services(lib)["dgserve"]["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1] == "curl" and test[-1] == "http://127.0.0.1:8000/readyz"


def test_later_services_wait_for_healthy_ones(lib: SimpleNamespace) -> None:
    svcs = services(lib)
    assert svcs["prometheus"]["depends_on"] == {"dgserve": {"condition": "service_healthy"}}
    assert svcs["grafana"]["depends_on"] == {"prometheus": {"condition": "service_healthy"}}
    assert "depends_on" not in svcs["dgserve"]


def test_every_variable_has_a_default_and_is_documented(lib: SimpleNamespace) -> None:
    doc = lib.DEPLOY_DOC.read_text()
    seen = set()
    for path in (lib.COMPOSE, lib.COMPOSE_CPU):
        for match in _INTERPOLATION.finditer(without_comments(path.read_text())):
            parsed = _WITH_DEFAULT.match(match.group(1))
            assert parsed and parsed.group(2) == ":-", f"{path.name}: ${{{match.group(1)}}} needs a :-default"
            seen.add(parsed.group(1))
    assert {"DGSERVE_GPU_COUNT", "DGSERVE_DEVICES", "DGSERVE_INSTANCES_PER_DEVICE"} <= seen
    undocumented = sorted(name for name in seen if f"`{name}`" not in doc)
    assert undocumented == [], f"not in {lib.DEPLOY_DOC.name}"


def test_server_settings_passed_in_are_real_settings(lib: SimpleNamespace) -> None:
    fields = set(Settings.model_fields)
    env = services(lib)["dgserve"]["environment"]
    assert env["DGSERVE_DEVICES"] == "${DGSERVE_DEVICES:-auto}"
    assert env["DGSERVE_INSTANCES_PER_DEVICE"] == "${DGSERVE_INSTANCES_PER_DEVICE:-1}"
    for name in env:
        assert name.startswith("DGSERVE_") and name.removeprefix("DGSERVE_").lower() in fields, name
    for line in lib.DOCKERFILE.read_text().splitlines():
        for name in re.findall(r"\b(DGSERVE_[A-Z_]+)=", line):
            assert name.removeprefix("DGSERVE_").lower() in fields, f"Dockerfile sets unknown {name}"


def test_volumes_match_the_image(lib: SimpleNamespace) -> None:
    dockerfile = lib.DOCKERFILE.read_text()
    store = re.search(r"DGSERVE_MODEL_STORE=(\S+)", dockerfile).group(1)  # type: ignore[union-attr]
    data = re.search(r"DGSERVE_DATA_DIR=(\S+)", dockerfile).group(1)  # type: ignore[union-attr]
    volumes = [split_volume(v) for v in services(lib)["dgserve"]["volumes"]]
    targets = {v[1]: v for v in volumes}
    assert targets[store][0] == "${DGSERVE_STORE_DIR:-./model_store}" and targets[store][2] == "ro"
    assert targets[data][0] == "${DGSERVE_DATA_VOLUME:-dgserve-data}"
    declared = lib.load_compose(lib.COMPOSE)["volumes"]
    assert {"dgserve-data", "prometheus-data", "grafana-data"} <= set(declared)


def test_volume_specs_split_around_interpolations() -> None:
    assert split_volume("${A:-./x}:/y:ro") == ["${A:-./x}", "/y", "ro"]
    assert split_volume("name:/data") == ["name", "/data"]


def test_prometheus_mounts_its_config_and_rules(lib: SimpleNamespace) -> None:
    svc = services(lib)["prometheus"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in svc["volumes"]}
    assert mounts["/etc/prometheus/prometheus.yml"] == "./docker/prometheus/prometheus.yml"
    assert mounts["/etc/prometheus/rules"] == "./docker/prometheus/rules"
    assert "--config.file=/etc/prometheus/prometheus.yml" in svc["command"]
    assert svc["build"]["context"] == "./docker/prometheus"
    assert (lib.ROOT / "docker" / "prometheus" / "Dockerfile").is_file()


def test_cpu_override_removes_the_gpu_reservation(lib: SimpleNamespace) -> None:
    base = lib.load_compose(lib.COMPOSE)
    override = lib.load_compose(lib.COMPOSE_CPU)
    # A `!reset` at the device list itself: a plain empty list would be appended to the
    # base's list by compose's merge and keep the GPU.
    devices = override["services"]["dgserve"]["deploy"]["resources"]["reservations"]["devices"]
    assert isinstance(devices, lib.Reset)
    merged = lib.merge_compose(base, override)
    dgserve = merged["services"]["dgserve"]
    assert gpu_devices(dgserve) == []
    assert dgserve["environment"]["DGSERVE_DEVICES"] == "cpu"
    # Its 2 server processes: a dead one's queued connections go to the other (the server
    # warns when this is 0; tests/api/test_server_processes.py shows what it changes).
    assert dgserve["sysctls"] == {"net.ipv4.tcp_migrate_req": 1}
    # ... and changes nothing else
    assert dgserve["healthcheck"] == base["services"]["dgserve"]["healthcheck"]
    assert merged["services"]["prometheus"] == base["services"]["prometheus"]
    assert set(override["services"]) == {"dgserve"}


def interpolate(value: str, shell: dict[str, str]) -> str:
    """Compose's ``${VAR:-default}`` / ``${VAR-default}`` against ``shell`` (the shell and `.env` together)."""

    def one(match: re.Match[str]) -> str:
        parsed = _WITH_DEFAULT.match(match.group(1))
        assert parsed, match.group(0)
        name, operator, default = parsed.groups()
        if name not in shell or (operator == ":-" and shell[name] == ""):
            return default
        return shell[name]

    return _INTERPOLATION.sub(one, value)


def test_interpolation_follows_compose() -> None:
    assert interpolate("${A:-x}", {}) == "x" and interpolate("${A:-x}", {"A": ""}) == "x"
    assert interpolate("${A-x}", {"A": ""}) == "" and interpolate("a${A:-}b", {"A": "1"}) == "a1b"


def test_api_keys_pass_through_from_the_environment(lib: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/deploy.md ("API keys"): compose passes DGSERVE_API_KEYS from `.env`, so setting it there turns
    keys on, on the GPU stack and under the CPU override alike; unset, the API stays open."""
    base = lib.load_compose(lib.COMPOSE)
    merged = lib.merge_compose(base, lib.load_compose(lib.COMPOSE_CPU))
    doc = lib.DEPLOY_DOC.read_text()
    assert "Compose passes `DGSERVE_API_KEYS` from `.env`" in doc, "the guide and this test describe the same wiring"
    key = "compose-key-0123456789abcdef"
    for stack in (base, merged):
        env = stack["services"]["dgserve"]["environment"]
        # The value is only the interpolation: a key written into the file would end up in git.
        assert env["DGSERVE_API_KEYS"] == "${DGSERVE_API_KEYS:-}"
        for shell, scopes in (({"DGSERVE_API_KEYS": f"{key}:infer"}, {"infer"}), ({}, None)):
            # What the server process sees: the service's environment as compose resolves it.
            for name in list(os.environ):
                if name.startswith("DGSERVE_"):
                    monkeypatch.delenv(name)
            for name, value in env.items():
                monkeypatch.setenv(name, interpolate(str(value), shell))
            keys = ApiKeys.from_settings(Settings())
            if scopes is None:
                assert not keys.enabled, "with no DGSERVE_API_KEYS in `.env` the API stays open"
            else:
                assert keys.enabled and keys.scopes_of(key) == scopes


def test_files_that_hold_keys_stay_out_of_git(lib: SimpleNamespace) -> None:
    # `.env` holds DGSERVE_API_KEYS (the compose file says so), and dgserve.env, which compose also reads into
    # the server's environment, may hold keys too: neither may be committed.
    ignored = {line.strip() for line in (lib.ROOT / ".gitignore").read_text().splitlines()}
    assert {".env", "dgserve.env"} <= ignored
    # ... nor copied into the image: the Dockerfile copies named paths only, never the whole context.
    sources = [line.split()[1:-1] for line in lib.DOCKERFILE.read_text().splitlines() if line.startswith("COPY ")]
    assert sources and all(src not in (".", "./", ".env") for srcs in sources for src in srcs), sources
