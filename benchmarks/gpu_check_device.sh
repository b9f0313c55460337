#!/usr/bin/env bash
# benchmarks/gpu_check.sh on a GPU machine that has a CUDA PyTorch but no dgserve install and
# no package index (a lent machine that gets only this checkout): installs the wheels that
# benchmarks/gpu_wheels.sh fetched into .whl/, runs the check from the source tree, and packs
# every result into one file.
#
#   benchmarks/gpu_check_device.sh [RESULTS_ARCHIVE]     # default: runs/gpu-check.tgz
#
# Extra arguments after the archive go to gpu_check.sh (e.g. --device cpu for a rehearsal).
# PY picks the interpreter (default: python3, the one that holds the machine's torch), WHEELS
# the wheels' folder (default: .whl).
set -uo pipefail
cd "$(dirname "$0")/.."
ARCHIVE=${1:-runs/gpu-check.tgz}
shift $(($# > 0 ? 1 : 0))
PY=${PY:-python3}
WHEELS=${WHEELS:-.whl}
SITE=$(mktemp -d /tmp/dgserve-site.XXXXXX)
RESULTS=$(mktemp -d /tmp/dgserve-gpu-check.XXXXXX)/gpu-check

if ! compgen -G "$WHEELS/*.whl" >/dev/null; then
  echo "no wheels in $WHEELS: run benchmarks/gpu_wheels.sh first (where pip can reach an index)" >&2; exit 2
fi
# --target keeps the machine's own packages (torch above all) as they are; ours come first on the path.
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl || exit 2
export PYTHONPATH="$SITE:$PWD/app${PYTHONPATH:+:$PYTHONPATH}"
export PY

bash benchmarks/gpu_check.sh --results "$RESULTS" "$@"
rc=$?
mkdir -p "$(dirname "$ARCHIVE")"
tar -C "$(dirname "$RESULTS")" -czf "$ARCHIVE" gpu-check
echo "results: $ARCHIVE ($(du -h "$ARCHIVE" | cut -f1))"
exit $rc
