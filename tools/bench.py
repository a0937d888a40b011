#!/usr/bin/env python3
"""Benchmark the train step and print JSON (logic in maxscale/tools/bench_cli.py and maxscale/tools/bench.py).

    python tools/bench.py --config=configs/base.py [--steps=10] [--compile_depths=4,64] [--compare_dense=true]
        [--dispatches=capacity,dropless] [--rounds=N]
        [--checkpoint=true --saves=3 --checkpoint_dir=/tmp] [--config.<section>.<field>=<value> ...]

The same command: `maxscale bench ...` (maxscale/__main__.py).
"""

import sys

from maxscale.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
