#!/usr/bin/env python3
"""Device benchmark of a ~1.3B dense and a ~1.6B-total MoE train step (logic in maxscale/tools/device_bench.py).

    tools/device_bench.sh [args]     # picks a Python with CUDA JAX, then runs this file
    python tools/device_bench.py [--models=dense,moe] [--steps=10] [--out=runs/device_bench.json] ...

The same command: `maxscale device-bench ...` (maxscale/__main__.py).
"""

import sys

from maxscale.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["device-bench", *sys.argv[1:]]))
