#!/usr/bin/env python3
"""Chaos test of exact resume (logic in maxscale/tools/chaos.py): kill a training N times at random moments with SIGKILL
and SIGTERM, resume each time, and compare metrics and final state with an uninterrupted run, bit for bit.

  python tools/chaos.py --config=configs/tiny.py --kills=20 --seed=0 --workdir=runs/chaos
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root

from maxscale.tools import chaos  # noqa: E402

if __name__ == "__main__":
    sys.exit(chaos.main(sys.argv[1:]))
