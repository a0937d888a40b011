#!/usr/bin/env python3
"""Transfer report of a sweep (logic in maxscale/analysis/transfer.py): optimum per scale, drift in octaves, plots.

python tools/transfer_report.py runs/width [--hp=optimizer.lr] [--scale=model.width] [--out=DIR]

The same command: `maxscale transfer-report ...` (maxscale/__main__.py).
"""

import sys

from maxscale.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["transfer-report", *sys.argv[1:]]))
