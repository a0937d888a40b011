#!/usr/bin/env python3
"""One report of a sweep (logic in maxscale/analysis/report.py): detects what the sweep varies and writes report.md
with the sections that apply (transfer, width consistency and spectra, scaling laws, LR horizon, schedules) and PNGs.

python tools/report.py runs/<sweep> [--out=DIR]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root

from maxscale.analysis import report  # noqa: E402

if __name__ == "__main__":
    sys.exit(report.main(sys.argv[1:]))
