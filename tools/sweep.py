#!/usr/bin/env python3
"""Expand and run a sweep (logic in maxscale/tools/sweep.py).

python tools/sweep.py configs/sweeps/width.py [--jobs=N] [--dry_run] [--slurm] [--root=runs]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root

from maxscale.tools import sweep  # noqa: E402

if __name__ == "__main__":
    sys.exit(sweep.main(sys.argv[1:]))
