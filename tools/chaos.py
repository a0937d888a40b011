#!/usr/bin/env python3
"""Chaos test of exact resume (logic in maxscale/tools/chaos.py): kill a training N times at random moments with SIGKILL
and SIGTERM, resume each time, and compare metrics and final state with an uninterrupted run, bit for bit.

  python tools/chaos.py --config=configs/tiny.py --kills=20 --seed=0 --workdir=runs/chaos

The same command: `maxscale chaos ...` (maxscale/__main__.py).
"""

import sys

from maxscale.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["chaos", *sys.argv[1:]]))
