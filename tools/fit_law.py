#!/usr/bin/env python3
"""Fit a loss law to a CSV of runs (logic in maxscale/analysis/law_cli.py): constants, 95% CIs, held-out R^2.

python tools/fit_law.py --csv=runs.csv --law=chinchilla --n=N --d=D --loss=loss [--tie] [--boot=100] [--json]
python tools/fit_law.py --csv=runs.csv --law=precision --n=N --d=D --loss=loss --pw=P_w [--pa=P_a] [--pkv=P_kv]
python tools/fit_law.py --csv=runs.csv --law=ptq --n=N --d=D --ppost=P_post --delta=delta
python tools/fit_law.py --csv=runs.csv --law=isoflop --n=N --d=D --loss=loss --c=C

The same command: `maxscale fit-law ...` (maxscale/__main__.py).
"""

import sys

from maxscale.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["fit-law", *sys.argv[1:]]))
