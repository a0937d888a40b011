#!/usr/bin/env python3
"""Transfer report of a sweep (logic in maxscale/analysis/transfer.py): optimum per scale, drift in octaves, plots.

python tools/transfer_report.py runs/width [--hp=optimizer.lr] [--scale=model.width] [--out=DIR]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root

from maxscale.analysis import transfer  # noqa: E402

if __name__ == "__main__":
    sys.exit(transfer.main(sys.argv[1:]))
