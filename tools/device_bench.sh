#!/usr/bin/env bash
# Device benchmark on a GPU machine (tools/device_bench.py; its arguments pass through):
#   tools/device_bench.sh [--models=dense,moe] [--steps=10] [--out=runs/device_bench.json] ...
# Makes .venv-gpu with maxscale and jax[cuda12] (the repo's JAX version) the first time (needs the package index),
# then runs the benchmark. VENV=path uses another environment, e.g. one already holding a CUDA jaxlib.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-gpu}
if [ ! -x "$VENV/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e . "jax[cuda12]>=0.10,<0.11"
fi
exec "$VENV/bin/python" tools/device_bench.py "$@"
