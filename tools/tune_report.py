#!/usr/bin/env python3
"""Base-tuning ranking of a random-search sweep (logic in maxscale/analysis/tune.py): best points by mean loss.

python tools/tune_report.py runs/base_tune [--top=10] [--min_seeds=3] [--out=DIR]

The same command: `maxscale tune-report ...` (maxscale/__main__.py).
"""

import sys

from maxscale.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["tune-report", *sys.argv[1:]]))
