#!/usr/bin/env python3
"""One report of a sweep (logic in maxscale/analysis/report.py): detects what the sweep varies and writes report.md
with the sections that apply (transfer, width consistency and spectra, scaling laws, LR horizon, schedules,
width and horizon) and PNGs.

python tools/report.py runs/<sweep> [--out=DIR]

The same command: `maxscale report ...` (maxscale/__main__.py).
"""

import sys

from maxscale.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["report", *sys.argv[1:]]))
