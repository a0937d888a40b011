#!/usr/bin/env python3
"""Precision report of a sweep (logic in maxscale/analysis/precision_report.py): fitted laws vs Table 2, figures.

python tools/precision_report.py runs/<sweep> [--out=DIR] [--boot=100]

The same command: `maxscale precision-report ...` (maxscale/__main__.py).
"""

import sys

from maxscale.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["precision-report", *sys.argv[1:]]))
