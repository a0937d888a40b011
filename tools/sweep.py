#!/usr/bin/env python3
"""Expand and run a sweep (logic in maxscale/tools/sweep.py).

python tools/sweep.py configs/sweeps/width.py [--jobs=N] [--dry_run] [--slurm] [--root=runs]

The same command: `maxscale sweep ...` (maxscale/__main__.py).
"""

import sys

from maxscale.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
