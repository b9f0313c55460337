#!/usr/bin/env bash
# The container test: build the images, bring up dgserve + Prometheus with the CPU override,
# and check the deployment end to end through the published ports. Slow (the first build
# installs ~3 GB of CUDA-enabled torch), so it is not part of every CI run; see docs/deploy.md.
#
#   scripts/container_test.sh
#
# Needs bash, curl, python3 and either Docker with the compose plugin or podman with
# podman-compose (installed into a throwaway venv when missing). Steps:
#   1. build the dgserve and Prometheus images;
#   2. `compose up` dgserve and prometheus with docker-compose.cpu.yml (grafana too with
#      DGSERVE_TEST_GRAFANA=1; its image is pulled, so it needs a registry);
#   3. wait for dgserve's compose healthcheck (GET /readyz) to pass;
#   4. classify and detect an image through the published port;
#   5. check that Prometheus has the dgserve target up, its alert rules loaded, and
#      returns a dgserve metric through its HTTP API;
#   6. restart the dgserve container and fetch an inspection record written before it;
#   7. bring everything down, volumes included (on any exit; DGSERVE_TEST_KEEP=1 keeps it).
#
# Settings (environment):
#   CONTAINER_ENGINE        docker | podman (default: docker if `docker compose` works, else podman)
#   DGSERVE_BASE_IMAGE      base of the dgserve image (default: localhost/dgserve-base:bookworm when
#                           that image exists, as built by a registry-less sandbox, else the
#                           Dockerfile's python:3.11-slim-bookworm)
#   PROMETHEUS_BASE_IMAGE   base of the Prometheus image (default: the same local base when used,
#                           which gets Debian's prometheus package, else prom/prometheus:v2.55.1)
#   DGSERVE_TEST_STORE      a model store to serve (default: ./model_store if it holds a classifier
#                           and a detector, else a temporary store of small random-weight models)
#   DGSERVE_TEST_PORT       published port of dgserve (default 18000)
#   PROMETHEUS_TEST_PORT    published port of Prometheus (default 19090)
#   DGSERVE_TEST_READY_TIMEOUT  seconds to wait for readiness (default 600)
#   DGSERVE_TEST_NO_BUILD=1 reuse the images already built
#   CONTAINER_BUILD_ARGS    extra flags for both image builds
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

log() { printf '[container-test] %s\n' "$*"; }
die() { printf '[container-test] FAIL: %s\n' "$*" >&2; exit 1; }

for tool in curl python3; do command -v "$tool" >/dev/null || die "$tool is required"; done

# --- the engine and its compose -------------------------------------------------------------
ENGINE=${CONTAINER_ENGINE:-}
if [ -z "$ENGINE" ]; then
  if command -v docker >/dev/null && docker compose version >/dev/null 2>&1; then ENGINE=docker
  elif command -v podman >/dev/null; then ENGINE=podman
  else die "neither docker (with the compose plugin) nor podman is installed"; fi
fi
if [ "$ENGINE" = docker ]; then
  COMPOSE=(docker compose)
  IMAGE_PREFIX=""
else
  if command -v podman-compose >/dev/null; then
    COMPOSE=(podman-compose)
  else
    PC_VENV=${PC_VENV:-/tmp/pc-venv}
    if [ ! -x "$PC_VENV/bin/podman-compose" ]; then
      log "installing podman-compose into $PC_VENV"
      python3 -m venv "$PC_VENV"
      "$PC_VENV/bin/pip" install -q podman-compose
    fi
    COMPOSE=("$PC_VENV/bin/podman-compose")
  fi
  IMAGE_PREFIX="localhost/"
fi
log "engine: $ENGINE ($("$ENGINE" --version | head -1)); compose: ${COMPOSE[*]}"

# --- settings ---------------------------------------------------------------------------------
LOCAL_BASE=localhost/dgserve-base:bookworm
if [ -z "${DGSERVE_BASE_IMAGE:-}" ] && "$ENGINE" image inspect "$LOCAL_BASE" >/dev/null 2>&1; then
  DGSERVE_BASE_IMAGE=$LOCAL_BASE
  PROMETHEUS_BASE_IMAGE=${PROMETHEUS_BASE_IMAGE:-$LOCAL_BASE}
fi
DGSERVE_BASE_IMAGE=${DGSERVE_BASE_IMAGE:-python:3.11-slim-bookworm}
PROMETHEUS_BASE_IMAGE=${PROMETHEUS_BASE_IMAGE:-prom/prometheus:v2.55.1}
PROJECT=dgserve-ctest-$$
DGSERVE_PORT_PUBLISHED=${DGSERVE_TEST_PORT:-18000}
PROMETHEUS_PORT_PUBLISHED=${PROMETHEUS_TEST_PORT:-19090}
READY_TIMEOUT=${DGSERVE_TEST_READY_TIMEOUT:-600}
API=http://127.0.0.1:$DGSERVE_PORT_PUBLISHED
PROM=http://127.0.0.1:$PROMETHEUS_PORT_PUBLISHED
WORK=$(mktemp -d /tmp/dgserve-ctest.XXXXXX)
chmod 755 "$WORK"

# What compose reads (docker-compose.yml documents each one).
export DGSERVE_IMAGE=${IMAGE_PREFIX}dgserve:container-test
export PROMETHEUS_IMAGE=${IMAGE_PREFIX}dgserve-prometheus:container-test
export DGSERVE_BASE_IMAGE PROMETHEUS_BASE_IMAGE
export DGSERVE_BIND_ADDRESS=127.0.0.1 DGSERVE_PUBLISH_PORT=$DGSERVE_PORT_PUBLISHED
export PROMETHEUS_BIND_ADDRESS=127.0.0.1 PROMETHEUS_PORT=$PROMETHEUS_PORT_PUBLISHED
export DGSERVE_HEALTHCHECK_INTERVAL=5s DGSERVE_MODELS=""
export GRAFANA_BIND_ADDRESS=127.0.0.1 GRAFANA_PORT=${GRAFANA_TEST_PORT:-13000}
COMPOSE_FILES=(-f docker-compose.yml -f docker-compose.cpu.yml)
SERVICES=(dgserve prometheus)
[ "${DGSERVE_TEST_GRAFANA:-0}" = 1 ] && SERVICES+=(grafana)

compose() { "${COMPOSE[@]}" -p "$PROJECT" "${COMPOSE_FILES[@]}" "$@"; }
container_of() {
  "$ENGINE" ps -aq --filter "label=com.docker.compose.project=$PROJECT" \
    --filter "label=com.docker.compose.service=$1" | head -1
}

STACK_UP=0
cleanup() {
  local rc=$?
  set +e
  if [ "$STACK_UP" = 1 ]; then
    if [ "$rc" != 0 ]; then
      log "dgserve logs (last 80 lines):"
      cid=$(container_of dgserve); [ -n "$cid" ] && "$ENGINE" logs --tail 80 "$cid" 2>&1 | sed 's/^/    /'
      cid=$(container_of prometheus); [ -n "$cid" ] && { log "prometheus logs (last 20 lines):"; "$ENGINE" logs --tail 20 "$cid" 2>&1 | sed 's/^/    /'; }
    fi
    if [ "${DGSERVE_TEST_KEEP:-0}" = 1 ]; then
      log "kept: project $PROJECT (bring it down with: ${COMPOSE[*]} -p $PROJECT ${COMPOSE_FILES[*]} down -v)"
    else
      log "7. bringing the stack down"
      compose down -v >"$WORK/down.log" 2>&1 || { log "compose down failed:"; cat "$WORK/down.log"; }
    fi
  fi
  rm -rf "$WORK"
  if [ "$rc" = 0 ]; then log "PASSED"; else log "FAILED (exit $rc)"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- 1. build -----------------------------------------------------------------------------------
# Where no registry is reachable (a sandbox with a local base image), pip inside the build
# needs the CA bundle and the local wheel mirror, handed over the way container-env prints.
build_flags=()
if [ "$ENGINE" = podman ]; then
  build_flags+=(--format docker --network host)   # docker format keeps HEALTHCHECK
  cert=${PIP_CERT:-}
  if [ -n "$cert" ] && [ -f "$cert" ]; then build_flags+=(-v "$cert:$cert:ro" --env "PIP_CERT=$cert"); fi
  if [ -d /opt/pypi-more/files ]; then
    build_flags+=(-v /opt/pypi-more:/opt/pypi-more:ro --env PIP_FIND_LINKS=/opt/pypi-more/files)
  fi
fi
# shellcheck disable=SC2206
build_flags+=(${CONTAINER_BUILD_ARGS:-})

build() { # name, tag, context, base
  local name=$1 tag=$2 context=$3 base=$4 flags=("${build_flags[@]}")
  if [ "$ENGINE" = podman ]; then flags+=(--from "$base"); fi
  log "1. building $tag on $base (log: $WORK/build-$name.log)"
  local start=$SECONDS
  if ! "$ENGINE" build "${flags[@]}" --build-arg "BASE_IMAGE=$base" -t "$tag" "$context" >"$WORK/build-$name.log" 2>&1; then
    tail -40 "$WORK/build-$name.log"; die "building $tag failed"
  fi
  log "   built $tag in $((SECONDS - start)) s"
}
if [ "${DGSERVE_TEST_NO_BUILD:-0}" = 1 ]; then
  for image in "$DGSERVE_IMAGE" "$PROMETHEUS_IMAGE"; do
    "$ENGINE" image inspect "$image" >/dev/null 2>&1 || die "DGSERVE_TEST_NO_BUILD=1 but $image is missing"
  done
  log "1. reusing $DGSERVE_IMAGE and $PROMETHEUS_IMAGE"
else
  build dgserve "$DGSERVE_IMAGE" . "$DGSERVE_BASE_IMAGE"
  build prometheus "$PROMETHEUS_IMAGE" docker/prometheus "$PROMETHEUS_BASE_IMAGE"
fi
[ "$("$ENGINE" image inspect -f '{{.Config.User}}' "$DGSERVE_IMAGE")" = "dgserve:dgserve" ] || die "the image must run as dgserve"

# --- the model store ------------------------------------------------------------------------------
models_in() { # store dir -> "classifier detector" (the first of each task), or nothing
  python3 - "$1" <<'PY'
import json, pathlib, sys
found = {}
for manifest in sorted(pathlib.Path(sys.argv[1]).glob("*/*/manifest.json")):
    m = json.loads(manifest.read_text())
    found.setdefault(m.get("task"), m.get("name"))
if "classification" in found and "detection" in found:
    print(found["classification"], found["detection"])
PY
}
if [ -n "${DGSERVE_TEST_STORE:-}" ]; then
  STORE=$(cd "$DGSERVE_TEST_STORE" && pwd)
elif [ -n "$(models_in model_store 2>/dev/null)" ]; then
  STORE=$ROOT/model_store
else
  STORE=$WORK/store
  mkdir -p "$STORE"
  log "model_store/ has no classifier and detector yet: writing random-weight models to a temporary store"
  run_as=(--user 0:0)
  [ "$ENGINE" = docker ] && run_as=(--user "$(id -u):$(id -g)")
  "$ENGINE" run --rm -i "${run_as[@]}" --network none -e HOME=/tmp -v "$STORE:/store" \
    --entrypoint python "$DGSERVE_IMAGE" - /store >"$WORK/store.log" 2>&1 <<'PY' || { cat "$WORK/store.log"; die "could not write the test store"; }
import sys
import torch
from dgserve.models import create_model
from dgserve.model_store import ModelStore

torch.manual_seed(0)
store = ModelStore(sys.argv[1])
pre = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "interpolation": "bilinear"}
kw = {"num_classes": 3}
store.save(create_model("dgnet_resnet18", **kw), name="ctest-classifier", architecture="dgnet_resnet18",
           arch_kwargs=kw, labels=["red", "green", "blue"], preprocessing={**pre, "input_size": [64, 64]},
           description="random weights (container test)")
kw = {"num_classes": 3, "min_size": 128, "max_size": 160, "frozen_bn": False}
store.save(create_model("fasterrcnn_dgnet_resnet50_fpn", **kw), name="ctest-detector",
           architecture="fasterrcnn_dgnet_resnet50_fpn", arch_kwargs=kw, labels=["square", "circle"],
           preprocessing={**pre, "input_size": [128, 160], "resize": "letterbox"},
           thresholds={"score_threshold": 0.0}, description="random weights (container test)")
print("written")
PY
fi
chmod -R a+rX "$STORE" 2>/dev/null || true
read -r CLASSIFIER DETECTOR <<<"$(models_in "$STORE")" || true
[ -n "${CLASSIFIER:-}" ] && [ -n "${DETECTOR:-}" ] || die "$STORE has no classification and detection model"
export DGSERVE_STORE_DIR=$STORE
log "store: $STORE (classifier $CLASSIFIER, detector $DETECTOR)"

# --- 2. up ---------------------------------------------------------------------------------------------
compose config >"$WORK/config.yml" 2>"$WORK/config.err" || { cat "$WORK/config.err"; die "compose config failed"; }
python3 - "$WORK/config.yml" <<'PY' || die "the CPU override left a GPU reservation in the merged config"
import sys
text = open(sys.argv[1]).read()
sys.exit(1 if "nvidia" in text or "capabilities" in text else 0)
PY
log "2. compose up (${SERVICES[*]}) with the CPU override, project $PROJECT"
STACK_UP=1
compose up -d --no-build "${SERVICES[@]}" >"$WORK/up.log" 2>&1 || { cat "$WORK/up.log"; die "compose up failed"; }
DG=$(container_of dgserve)
[ -n "$DG" ] || { cat "$WORK/up.log"; die "no dgserve container"; }

# --- 3. healthy ----------------------------------------------------------------------------------------
wait_healthy() { # container, timeout
  local cid=$1 deadline=$((SECONDS + $2)) state
  while [ $SECONDS -lt $deadline ]; do
    state=$("$ENGINE" inspect -f '{{.State.Status}}' "$cid")
    [ "$state" = running ] || die "container $cid is $state"
    if [ "$ENGINE" = podman ]; then
      # podman runs healthchecks from systemd timers; with no systemd, run the check itself
      "$ENGINE" healthcheck run "$cid" >/dev/null 2>&1 && return 0
    else
      [ "$("$ENGINE" inspect -f '{{.State.Health.Status}}' "$cid")" = healthy ] && return 0
    fi
    sleep 3
  done
  die "container $cid not healthy after $2 s"
}
start=$SECONDS
wait_healthy "$DG" "$READY_TIMEOUT"
log "3. dgserve healthy after $((SECONDS - start)) s: $(curl -fsS "$API/readyz")"
uid=$("$ENGINE" exec "$DG" id -u)
[ "$uid" != 0 ] || die "dgserve runs as root"
log "   runs as uid $uid; devices: $("$ENGINE" exec "$DG" printenv DGSERVE_DEVICES)"
migrate=$("$ENGINE" exec "$DG" cat /proc/sys/net/ipv4/tcp_migrate_req)
[ "$migrate" = 1 ] || die "the CPU override's sysctl did not reach the container (tcp_migrate_req=$migrate)"
log "   net.ipv4.tcp_migrate_req=$migrate in the container (the host's: $(cat /proc/sys/net/ipv4/tcp_migrate_req 2>/dev/null || echo none))"

# --- 4. classify and detect --------------------------------------------------------------------------
python3 - "$WORK/image.png" <<'PY'
import struct, sys, zlib
w, h = 96, 80
rows = b"".join(
    b"\x00" + bytes(c for x in range(w) for c in (x * 255 // w, y * 255 // h, 200 if (x // 16 + y // 16) % 2 else 30))
    for y in range(h)
)
chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
open(sys.argv[1], "wb").write(png + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
PY
json_get() { # file, python expression over `d`
  python3 -c 'import json, sys; d = json.load(open(sys.argv[1])); print(eval(sys.argv[2]))' "$1" "$2"
}
post() { # route, output file
  local code
  code=$(curl -sS -o "$2" -w '%{http_code}' -F "images=@$WORK/image.png;type=image/png" "$API$1")
  [ "$code" = 200 ] || { cat "$2"; echo; die "POST $1 answered $code"; }
}
post "/v1/models/$CLASSIFIER/classify" "$WORK/classify.json"
[ "$(json_get "$WORK/classify.json" 'd["task"]')" = classification ] || die "classify: wrong task"
INSPECTION=$(json_get "$WORK/classify.json" 'd["results"][0]["id"]')
log "4. classify $CLASSIFIER: $(json_get "$WORK/classify.json" '[(p["label"], round(p["score"], 3)) for p in d["results"][0]["predictions"]]'), inspection $INSPECTION"
log "   stages: $(json_get "$WORK/classify.json" '[(s["stage"], s["open_edges"], s["possible_edges"]) for s in d["results"][0]["connectivity"]["stages"]]')"
post "/v1/models/$DETECTOR/detect" "$WORK/detect.json"
[ "$(json_get "$WORK/detect.json" 'd["task"]')" = detection ] || die "detect: wrong task"
log "   detect $DETECTOR: $(json_get "$WORK/detect.json" 'len(d["results"][0]["predictions"])') boxes, first $(json_get "$WORK/detect.json" '(d["results"][0]["predictions"] or [None])[0]')"

# --- 5. Prometheus -----------------------------------------------------------------------------------------
prom_get() { curl -fsS -G "$PROM$1" "${@:2}"; }
deadline=$((SECONDS + 180))
until prom_get /api/v1/targets -o "$WORK/targets.json" 2>/dev/null \
    && [ "$(json_get "$WORK/targets.json" '[t["health"] for t in d["data"]["activeTargets"] if t["labels"]["job"] == "dgserve"]')" = "['up']" ]; do
  [ $SECONDS -lt $deadline ] || { cat "$WORK/targets.json" 2>/dev/null; die "Prometheus never saw the dgserve target up"; }
  sleep 2
done
log "5. Prometheus: target dgserve up ($(json_get "$WORK/targets.json" '[t["scrapeUrl"] for t in d["data"]["activeTargets"] if t["labels"]["job"] == "dgserve"][0]'))"
query='sum by (model, endpoint, status) (dgserve_requests_total{endpoint=~"/v1/models/.+"})'
deadline=$((SECONDS + 60))
until prom_get /api/v1/query --data-urlencode "query=$query" -o "$WORK/query.json" \
    && [ "$(json_get "$WORK/query.json" 'len(d["data"]["result"])')" -ge 2 ]; do
  [ $SECONDS -lt $deadline ] || { cat "$WORK/query.json"; die "Prometheus has no dgserve_requests_total for the two requests"; }
  sleep 2
done
log "   query $query -> $(json_get "$WORK/query.json" '[(r["metric"]["model"], r["metric"]["status"], r["value"][1]) for r in d["data"]["result"]]')"
prom_get /api/v1/query --data-urlencode 'query=min(dgserve_model_ready)' -o "$WORK/ready.json"
[ "$(json_get "$WORK/ready.json" 'd["data"]["result"][0]["value"][1]')" = 1 ] || die "dgserve_model_ready is not 1 everywhere"
prom_get /api/v1/rules -o "$WORK/rules.json"
log "   alert rules loaded: $(json_get "$WORK/rules.json" 'sorted(r["name"] for g in d["data"]["groups"] for r in g["rules"])')"
[ "$(json_get "$WORK/rules.json" 'sum(len(g["rules"]) for g in d["data"]["groups"])')" -ge 1 ] || die "no alert rules loaded"
python3 - "$PROM" docker/grafana/dashboards/*.json <<'PY' || die "a dashboard query fails on the live Prometheus"
# Every dashboard query, variables filled in as Grafana would, must run on the live server.
import json, re, sys, urllib.parse, urllib.request
prom, files = sys.argv[1], sys.argv[2:]
var = re.compile(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)")
intervals = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h"}
def panels(ps):
    for p in ps:
        yield p
        yield from panels(p.get("panels", []))
total = with_data = 0
for f in files:
    for p in panels(json.load(open(f))["panels"]):
        for t in p.get("targets", []):
            expr = var.sub(lambda m: intervals.get(next(g for g in m.groups() if g), ".*"), t["expr"])
            url = prom + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
            try:
                d = json.load(urllib.request.urlopen(url, timeout=10))
            except Exception as exc:
                sys.exit(f"{p['title']!r} {t['refId']}: {exc}: {expr}")
            total += 1
            with_data += bool(d["data"]["result"])
print(f"[container-test]    dashboard: {total} queries ran on Prometheus, {with_data} returned data")
PY
prom_get /api/v1/alerts -o "$WORK/alerts.json"
log "   alerts firing or pending: $(json_get "$WORK/alerts.json" '[(a["labels"]["alertname"], a["state"]) for a in d["data"]["alerts"]]')"

# --- 6. restart: the inspection record survives -------------------------------------------------------------
# Records are written in batches off the request path: wait until this one is stored.
deadline=$((SECONDS + 30))
until curl -fsS -o /dev/null "$API/v1/inspections/$INSPECTION"; do
  [ $SECONDS -lt $deadline ] || die "inspection $INSPECTION never became readable"
  sleep 1
done
data_volume=$("$ENGINE" inspect -f '{{range .Mounts}}{{if eq .Destination "/data"}}{{.Name}}{{end}}{{end}}' "$DG")
log "6. restarting dgserve (inspections on volume ${data_volume:-?})"
restart_start=$SECONDS
"$ENGINE" restart -t 40 "$DG" >"$WORK/restart.log" 2>&1 || { cat "$WORK/restart.log"; die "restart failed"; }
log "   stopped and started in $((SECONDS - restart_start)) s"
start=$SECONDS
wait_healthy "$DG" "$READY_TIMEOUT"
log "   healthy again after $((SECONDS - start)) s"
code=$(curl -sS -o "$WORK/inspection.json" -w '%{http_code}' "$API/v1/inspections/$INSPECTION")
[ "$code" = 200 ] || { cat "$WORK/inspection.json"; die "GET /v1/inspections/$INSPECTION after the restart answered $code"; }
[ "$(json_get "$WORK/inspection.json" 'd["id"]')" = "$INSPECTION" ] || die "wrong inspection record"
log "   inspection $INSPECTION still served: model $(json_get "$WORK/inspection.json" 'd["model"]') v$(json_get "$WORK/inspection.json" 'd["version"]'), created $(json_get "$WORK/inspection.json" 'd["created_at"]')"
