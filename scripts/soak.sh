#!/usr/bin/env bash
# Soak: a real server under mixed load (classify, detect, listings, summaries, exports, GETs
# of answered ids, overload bursts) for --duration seconds (default 600); fails on RSS growth
# over 5 % after the warm-up, any answer neither 2xx nor 503, or any lost request. See
# scripts/soak.py. Not part of `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" scripts/soak.py "$@"
