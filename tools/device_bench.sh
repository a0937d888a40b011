#!/usr/bin/env bash
# Device benchmark on a GPU machine (maxscale/tools/device_bench.py, `maxscale device-bench`; arguments pass through):
#   tools/device_bench.sh [--models=dense,moe] [--steps=10] [--out=runs/device_bench.json] ...
# Which Python runs it:
#   - VENV=path: that environment's python (e.g. one already holding a CUDA jaxlib);
#   - else, when `python3` (or $PYTHON) already imports a JAX with a GPU backend (an image with CUDA JAX, offline
#     machines included), that python, with maxscale's other dependencies taken from it and, where missing, from
#     wheel files in WHEELS=dir (installed with --no-index into a temporary folder: nothing is downloaded);
#   - else .venv-gpu, made the first time with maxscale and jax[cuda12] (needs the package index).
#   - --help (or -h): this text and the benchmark's flags; nothing is installed or run.
# The arguments are read before anything is installed: one not of the form --name[=value] stops it (exit 2).
set -euo pipefail
cd "$(dirname "$0")/.."
for arg in "$@"; do
  case "$arg" in
    -h|--help)
      sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
      if [ -x .venv/bin/python ]; then
        echo; .venv/bin/python -m maxscale device-bench --help 2>/dev/null || true
      else
        echo; echo "flags: maxscale device-bench --help (after make install) lists them"
      fi
      exit 0 ;;
    --[a-z]*) ;;
    *) echo "device_bench.sh: error: unexpected argument '$arg'; expected --name=value (see --help)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
if [ -n "${VENV:-}" ]; then
  PY="$VENV/bin/python"
elif "$PY" -c "import jax, sys; sys.exit(0 if any(d.platform == 'gpu' for d in jax.devices()) else 1)" 2>/dev/null; then
  if [ -n "${WHEELS:-}" ]; then
    site=$(mktemp -d)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$WHEELS"/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  missing=$("$PY" -c "import importlib.util as u; print(' '.join(m for m in ('flax', 'optax', 'orbax.checkpoint', \
'ml_collections', 'tensorboardX', 'numpy') if u.find_spec(m.split('.')[0]) is None))")
  if [ -n "$missing" ]; then
    echo "device_bench.sh: $PY lacks: $missing; pass WHEELS=dir with their wheel files (or VENV=path)" >&2
    exit 2
  fi
else
  PY=.venv-gpu/bin/python
  if [ ! -x "$PY" ]; then
    python3 -m venv .venv-gpu
    .venv-gpu/bin/python -m pip install -q --upgrade pip
    .venv-gpu/bin/python -m pip install -q -e . "jax[cuda12]>=0.10,<0.11"
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # maxscale from this checkout, installed or not
exec "$PY" -m maxscale.tools.device_bench "$@"
