#!/usr/bin/env python3
"""Precision report of a sweep (logic in maxscale/analysis/precision_report.py): fitted laws vs Table 2, figures.

python tools/precision_report.py runs/<sweep> [--out=DIR] [--boot=100]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root

from maxscale.analysis import precision_report  # noqa: E402

if __name__ == "__main__":
    sys.exit(precision_report.main(sys.argv[1:]))
