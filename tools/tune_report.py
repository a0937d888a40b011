#!/usr/bin/env python3
"""Base-tuning ranking of a random-search sweep (logic in maxscale/analysis/tune.py): best points by mean loss.

python tools/tune_report.py runs/base_tune [--top=10] [--min_seeds=3] [--out=DIR]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root

from maxscale.analysis import tune  # noqa: E402

if __name__ == "__main__":
    sys.exit(tune.main(sys.argv[1:]))
