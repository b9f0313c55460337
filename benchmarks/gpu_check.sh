#!/usr/bin/env bash
# Everything GPU-specific in one run (issue 14, target 4): under 8 minutes on one GPU.
#
#   benchmarks/gpu_check.sh                    # on the GPU (cuda), full sizes
#   benchmarks/gpu_check.sh --device cpu       # the same steps on the CPU, small sizes (a smoke run)
#   benchmarks/gpu_check.sh --results DIR      # where the log and JSON figures go
#                                              # (default: runs/gpu-check-<device>-<UTC time>)
#
# Steps, each with its own time limit; a failed step is reported and the next one runs:
#   1. the CUDA tests (tests/serving/test_cuda.py and every other test that skips without
#      CUDA: NVJPEG decoding, reduced precision); on the CPU they skip, and the log says so;
#   2. raw against server throughput, DG-Net ResNet-50 at 224 px, fp32 then bf16 then fp16
#      autocast (DGSERVE_PRECISION; fp16 on CUDA only), all with channels_last convolutions
#      (DGSERVE_MEMORY_FORMAT's default), then fp32 once more with NCHW ones (contiguous);
#   3. JPEG decoding: nvJPEG (torchvision decode_jpeg on the GPU, batched) against PIL and
#      torchvision on the CPU, same-run ratios;
#   4. DG-Net's own cost: skipping against all-edges-open and against the masked mode
#      (benchmarks/dgnet_cost.py).
# Everything printed goes to $RESULTS/gpu_check.log too, each benchmark's figures to a JSON
# file beside it, and $RESULTS/summary.txt lists each step's exit status and duration.
# PY is the interpreter (default .venv/bin/python). On a machine with a CUDA torch but no
# dgserve install, benchmarks/gpu_check_device.sh installs what is missing and runs this.
# A GPU that torch cannot use stops the check (exit 2) instead of passing as a CPU run, and
# --device cpu hides any GPU (CUDA_VISIBLE_DEVICES=""), so that the CUDA tests skip.
set -uo pipefail

cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEVICE=""
RESULTS=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --results) RESULTS="$2"; shift 2 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
if ! CUDA_SEEN=$("$PY" -c 'import torch; print("yes" if torch.cuda.is_available() else "no")'); then
  echo "$PY cannot import torch: give PY an interpreter with torch (benchmarks/gpu_check_device.sh does)" >&2
  exit 2
fi
GPU_LISTED=no
command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q '^GPU' && GPU_LISTED=yes
ASKED=$DEVICE
if [[ -z "$DEVICE" ]]; then
  DEVICE=$([[ "$CUDA_SEEN" == yes ]] && echo cuda || echo cpu)
fi
if [[ "$DEVICE" != cpu && "$DEVICE" != cuda ]]; then
  echo "--device must be cpu or cuda, not $DEVICE" >&2; exit 2
fi
# A GPU that torch cannot use (a CPU-only build, a driver mismatch) must not pass as a CPU run.
if [[ "$DEVICE" == cuda || ( "$GPU_LISTED" == yes && -z "$ASKED" ) ]] && [[ "$CUDA_SEEN" != yes ]]; then
  echo "nvidia-smi lists a GPU (or --device cuda was asked) but torch $("$PY" -c 'import torch; print(torch.__version__)') cannot use it" >&2
  exit 2
fi
if [[ "$DEVICE" == cpu ]]; then
  export CUDA_VISIBLE_DEVICES=""  # a CPU run on a GPU machine: the CUDA tests skip, as the log will say
fi
RESULTS=${RESULTS:-runs/gpu-check-$DEVICE-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$RESULTS"
exec > >(tee -a "$RESULTS/gpu_check.log") 2>&1
TEE_PID=$!
: > "$RESULTS/summary.txt"

if [[ "$DEVICE" == cuda ]]; then
  # Full sizes: the whole script stays under 8 minutes on one H100/H200-class GPU.
  SERVE=(--create dgnet_resnet50 --image-size 224 --batch-size 32 --clients 32 --requests 512 --rounds 3)
  PRECISIONS=(fp32 bf16 fp16)
  JPEG=(--batch 32 --passes 3 --rounds 5)
  COST=(--models shapes-dgnet,dgnet_resnet50 --batch-sizes 1,8 --rounds 5)
  LAYOUT=(--rounds 1)  # fp32 again with NCHW convolutions: one round, against step 2's fp32 figures
  # Each step's limit (seconds); together 480 s, so the script ends within 8 minutes whatever happens.
  # The one-round layout step pays the same start-up (imports, CUDA, the model's store and load)
  # as a three-round one, hence 70 s. (The CPU rehearsal took 9 s for the tests, 4 s for the
  # JPEG step at its small sizes: docs/performance.md.)
  LIMIT_TESTS=75 LIMIT_SERVE=75 LIMIT_LAYOUT=70 LIMIT_JPEG=30 LIMIT_COST=80
else
  # A smoke run: every step runs through, at sizes a 2-core machine finishes in minutes.
  SERVE=(--create dgnet_resnet50 --image-size 64 --batch-size 4 --clients 4 --requests 16 --rounds 1)
  PRECISIONS=(fp32 bf16)
  JPEG=(--batch 8 --passes 2 --rounds 3)
  COST=(--models shapes-dgnet --batch-sizes 1 --rounds 2 --min-time 0.1 --close 0.5)
  LAYOUT=()
  LIMIT_TESTS=180 LIMIT_SERVE=150 LIMIT_LAYOUT=150 LIMIT_JPEG=90 LIMIT_COST=150
fi

STARTED=$SECONDS
FAILED=0
step() {  # step NAME LIMIT_S COMMAND...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo
  echo "=== $name ($(date -u +%H:%M:%S) UTC, limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  local took=$((SECONDS - t0))
  if [[ $rc -eq 0 ]]; then
    echo "=== $name: ok in ${took}s"
  else
    FAILED=$((FAILED + 1))
    echo "=== $name: FAILED (exit $rc$([[ $rc -eq 124 ]] && echo ', over its time limit')) after ${took}s"
  fi
  printf '%-40s exit %3d  %4ds\n' "$name" "$rc" "$took" >> "$RESULTS/summary.txt"
}

echo "dgserve GPU check on device '$DEVICE', results in $RESULTS"
"$PY" - "$DEVICE" <<'EOF'
import os, sys, torch
device = sys.argv[1]
print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}, {os.cpu_count()} CPU cores")
if device == "cuda":
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"ran on GPU cuda:{i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}")
else:
    print("ran on the CPU: a smoke run at small sizes; the CUDA tests skip and no figure below is a GPU figure")
EOF
command -v nvidia-smi >/dev/null && [[ "$DEVICE" == cuda ]] && nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,temperature.gpu --format=csv

# 1. The CUDA tests. -rs lists every skip with its reason (all of them, on the CPU).
CUDA_TESTS=$(grep -rlE "cuda\.is_available\(\)" tests --include='test_*.py' | sort | tr '\n' ' ')
step "cuda tests" "$LIMIT_TESTS" "$PY" -m pytest -q -rs -p no:cacheprovider $CUDA_TESTS \
  --junitxml="$RESULTS/cuda_tests.xml"
if [[ "$DEVICE" == cpu ]]; then
  echo "(on the CPU: the tests above that need CUDA were skipped, as listed; the CPU ones ran)"
fi

# 2. Raw against server throughput, DG-Net ResNet-50, in each precision.
for precision in "${PRECISIONS[@]}"; do
  step "serve_throughput $precision" "$LIMIT_SERVE" "$PY" benchmarks/serve_throughput.py --device "$DEVICE" \
    --precision "$precision" "${SERVE[@]}" --json "$RESULTS/serve_throughput_$precision.json"
done
step "serve_throughput fp32 contiguous" "$LIMIT_LAYOUT" "$PY" benchmarks/serve_throughput.py --device "$DEVICE" \
  --precision fp32 --memory-format contiguous "${SERVE[@]}" ${LAYOUT[@]+"${LAYOUT[@]}"} \
  --json "$RESULTS/serve_throughput_fp32_contiguous.json"

# 3. JPEG decoding: nvJPEG against the CPU.
step "jpeg_decode" "$LIMIT_JPEG" "$PY" benchmarks/jpeg_decode.py --device "$DEVICE" "${JPEG[@]}" \
  --json "$RESULTS/jpeg_decode.json"

# 4. DG-Net skipping against all-edges-open and the masked mode.
if [[ -f benchmarks/dgnet_cost.py ]]; then
  step "dgnet_cost" "$LIMIT_COST" "$PY" benchmarks/dgnet_cost.py --device "$DEVICE" --executions skip,masked "${COST[@]}"
else
  echo "=== dgnet_cost: NOT RUN, benchmarks/dgnet_cost.py is missing (it takes --device and --executions skip,masked)"
  printf '%-40s missing\n' "dgnet_cost" >> "$RESULTS/summary.txt"
  FAILED=$((FAILED + 1))
fi

echo
echo "=== done on $DEVICE in $((SECONDS - STARTED))s; $FAILED step(s) failed; results in $RESULTS"
cat "$RESULTS/summary.txt"
exec >&- 2>&-
wait "$TEE_PID" 2>/dev/null  # the log's last lines are written before the script ends
exit $((FAILED > 0))
