#!/usr/bin/env bash
# Fetch, here, the wheels that benchmarks/gpu_check_device.sh installs on a GPU machine that
# has its own torch (with CUDA) but not dgserve's other dependencies, and no package index.
#
#   benchmarks/gpu_wheels.sh                          # cp312 wheels into .whl/ (git-ignored)
#   benchmarks/gpu_wheels.sh --python-version 3.11    # for another interpreter
#   benchmarks/gpu_wheels.sh --dest DIR
#
# torch and torchvision are not fetched: their CUDA builds are gigabytes, and the GPU machine
# has its own (the check prints which). Nor is anything that such a machine's image already
# holds (numpy, pillow, pytest, httpx, prometheus-client, ...). What is fetched is the serving
# stack and the test plugins, each at the version this checkout's .venv has, so the GPU run
# uses what CI tests. The wheels come to about 10 MB.
set -euo pipefail
cd "$(dirname "$0")/.."

PYVER=3.12
DEST=.whl
VENV_PY=${VENV_PY:-.venv/bin/python}
while [[ $# -gt 0 ]]; do
  case "$1" in
    --python-version) PYVER="$2"; shift 2 ;;
    --dest) DEST="$2"; shift 2 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done

# What dgserve, the CUDA tests and the benchmarks import beyond a CUDA PyTorch image. Not PyAV
# (35 MB, past what a lent machine takes with the checkout): only video uploads import it.
NAMES=(
  fastapi starlette pydantic pydantic-core pydantic-settings typing-inspection annotated-types
  annotated-doc python-dotenv opentelemetry-api uvicorn httptools python-multipart
  pycocotools psycopg psycopg-binary psycopg-pool
  pytest-asyncio tritonclient python-rapidjson
)

# The versions this checkout runs (and CI tests), read from its .venv.
declare -A VERSION
while IFS='=' read -r name _ version; do
  VERSION[${name,,}]=$version
done < <("$VENV_PY" -m pip list --format=freeze 2>/dev/null | sed 's/_/-/g')

mkdir -p "$DEST"
rm -f "$DEST"/*.whl
PLATFORMS=()
for n in 17 24 27 28 31 34 35; do PLATFORMS+=(--platform "manylinux_2_${n}_x86_64"); done
PLATFORMS+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for name in "${NAMES[@]}"; do
  version=${VERSION[$name]:-}
  if [[ -z "$version" ]]; then
    echo "$name is not installed in $VENV_PY's environment (make install first)" >&2; exit 1
  fi
  "$VENV_PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    "${PLATFORMS[@]}" -d "$DEST" "$name==$version"
done
echo "$(ls "$DEST"/*.whl | wc -l) wheels for CPython $PYVER in $DEST: $(du -sh "$DEST" | cut -f1)"
