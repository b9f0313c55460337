#!/usr/bin/env bash
# The Kubernetes pod test: the CPU overlay of deploy/kubernetes/, rendered by kustomize, run as
# a pod with `podman kube play`, and used through its published port. Slow (it builds the
# image: minutes the first time), so it is not part of `make test`; `make kube-test` runs it.
# Run it after changing deploy/kubernetes/, the Dockerfile, or the server's start-up.
#
#   scripts/kube_play_test.sh
#
# Steps:
#   1. build the dgserve image with podman (as scripts/container_test.sh does);
#   2. render deploy/kubernetes/overlays/cpu with `kubectl kustomize`;
#   3. adapt what `podman kube play` cannot do (printed as it goes):
#        - it has no Services: the Service is dropped, and the container's ports get a hostPort
#          on 127.0.0.1 instead (the test's way in, in place of a ClusterIP);
#        - the image becomes the one just built, and the Deployment a name of this run's own;
#      podman 4.3 applies the securityContext (user, read-only root, capabilities, no new
#      privileges), the memory limit, the ConfigMap and the emptyDirs, and turns the liveness
#      probe into a healthcheck; it ignores the readiness and startup probes (step 4 polls
#      /readyz itself), the preStop hook, terminationGracePeriodSeconds (it stops after 10 s),
#      fsGroup and the topology spread;
#   4. play it, and wait until GET /readyz answers 200;
#   5. check the pod as the manifests ask: the liveness healthcheck passes, uid 10001, a
#      read-only root filesystem, writable /tmp and /data emptyDirs, the settings from the
#      ConfigMap (DGSERVE_DEVICES=cpu, no DGSERVE_INSPECTION_URL);
#   6. classify an image (a heart drawn by dgserve.data.scenes) through the published port,
#      read its inspection record back (SQLite on the /data emptyDir), and find it in /metrics;
#   7. tear everything down (`podman kube down`, volumes too), on any exit.
#
# Needs bash, curl, kubectl (with its bundled kustomize), podman, and the repo's .venv (the
# `make kube-test` target installs it). Settings (environment):
#   KUBE_TEST_IMAGE          tag to build and run (default localhost/dgserve:kube-test)
#   KUBE_TEST_PORT           host port of the API on 127.0.0.1 (default 18080; gRPC on the next one)
#   KUBE_TEST_READY_TIMEOUT  seconds to wait for /readyz (default 600)
#   KUBE_TEST_NO_BUILD=1     reuse KUBE_TEST_IMAGE as it is
#   KUBE_TEST_KEEP=1         leave the pod running (prints how to remove it)
#   DGSERVE_BASE_IMAGE       base of the build (default: localhost/dgserve-base:bookworm when it
#                            exists, as ../shared/tools/container-env builds it, else the Dockerfile's)
#   CONTAINER_BUILD_ARGS     extra flags for the build
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

log() { printf '[kube-test] %s\n' "$*"; }
die() { printf '[kube-test] FAIL: %s\n' "$*" >&2; exit 1; }

for tool in curl kubectl podman; do command -v "$tool" >/dev/null || die "$tool is required"; done
PY=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || die "$PY is missing: run make install (or make kube-test)"
"$PY" -c "import yaml, dgserve" 2>/dev/null || die "$PY cannot import yaml and dgserve: run make install"

IMAGE=${KUBE_TEST_IMAGE:-localhost/dgserve:kube-test}
PORT=${KUBE_TEST_PORT:-18080}
GRPC_HOST_PORT=$((PORT + 1))
READY_TIMEOUT=${KUBE_TEST_READY_TIMEOUT:-600}
API=http://127.0.0.1:$PORT
NAME=dgserve-kubetest-$$
WORK=$(mktemp -d /tmp/dgserve-kubetest.XXXXXX)
LOCAL_BASE=localhost/dgserve-base:bookworm
if [ -z "${DGSERVE_BASE_IMAGE:-}" ] && podman image exists "$LOCAL_BASE"; then DGSERVE_BASE_IMAGE=$LOCAL_BASE; fi
DGSERVE_BASE_IMAGE=${DGSERVE_BASE_IMAGE:-python:3.11-slim-bookworm}
log "podman $(podman --version | awk '{print $3}'), $(kubectl version --client 2>/dev/null | tr '\n' ' ')"

PLAYED=0 POD="" CONTAINER="" VOLUMES=""
cleanup() {
  local rc=$?
  set +e
  if [ "$PLAYED" = 1 ]; then
    if [ "$rc" != 0 ] && [ -n "$CONTAINER" ]; then
      log "container logs (last 60 lines):"
      podman logs --tail 60 "$CONTAINER" 2>&1 | sed 's/^/    /'
    fi
    if [ "${KUBE_TEST_KEEP:-0}" = 1 ]; then
      log "kept: pod $POD (remove it with: podman kube down $WORK/pod.yaml; the file is kept too)"
      trap - EXIT
      exit "$rc"
    fi
    log "7. podman kube down"
    start=$SECONDS
    podman kube down "$WORK/pod.yaml" >"$WORK/down.log" 2>&1 || { log "kube down failed:"; cat "$WORK/down.log"; }
    log "   down in $((SECONDS - start)) s"
    for volume in $VOLUMES; do podman volume rm -f "$volume" >/dev/null 2>&1; done
  fi
  rm -rf "$WORK"
  if [ "$rc" = 0 ]; then log "PASSED"; else log "FAILED (exit $rc)"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- 1. build --------------------------------------------------------------------------------------
if [ "${KUBE_TEST_NO_BUILD:-0}" = 1 ]; then
  podman image exists "$IMAGE" || die "KUBE_TEST_NO_BUILD=1 but $IMAGE is missing"
  log "1. reusing $IMAGE"
else
  # Where no registry is reachable (a sandbox with a local base image), pip inside the build
  # needs the CA bundle and the local wheel mirror, as ../shared/tools/container-env prints.
  flags=(--format docker --network host --from "$DGSERVE_BASE_IMAGE" --build-arg "BASE_IMAGE=$DGSERVE_BASE_IMAGE")
  cert=${PIP_CERT:-}
  if [ -n "$cert" ] && [ -f "$cert" ]; then flags+=(-v "$cert:$cert:ro" --env "PIP_CERT=$cert"); fi
  if [ -d /opt/pypi-more/files ]; then flags+=(-v /opt/pypi-more:/opt/pypi-more:ro --env PIP_FIND_LINKS=/opt/pypi-more/files); fi
  # shellcheck disable=SC2206
  flags+=(${CONTAINER_BUILD_ARGS:-})
  log "1. building $IMAGE on $DGSERVE_BASE_IMAGE"
  start=$SECONDS
  podman build "${flags[@]}" -t "$IMAGE" . >"$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log"; die "the build failed"; }
  log "   built in $((SECONDS - start)) s"
fi

# --- 2. render ---------------------------------------------------------------------------------------
kubectl kustomize deploy/kubernetes/overlays/cpu >"$WORK/rendered.yaml"
log "2. rendered overlays/cpu: $(grep -c '^kind:' "$WORK/rendered.yaml") objects ($(grep '^kind:' "$WORK/rendered.yaml" | awk '{print $2}' | sort | tr '\n' ' '))"

# --- 3. adapt for podman kube play ----------------------------------------------------------------------
"$PY" - "$WORK/rendered.yaml" "$WORK/pod.yaml" "$IMAGE" "$NAME" "$PORT" "$GRPC_HOST_PORT" <<'PY'
import sys, yaml
src, dst, image, name, port, grpc_port = sys.argv[1:]
kept = []
for obj in yaml.safe_load_all(open(src)):
    if not obj:
        continue
    kind = obj["kind"]
    if kind == "Service":
        print(f"[kube-test]    dropped Service/{obj['metadata']['name']}: podman has none; hostPorts on 127.0.0.1 instead")
        continue
    if kind not in ("Deployment", "ConfigMap"):
        sys.exit(f"[kube-test] the cpu overlay now has a {kind}: decide how this test treats it")
    if kind == "Deployment":
        print(f"[kube-test]    Deployment/{obj['metadata']['name']} -> {name}, image {image}")
        obj["metadata"]["name"] = name
        (c,) = obj["spec"]["template"]["spec"]["containers"]
        c["image"] = image
        for p in c["ports"]:
            p["hostIP"] = "127.0.0.1"
            p["hostPort"] = int(port) if p["name"] == "http" else int(grpc_port)
            print(f"[kube-test]    port {p['name']} {p['containerPort']} -> 127.0.0.1:{p['hostPort']}")
    kept.append(obj)
yaml.safe_dump_all(kept, open(dst, "w"), sort_keys=False)
PY
log "3. adapted for podman kube play ($WORK/pod.yaml)"

# --- 4. play and wait for readiness ----------------------------------------------------------------------
log "4. podman kube play"
PLAYED=1
podman kube play "$WORK/pod.yaml" >"$WORK/play.log" 2>&1 || { cat "$WORK/play.log"; die "podman kube play failed"; }
sed 's/^/    /' "$WORK/play.log"
POD=$(podman pod ps --filter "name=^$NAME" --format '{{.Name}}' | head -1)
[ -n "$POD" ] || die "podman kube play made no pod named $NAME*"
CONTAINER=$(podman ps -a --filter "pod=$POD" --format '{{.Names}}' | grep -v -- '-infra$' | head -1)
[ -n "$CONTAINER" ] || die "no container in pod $POD"
VOLUMES=$(podman inspect -f '{{range .Mounts}}{{if eq .Type "volume"}}{{.Name}} {{end}}{{end}}' "$CONTAINER")
log "   pod $POD, container $CONTAINER, volumes: ${VOLUMES:-none}"
start=$SECONDS
deadline=$((SECONDS + READY_TIMEOUT))
until [ "$(curl -s -o "$WORK/readyz.json" -w '%{http_code}' "$API/readyz" 2>/dev/null)" = 200 ]; do
  state=$(podman inspect -f '{{.State.Status}}' "$CONTAINER")
  [ "$state" = running ] || die "container $CONTAINER is $state"
  [ $SECONDS -lt $deadline ] || { cat "$WORK/readyz.json" 2>/dev/null; die "/readyz not 200 after $READY_TIMEOUT s"; }
  sleep 2
done
log "   ready after $((SECONDS - start)) s: $(cat "$WORK/readyz.json")"

# --- 5. the pod as the manifests ask --------------------------------------------------------------------
uid=$(podman exec "$CONTAINER" id -u)
[ "$uid" = 10001 ] || die "runs as uid $uid, not 10001"
if podman exec "$CONTAINER" sh -c 'touch /opt/dgserve/probe' 2>/dev/null; then die "the root filesystem is writable"; fi
podman exec "$CONTAINER" sh -c 'touch /tmp/probe /data/probe && rm /tmp/probe /data/probe' || die "/tmp or /data is not writable"
# podman turns the liveness probe into a healthcheck; with no systemd to time it, run it once
podman healthcheck run "$CONTAINER" >/dev/null || die "the liveness probe (podman healthcheck) fails"
devices=$(podman exec "$CONTAINER" printenv DGSERVE_DEVICES)
[ "$devices" = cpu ] || die "DGSERVE_DEVICES is '$devices', not cpu (the ConfigMap)"
if podman exec "$CONTAINER" printenv DGSERVE_INSPECTION_URL >/dev/null 2>&1; then die "the cpu overlay must not set DGSERVE_INSPECTION_URL"; fi
log "5. liveness healthcheck passes; uid $uid; root filesystem read-only; /tmp and /data writable; DGSERVE_DEVICES=$devices; host $(podman exec "$CONTAINER" printenv DGSERVE_HOST); data dir $(podman exec "$CONTAINER" ls /data | tr '\n' ' ')"

# --- 6. classify, read the record back, metrics -----------------------------------------------------------
"$PY" -c "from dgserve.data.scenes import render_classification as r; r(7, 3, 64)[0].save('$WORK/x.png')"
code=$(curl -sS -o "$WORK/classify.json" -w '%{http_code}' -F "images=@$WORK/x.png" "$API/v1/models/shapes-dgnet/classify")
[ "$code" = 200 ] || { cat "$WORK/classify.json"; echo; die "classify answered $code"; }
log "6. classify: HTTP $code, first line: $(head -1 "$WORK/classify.json" | cut -c1-300)"
json_get() { "$PY" -c 'import json, sys; d = json.load(open(sys.argv[1])); print(eval(sys.argv[2]))' "$1" "$2"; }
label=$(json_get "$WORK/classify.json" 'd["results"][0]["predictions"][0]["label"]')
log "   top-1: $label ($(json_get "$WORK/classify.json" 'round(d["results"][0]["predictions"][0]["score"], 4)')); stages: $(json_get "$WORK/classify.json" '[(s["stage"], s["open_edges"], s["possible_edges"]) for s in d["results"][0]["connectivity"]["stages"]]')"
[ "$label" = heart ] || die "the heart was classified as $label"
id=$(json_get "$WORK/classify.json" 'd["results"][0]["id"]')
deadline=$((SECONDS + 30))
until curl -fsS -o "$WORK/inspection.json" "$API/v1/inspections/$id" 2>/dev/null; do
  [ $SECONDS -lt $deadline ] || die "inspection $id never became readable"
  sleep 1
done
log "   inspection $id read back: model $(json_get "$WORK/inspection.json" 'd["model"]') v$(json_get "$WORK/inspection.json" 'd["version"]')"
curl -fsS "$API/metrics" >"$WORK/metrics.txt"
grep -q '^dgserve_requests_total{.*model="shapes-dgnet".*status="200"' "$WORK/metrics.txt" || die "/metrics has no request of shapes-dgnet"
log "   /metrics: $(grep -c '^dgserve_' "$WORK/metrics.txt") dgserve samples, $(grep '^dgserve_requests_total{.*model="shapes-dgnet"' "$WORK/metrics.txt" | head -1)"
