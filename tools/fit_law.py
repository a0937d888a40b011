#!/usr/bin/env python3
"""Fit a loss law to a CSV of runs (logic in maxscale/analysis/law_cli.py): constants, 95% CIs, held-out R^2.

python tools/fit_law.py --csv=runs.csv --law=chinchilla --n=N --d=D --loss=loss [--tie] [--boot=100] [--json]
python tools/fit_law.py --csv=runs.csv --law=precision --n=N --d=D --loss=loss --pw=P_w [--pa=P_a] [--pkv=P_kv]
python tools/fit_law.py --csv=runs.csv --law=ptq --n=N --d=D --ppost=P_post --delta=delta
python tools/fit_law.py --csv=runs.csv --law=isoflop --n=N --d=D --loss=loss --c=C
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root

from maxscale.analysis import law_cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(law_cli.main(sys.argv[1:]))
