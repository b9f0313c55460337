"""Kubernetes and KServe: deploy/kubernetes/ builds, validates, and says what dgserve needs.

Every overlay is built with ``kubectl kustomize`` (kubectl v1.32 bundles kustomize v5.5),
and every object it yields is checked offline:

- Kubernetes objects against the Kubernetes OpenAPI schemas of :data:`K8S_VERSION`, in strict
  mode (unknown fields refused), with the schemas that ``kubernetes-validate`` ships;
- KServe objects (``ServingRuntime``, ``InferenceService``) against KServe's own API, the
  models the ``kserve`` SDK generates from it: :func:`check_kserve` walks each object through
  the models' ``attribute_map``/``openapi_types`` and refuses any field a model does not have
  (the generated models themselves ignore unknown keys). Fields of Kubernetes types inside
  them (containers, volumes, metadata...) are checked against the strict Kubernetes schemas.

Then what dgserve needs of the manifests: probes on its health routes, the ports and settings
it listens on, a grace period longer than its drain, the secret database URL, and so on.

``kubectl``, ``kubernetes-validate`` and ``kserve`` are in the ``test`` extra or on CI's
machine; where one is missing these tests skip, saying so, and fail instead under CI=true.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NoReturn

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
KUBE_DIR = ROOT / "deploy" / "kubernetes"
OVERLAYS_DIR = KUBE_DIR / "overlays"
EXAMPLES_DIR = KUBE_DIR / "examples"
SCRAPE_CONFIG = KUBE_DIR / "prometheus" / "scrape-config.yml"
DOCKERFILE = ROOT / "Dockerfile"

# The oldest Kubernetes the manifests are written for: every field they use exists there.
K8S_VERSION = "1.30"

# What each overlay builds, by kind. A new overlay needs an entry (and so a look at its checks).
EXPECTED_KINDS = {
    "gpu": ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service"],
    "cpu": ["ConfigMap", "Deployment", "Service"],
    "kserve": ["ConfigMap", "InferenceService", "PodDisruptionBudget", "ServingRuntime"],
}
KSERVE_GROUP = "serving.kserve.io"

HTTP_PORT, GRPC_PORT = 8000, 8001
SECRET_NAME, SECRET_KEY = "dgserve-inspection-db", "url"
DGSERVE_UID = 10001

# Shutdown, after the preStop sleep and SIGTERM (dgserve.api.app's lifespan): the server drains
# HTTP requests (drain_seconds()), the gRPC server stops with this grace, then the inspection
# store flushes what is queued (3 tries, about 15 s with the database down: docs/deploy.md).
GRPC_STOP_GRACE_S = 5
STORE_FLUSH_S = 15
MIN_MARGIN_S = 10


def missing(what: str) -> NoReturn:
    """Skip where a tool is missing, but fail in CI, where every check must run."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what}, and CI=true requires it")
    pytest.skip(what)


# --- building the overlays ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        missing("kubectl is not installed (it bundles kustomize; https://kubernetes.io/docs/tasks/tools/)")
    return path


def overlay_names() -> list[str]:
    return sorted(p.name for p in OVERLAYS_DIR.iterdir() if (p / "kustomization.yaml").is_file())


@functools.cache
def _build(kubectl: str, directory: Path) -> tuple[dict[str, Any], ...]:
    result = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, f"kubectl kustomize {directory.relative_to(ROOT)} failed:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def build(kubectl: str, overlay: str) -> list[dict[str, Any]]:
    """The objects ``kubectl kustomize deploy/kubernetes/overlays/<overlay>`` yields (copies)."""
    return json.loads(json.dumps(_build(kubectl, OVERLAYS_DIR / overlay)))


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def settings_of(objects: list[dict[str, Any]]) -> dict[str, str]:
    return one(objects, "ConfigMap")["data"]


def pod_spec(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return one(objects, "Deployment")["spec"]["template"]["spec"]


def container(spec: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in spec["containers"] if c["name"] == name]
    return found


def env_of(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in c.get("env", [])}


def test_overlays_are_the_expected_ones() -> None:
    assert overlay_names() == sorted(EXPECTED_KINDS), "a new overlay needs an entry in EXPECTED_KINDS"


@pytest.mark.parametrize("overlay", sorted(EXPECTED_KINDS))
def test_overlay_builds(kubectl: str, overlay: str) -> None:
    objects = build(kubectl, overlay)
    assert sorted(o["kind"] for o in objects) == EXPECTED_KINDS[overlay]
    for obj in objects:
        assert obj["metadata"]["labels"]["app.kubernetes.io/name"] == "dgserve", f"{obj['kind']} needs the name label"


def test_base_builds(kubectl: str) -> None:
    kinds = sorted(o["kind"] for o in _build(kubectl, KUBE_DIR / "base"))
    assert kinds == EXPECTED_KINDS["gpu"]


# --- Kubernetes schemas -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kubernetes_validate() -> types.ModuleType:
    try:
        return importlib.import_module("kubernetes_validate")
    except ImportError:
        missing("kubernetes-validate is not installed (pip install -e '.[test]')")


@functools.cache
def _k8s_definitions(kv_file: str, version: str) -> tuple[Any, dict[str, Any]]:
    """The strict Kubernetes definitions that kubernetes-validate ships: (registry, $defs)."""
    from referencing import Registry, Resource

    matches = sorted(Path(kv_file).parent.glob(f"kubernetes-json-schema/v{version}.*-local-strict/_definitions.json"))
    assert matches, f"kubernetes-validate has no strict schemas for Kubernetes {version}"
    contents = json.loads(matches[-1].read_text())
    return Registry().with_resource(contents["$id"], Resource.from_contents(contents)), contents["$defs"]


def validate_k8s_definition(kv: types.ModuleType, value: Any, definition: str) -> list[str]:
    """Errors of ``value`` against one strict Kubernetes definition (e.g. io.k8s.api.core.v1.Container)."""
    import jsonschema

    registry, defs = _k8s_definitions(kv.__file__, K8S_VERSION)
    if definition not in defs:
        return [f"no Kubernetes {K8S_VERSION} definition {definition}"]
    schema = {"$ref": f"https://kubernetes.io/api/_definitions.json#/$defs/{definition}"}
    validator = jsonschema.Draft202012Validator(schema, registry=registry)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(value)]


def test_the_kubernetes_check_is_strict(kubernetes_validate: types.ModuleType) -> None:
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "x"},
        "spec": {
            "selector": {"matchLabels": {"a": "b"}},
            "template": {
                "metadata": {"labels": {"a": "b"}},
                "spec": {"containers": [{"name": "c", "image": "i", "readinessProbe": {"httpGett": {}}}]},
            },
        },
    }
    with pytest.raises(kubernetes_validate.ValidationError, match="httpGett"):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    assert validate_k8s_definition(kubernetes_validate, {"name": "c", "imag": "i"}, "io.k8s.api.core.v1.Container")


@pytest.mark.parametrize("overlay", sorted(EXPECTED_KINDS))
def test_objects_validate_against_the_kubernetes_schemas(
    kubectl: str, kubernetes_validate: types.ModuleType, overlay: str
) -> None:
    checked = 0
    for obj in build(kubectl, overlay):
        if obj["apiVersion"].startswith(KSERVE_GROUP + "/"):
            continue  # KServe's own API: test_kserve_objects_validate_against_kserves_models
        version = kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        assert version == K8S_VERSION
        checked += 1
    assert checked >= 2


def test_examples_validate_against_the_kubernetes_schemas(kubernetes_validate: types.ModuleType) -> None:
    examples = sorted(EXAMPLES_DIR.glob("*.yaml"))
    assert examples
    for path in examples:
        for obj in yaml.safe_load_all(path.read_text()):
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


# --- KServe's API, from the kserve SDK's generated models ---------------------------------------------


@pytest.fixture(scope="module")
def kserve_models() -> types.ModuleType:
    """``kserve.models`` without running ``kserve/__init__.py``.

    That ``__init__`` starts importing KServe's model server (fastapi apps, gRPC servers,
    pandas...), none of which the generated models need: they import only ``six`` and
    ``kserve.configuration``. So a bare package stands in for ``kserve`` while its ``models``
    load, and is removed again, so that a later ``import kserve`` gets the real one.
    """
    spec = importlib.util.find_spec("kserve")
    if spec is None or not spec.submodule_search_locations:
        missing("the kserve SDK is not installed (pip install -e '.[test]')")
    if "kserve.models" in sys.modules:
        return sys.modules["kserve.models"]
    stub = types.ModuleType("kserve")
    stub.__path__ = list(spec.submodule_search_locations)
    stub.__spec__ = spec
    real = sys.modules.get("kserve")
    sys.modules["kserve"] = stub
    try:
        return importlib.import_module("kserve.models")
    finally:
        if real is not None:
            sys.modules["kserve"] = real
        else:
            del sys.modules["kserve"]


_PRIMITIVES: dict[str, tuple[type, ...]] = {"str": (str,), "int": (int,), "bool": (bool,), "float": (int, float)}


def _k8s_definition_of(type_name: str) -> str | None:
    """The Kubernetes schema definition of a Kubernetes type the kserve models refer to."""
    if type_name == "ResourceQuantity":
        return "io.k8s.apimachinery.pkg.api.resource.Quantity"
    # K8sIoApiAppsV1DeploymentStrategy -> io.k8s.api.apps.v1.DeploymentStrategy
    match = re.fullmatch(r"K8sIoApi([A-Z][a-z]+)(V\d+(?:(?:alpha|beta)\d+)?)([A-Z]\w*)", type_name)
    if match:
        return f"io.k8s.api.{match[1].lower()}.{match[2].lower()}.{match[3]}"
    # V1Container -> io.k8s.api.core.v1.Container; V1ObjectMeta -> ...meta.v1.ObjectMeta
    match = re.fullmatch(r"(V\d+(?:(?:alpha|beta)\d+)?)([A-Z]\w*)", type_name)
    if match:
        version, kind = match[1].lower(), match[2]
        for prefix in ("io.k8s.api.core", "io.k8s.apimachinery.pkg.apis.meta"):
            if f"{prefix}.{version}.{kind}" in _known_k8s_definitions():
                return f"{prefix}.{version}.{kind}"
    return None


@functools.cache
def _known_k8s_definitions() -> frozenset[str]:
    kv = importlib.import_module("kubernetes_validate")
    return frozenset(_k8s_definitions(kv.__file__, K8S_VERSION)[1])


def check_kserve(models: types.ModuleType, value: Any, type_name: str, path: str, errors: list[str]) -> Any:
    """Walk ``value`` through the generated model ``type_name``: unknown fields, wrong types.

    Returns the value as the models hold it (model instances built with the generated
    constructors, whose setters check required fields); appends each problem to ``errors``.
    """
    if type_name.startswith("list[") and type_name.endswith("]"):
        if not isinstance(value, list):
            errors.append(f"{path}: expected a list ({type_name}), got {type(value).__name__}")
            return None
        return [check_kserve(models, item, type_name[5:-1], f"{path}[{i}]", errors) for i, item in enumerate(value)]
    if type_name.startswith("dict(") and type_name.endswith(")"):
        key_type, item_type = (t.strip() for t in type_name[5:-1].split(",", 1))
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a mapping ({type_name}), got {type(value).__name__}")
            return None
        return {
            check_kserve(models, k, key_type, f"{path} key", errors): check_kserve(models, v, item_type, f"{path}.{k}", errors)
            for k, v in value.items()
        }
    if type_name == "object":
        return value
    if type_name in _PRIMITIVES:
        if not isinstance(value, _PRIMITIVES[type_name]) or (type_name != "bool" and isinstance(value, bool)):
            errors.append(f"{path}: expected {type_name}, got {value!r}")
        return value
    cls = getattr(models, type_name, None)
    if cls is not None:
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a {type_name} mapping, got {type(value).__name__}")
            return None
        field_of = {json_key: attr for attr, json_key in cls.attribute_map.items()}
        kwargs = {}
        for key, item in value.items():
            if key not in field_of:
                errors.append(f"{path}.{key}: {type_name} has no field {key!r} (fields: {sorted(field_of)})")
                continue
            attr = field_of[key]
            kwargs[attr] = check_kserve(models, item, cls.openapi_types[attr], f"{path}.{key}", errors)
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            errors.append(f"{path}: {type_name} refused it: {exc}")
            return None
    definition = _k8s_definition_of(type_name)
    if definition is None:
        errors.append(f"{path}: no model or Kubernetes definition for type {type_name}")
        return value
    kv = importlib.import_module("kubernetes_validate")
    errors.extend(f"{path}/{e}" for e in validate_k8s_definition(kv, value, definition))
    return value


KSERVE_ROOT_TYPES = {
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "V1alpha1ServingRuntime",
    ("serving.kserve.io/v1beta1", "InferenceService"): "V1beta1InferenceService",
}


def kserve_errors(models: types.ModuleType, obj: dict[str, Any]) -> list[str]:
    type_name = KSERVE_ROOT_TYPES.get((obj["apiVersion"], obj["kind"]))
    if type_name is None:
        return [f"{obj['apiVersion']} {obj['kind']}: not a KServe kind these manifests should use"]
    errors: list[str] = []
    check_kserve(models, obj, type_name, obj["kind"], errors)
    return errors


def test_the_kserve_check_refuses_unknown_fields(
    kubectl: str, kserve_models: types.ModuleType, kubernetes_validate: types.ModuleType
) -> None:
    objects = build(kubectl, "kserve")
    runtime, isvc = one(objects, "ServingRuntime"), one(objects, "InferenceService")
    mutations = [
        (runtime, lambda o: o["spec"].update(protocolVersion=["v2"]), "protocolVersion"),
        (runtime, lambda o: o["spec"]["supportedModelFormats"][0].update(autoselect=True), "autoselect"),
        (runtime, lambda o: o["spec"]["containers"][0].update(readinessprobe={}), "readinessprobe"),
        (runtime, lambda o: o["spec"]["supportedModelFormats"][0].update(version=1), "expected str"),
        (isvc, lambda o: o["spec"]["predictor"].update(minReplica=1), "minReplica"),
        (isvc, lambda o: o["spec"]["predictor"]["model"].update(modelformat={"name": "dgserve"}), "modelformat"),
        (isvc, lambda o: o["spec"]["predictor"]["model"]["resources"].update(limit={}), "limit"),
        (isvc, lambda o: o["metadata"].update(annotation={}), "annotation"),
    ]
    for original, mutate, expected in mutations:
        obj = json.loads(json.dumps(original))
        mutate(obj)
        errors = kserve_errors(kserve_models, obj)
        assert any(expected in e for e in errors), f"{expected!r} was not refused: {errors}"


def test_kserve_objects_validate_against_kserves_models(
    kubectl: str, kserve_models: types.ModuleType, kubernetes_validate: types.ModuleType
) -> None:
    kserve_objects = [o for o in build(kubectl, "kserve") if o["apiVersion"].startswith(KSERVE_GROUP + "/")]
    assert sorted(o["kind"] for o in kserve_objects) == ["InferenceService", "ServingRuntime"]
    for obj in kserve_objects:
        assert kserve_errors(kserve_models, obj) == [], obj["kind"]


# --- what dgserve needs ------------------------------------------------------------------------------


def prestop_seconds(c: dict[str, Any]) -> float:
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, command
    return float(command[1])


def drain_seconds(settings: dict[str, str]) -> float:
    """How long the server drains requests after SIGTERM (dgserve.api.drain): at most
    DGSERVE_DRAIN_TIMEOUT_S from the ConfigMap, else its default, plus the drain's tail."""
    from dgserve.api.drain import TAIL_S
    from dgserve.settings import Settings

    timeout = settings.get("DGSERVE_DRAIN_TIMEOUT_S", Settings.model_fields["drain_timeout_s"].default)
    return float(timeout) + TAIL_S


def check_grace_period(grace: int, c: dict[str, Any], settings: dict[str, str]) -> None:
    needed = prestop_seconds(c) + drain_seconds(settings) + GRPC_STOP_GRACE_S + STORE_FLUSH_S
    assert grace >= needed + MIN_MARGIN_S, (
        f"terminationGracePeriodSeconds {grace} < preStop {prestop_seconds(c)} + drain {drain_seconds(settings)}"
        f" + gRPC {GRPC_STOP_GRACE_S} + flush {STORE_FLUSH_S} + margin {MIN_MARGIN_S}"
    )


def check_probes(c: dict[str, Any], port: int | str) -> None:
    paths = {probe: (c[probe]["httpGet"]["path"], c[probe]["httpGet"]["port"]) for probe in
             ("startupProbe", "readinessProbe", "livenessProbe")}
    assert paths == {"startupProbe": ("/healthz", port), "readinessProbe": ("/readyz", port),
                     "livenessProbe": ("/healthz", port)}
    # liveness must not kill a pod whose models are still loading: it asks /healthz, and the
    # startup probe allows for the interpreter and torch to start
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60


def check_container_security(c: dict[str, Any]) -> None:
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sc.get("runAsNonRoot", True) is True
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert {"/tmp", "/data"} <= set(mounts), "writable emptyDirs for /tmp and the data dir"
    assert env_of(c)["HOME"]["value"] == "/tmp", "caches under $HOME need a writable HOME"


def check_emptydirs(volumes: list[dict[str, Any]], c: dict[str, Any]) -> None:
    by_name = {v["name"]: v for v in volumes}
    for mount in c["volumeMounts"]:
        if mount["mountPath"] in ("/tmp", "/data"):
            assert "emptyDir" in by_name[mount["name"]], mount


def dockerfile_uid() -> int:
    match = re.search(r"useradd\b[^\n]*--uid (\d+)", DOCKERFILE.read_text())
    assert match, "the Dockerfile creates its user with --uid"
    return int(match[1])


def check_inspection_url_from_secret(c: dict[str, Any]) -> None:
    url = env_of(c)["DGSERVE_INSPECTION_URL"]
    assert url["valueFrom"]["secretKeyRef"] == {"name": SECRET_NAME, "key": SECRET_KEY}
    assert "value" not in url


def test_gpu_deployment_serves_dgserve(kubectl: str) -> None:
    objects = build(kubectl, "gpu")
    deployment = one(objects, "Deployment")
    spec = pod_spec(objects)
    c = container(spec, "dgserve")
    settings = settings_of(objects)

    assert c["args"] == ["serve"]
    assert c["image"] != "dgserve", "the overlay sets the image name and tag"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "cpu" not in c["resources"]["limits"], "no CPU limit (throttling); the request drives the HPA"
    assert c["resources"]["requests"]["cpu"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": HTTP_PORT, "grpc": GRPC_PORT}
    check_probes(c, HTTP_PORT)
    check_grace_period(spec["terminationGracePeriodSeconds"], c, settings)
    check_container_security(c)
    check_emptydirs(spec["volumes"], c)
    check_inspection_url_from_secret(c)
    assert c["envFrom"] == [{"configMapRef": {"name": one(objects, "ConfigMap")["metadata"]["name"]}}]

    pod_security = spec["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    assert pod_security["runAsUser"] == pod_security["runAsGroup"] == dockerfile_uid() == DGSERVE_UID
    assert spec["enableServiceLinks"] is False, "service links would set DGSERVE_* variables"
    assert spec["automountServiceAccountToken"] is False

    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/path": "/metrics",
                           "prometheus.io/port": str(HTTP_PORT)}
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_gpu_service_hpa_and_pdb_select_the_pods(kubectl: str) -> None:
    objects = build(kubectl, "gpu")
    deployment = one(objects, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()

    service = one(objects, "Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    ports = {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]}
    assert ports == {"http": (HTTP_PORT, "http"), "grpc": (GRPC_PORT, "grpc")}

    hpa = one(objects, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment", deployment["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] >= 2, "a drain or a restart must leave a replica serving"
    assert hpa["spec"]["maxReplicas"] >= hpa["spec"]["minReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"

    pdb = one(objects, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["maxUnavailable"]


@pytest.mark.parametrize("overlay", sorted(EXPECTED_KINDS))
def test_settings_are_dgserve_settings(kubectl: str, overlay: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from dgserve.settings import Settings

    settings = settings_of(build(kubectl, overlay))
    known = {f"DGSERVE_{name.upper()}" for name in Settings.model_fields}
    assert set(settings) <= known, f"not dgserve settings: {sorted(set(settings) - known)}"
    assert settings["DGSERVE_HOST"] == "0.0.0.0", "in a pod the server must listen beyond loopback"
    assert int(settings["DGSERVE_PORT"]) == HTTP_PORT and int(settings["DGSERVE_GRPC_PORT"]) == GRPC_PORT
    assert settings["DGSERVE_DATA_DIR"] == "/data"
    assert "DGSERVE_INSPECTION_URL" not in settings, "the database URL holds a password: a Secret, never the ConfigMap"
    for name in known:
        monkeypatch.delenv(name, raising=False)
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    Settings()  # the server accepts every value


@pytest.mark.parametrize("overlay", sorted(EXPECTED_KINDS))
def test_no_secret_is_shipped(kubectl: str, overlay: str) -> None:
    objects = build(kubectl, overlay)
    assert "Secret" not in {o["kind"] for o in objects}, "users create the Secret (examples/ shows one)"
    text = json.dumps(objects)
    assert "postgresql://" not in text and "postgres://" not in text


def test_the_example_secret_is_an_example() -> None:
    (secret,) = [o for path in EXAMPLES_DIR.glob("*.yaml") for o in yaml.safe_load_all(path.read_text()) if o]
    assert secret["kind"] == "Secret" and secret["metadata"]["name"] == SECRET_NAME
    assert secret["stringData"][SECRET_KEY].startswith("postgresql://dgserve:CHANGE-ME@")
    for kustomization in KUBE_DIR.rglob("kustomization.yaml"):
        spec = yaml.safe_load(kustomization.read_text())
        used = [ref for key in ("resources", "components") for ref in spec.get(key, [])]
        assert not any("examples" in ref for ref in used), f"{kustomization} must not apply the example"


def test_cpu_overlay_runs_without_gpu_or_database(kubectl: str) -> None:
    objects = build(kubectl, "cpu")
    deployment = one(objects, "Deployment")
    spec = pod_spec(objects)
    c = container(spec, "dgserve")
    settings = settings_of(objects)

    assert "nvidia.com/gpu" not in json.dumps(objects), "no GPU limit, request or toleration"
    assert settings["DGSERVE_DEVICES"] == "cpu"
    requests = c["resources"]["requests"]
    threads = int(settings["DGSERVE_SERVER_PROCESSES"]) * int(settings["DGSERVE_TORCH_THREADS"])
    assert threads == int(requests["cpu"]), "torch threads, over every server process, sized to the pod's CPU"
    gpu = container(pod_spec(build(kubectl, "gpu")), "dgserve")["resources"]["requests"]
    assert _bytes(requests["memory"]) <= _bytes(gpu["memory"]), "smaller requests than the GPU pods"
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}, "never two pods with their own SQLite store"
    # SQLite under the data dir, on the pod's emptyDir
    assert "DGSERVE_INSPECTION_URL" not in env_of(c)
    data_mount = next(m for m in c["volumeMounts"] if m["mountPath"] == settings["DGSERVE_DATA_DIR"])
    assert "emptyDir" in next(v for v in spec["volumes"] if v["name"] == data_mount["name"])
    # everything else as in the base
    check_probes(c, HTTP_PORT)
    check_grace_period(spec["terminationGracePeriodSeconds"], c, settings)
    check_container_security(c)


def _bytes(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)?", quantity)
    assert match, quantity
    return int(match[1]) * units.get(match[2] or "", 1)


def test_kserve_runtime_and_inference_service(kubectl: str) -> None:
    objects = build(kubectl, "kserve")
    runtime, isvc = one(objects, "ServingRuntime"), one(objects, "InferenceService")
    settings = settings_of(objects)

    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1"
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    spec = runtime["spec"]
    assert spec["protocolVersions"] == ["v2"]
    formats = {f["name"]: f for f in spec["supportedModelFormats"]}
    assert "dgserve" in formats
    (c,) = spec["containers"]
    assert c["name"] == "kserve-container", "KServe finds the model server by this name"
    assert c["args"] == ["serve"]
    assert c["image"] != "dgserve", "the overlay sets the image name and tag"
    # KServe's port names: http1 (REST, first: the predictor Service's port 80), h2c (gRPC)
    assert [(p["name"], p["containerPort"]) for p in c["ports"]] == [("http1", HTTP_PORT), ("h2c", GRPC_PORT)]
    check_probes(c, HTTP_PORT)
    check_container_security(c)
    check_emptydirs(spec["volumes"], c)
    check_inspection_url_from_secret(c)
    assert c["envFrom"] == [{"configMapRef": {"name": one(objects, "ConfigMap")["metadata"]["name"]}}], (
        "kustomize must rewrite the runtime's reference to the generated ConfigMap name"
    )
    assert spec["annotations"]["prometheus.io/port"] == str(HTTP_PORT)
    assert spec["labels"]["app.kubernetes.io/name"] == "dgserve"

    predictor = isvc["spec"]["predictor"]
    model = predictor["model"]
    assert model["modelFormat"]["name"] == "dgserve"
    assert model["modelFormat"]["version"] == formats["dgserve"]["version"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["protocolVersion"] == "v2"
    assert model["resources"]["limits"]["nvidia.com/gpu"] == "1"
    annotations = isvc["metadata"]["annotations"]
    assert annotations["serving.kserve.io/deploymentMode"] == "Standard", "two ports need plain Deployments"
    assert annotations["serving.kserve.io/autoscalerClass"] == "hpa"
    assert (predictor["scaleMetric"], predictor["minReplicas"]) == ("cpu", 2)
    check_grace_period(predictor["terminationGracePeriodSeconds"], c, settings)
    assert predictor["enableServiceLinks"] is False
    assert predictor["securityContext"]["runAsUser"] == dockerfile_uid()

    pdb = one(objects, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"]["serving.kserve.io/inferenceservice"] == isvc["metadata"]["name"]


# --- API keys ----------------------------------------------------------------------------------------------

# docs/deploy.md, "API keys": Kubernetes reads DGSERVE_API_KEYS from this optional Secret and key.
API_KEYS_SECRET, API_KEYS_SECRET_KEY = "dgserve-api-keys", "keys"
API_KEYS_ENV = "DGSERVE_API_KEYS"
# The manifests as written, each with the number of containers in it that run the dgserve image.
SERVER_MANIFESTS = {"base/deployment.yaml": 1, "overlays/kserve/servingruntime.yaml": 1}
# What each build yields of them: the cpu overlay patches the base's env list, so it is checked as built.
SERVER_CONTAINERS = {"base": 1, **{overlay: 1 for overlay in EXPECTED_KINDS}}


def dgserve_containers(value: Any, where: str = "") -> list[tuple[str, dict[str, Any]]]:
    """(where, container) for every mapping anywhere in ``value`` that runs the dgserve image, whatever the
    kind holding it (Deployment, ServingRuntime, a future one): a new place that runs the server is checked too."""
    found = []
    if isinstance(value, dict):
        image = value.get("image")
        if isinstance(image, str) and image.rsplit("/", 1)[-1].split(":")[0].split("@")[0] == "dgserve":
            found.append((f"{where}/{value.get('name')}", value))
        for key, item in value.items():
            found.extend(dgserve_containers(item, f"{where}/{key}"))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found.extend(dgserve_containers(item, f"{where}[{i}]"))
    return found


def env_entries(value: Any) -> list[dict[str, Any]]:
    """Every ``env`` entry anywhere in ``value`` (containers, and an InferenceService's model, which KServe
    merges into the runtime's container, so that its env would override the runtime's)."""
    if isinstance(value, list):
        return [entry for item in value for entry in env_entries(item)]
    if not isinstance(value, dict):
        return []
    own = [e for e in value["env"] if isinstance(e, dict)] if isinstance(value.get("env"), list) else []
    return own + [entry for item in value.values() for entry in env_entries(item)]


def check_api_keys_from_secret(objects: list[dict[str, Any]], expected_containers: int) -> None:
    containers = dgserve_containers(objects)
    assert len(containers) == expected_containers, [where for where, _ in containers]
    for where, c in containers:
        keys = env_of(c).get(API_KEYS_ENV)
        assert keys is not None, f"{where}: no {API_KEYS_ENV}, so the server runs with the API open"
        # optional: the pod starts (open) without the Secret; the key is read by name, never written here.
        assert keys == {"name": API_KEYS_ENV, "valueFrom": {"secretKeyRef": {
            "name": API_KEYS_SECRET, "key": API_KEYS_SECRET_KEY, "optional": True}}}, where  # fmt: skip
    # Nothing else sets the keys: not a plain value beside it, not an InferenceService's env over it.
    entries = [e for e in env_entries(objects) if e.get("name") in (API_KEYS_ENV, API_KEYS_ENV + "_FILE")]
    assert len(entries) == expected_containers and all("value" not in e for e in entries), entries
    for obj in objects:
        if obj["kind"] == "ConfigMap":  # a ConfigMap is readable by whoever can read the namespace's config
            assert not {API_KEYS_ENV, API_KEYS_ENV + "_FILE"} & set(obj.get("data", {})), obj["metadata"]["name"]


def test_the_api_keys_secret_is_the_one_the_guide_names() -> None:
    doc = (ROOT / "docs" / "deploy.md").read_text()
    said = re.search(r"Kubernetes reads it from the optional\s+Secret `([^`]+)`, key `([^`]+)`", doc)
    assert said, "docs/deploy.md no longer says which Secret holds the keys"
    assert (said[1], said[2]) == (API_KEYS_SECRET, API_KEYS_SECRET_KEY)
    # The command the guide gives creates exactly that Secret and key.
    command = re.search(r"kubectl create secret generic (\S+) .*?--from-literal=(\w+)=", doc)
    assert command and (command[1], command[2]) == (API_KEYS_SECRET, API_KEYS_SECRET_KEY)


@pytest.mark.parametrize("manifest", sorted(SERVER_MANIFESTS))
def test_server_manifests_read_api_keys_from_the_optional_secret(manifest: str) -> None:
    """As written, without kubectl: every manifest that runs the server reads the keys from the Secret."""
    objects = [o for o in yaml.safe_load_all((KUBE_DIR / manifest).read_text()) if o]
    check_api_keys_from_secret(objects, SERVER_MANIFESTS[manifest])


def test_every_manifest_that_runs_the_server_is_listed() -> None:
    running = sorted(
        str(path.relative_to(KUBE_DIR)) for path in KUBE_DIR.rglob("*.yaml")
        if dgserve_containers([o for o in yaml.safe_load_all(path.read_text()) if o])
    )  # fmt: skip
    assert running == sorted(SERVER_MANIFESTS), "a new manifest that runs the server needs the API keys Secret"


@pytest.mark.parametrize("build_name", sorted(SERVER_CONTAINERS))
def test_built_servers_read_api_keys_from_the_optional_secret(kubectl: str, build_name: str) -> None:
    """As applied: the base and every overlay, patches included."""
    directory = KUBE_DIR / "base" if build_name == "base" else OVERLAYS_DIR / build_name
    objects = json.loads(json.dumps(_build(kubectl, directory)))
    check_api_keys_from_secret(objects, SERVER_CONTAINERS[build_name])


# --- Prometheus in the cluster ------------------------------------------------------------------------------


def test_scrape_config_is_valid_and_named_for_the_alerts(lib: SimpleNamespace, promtool: str, tmp_path: Path) -> None:
    config = lib.load_yaml(SCRAPE_CONFIG)
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "dgserve", "the alert rules select job=\"dgserve\""
    assert any('job="dgserve"' in rule["expr"] for rule in lib.alert_rules())
    keep = {tuple(r["source_labels"]): r["regex"] for r in job["relabel_configs"] if r.get("action") == "keep"}
    assert keep[("__meta_kubernetes_pod_label_app_kubernetes_io_name",)] == "dgserve"
    assert keep[("__meta_kubernetes_pod_annotation_prometheus_io_scrape",)] == "true"

    result = subprocess.run([promtool, "check", "config", str(SCRAPE_CONFIG)], capture_output=True, text=True,
                            timeout=120, check=False)
    output = result.stdout + result.stderr
    if result.returncode != 0 and "kubernetes_sd_configs not found" in output:
        # Debian's promtool is built without Kubernetes discovery: check everything else, with
        # a static target in place of the discovery.
        job["static_configs"] = [{"targets": ["10.0.0.1:8000"]}]
        del job["kubernetes_sd_configs"]
        config["rule_files"] = [str((SCRAPE_CONFIG.parent / f).resolve()) for f in config["rule_files"]]
        copy = tmp_path / "scrape-config.yml"
        copy.write_text(yaml.safe_dump(config))
        result = lib.run_promtool(promtool, "check", "config", copy)
        output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert f"SUCCESS: {len(lib.rule_files())} rule files found" in output
