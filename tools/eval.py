#!/usr/bin/env python3
"""Loss (nats/token) and bits per byte of a run's checkpoint on a text or token file (maxscale/tools/evaluate.py).

python tools/eval.py --run=runs/<id> --data=FILE|DIR|GLOB|TOKENS.json [--step=S] [--split=auto] [--json]

The same command: `maxscale eval ...` (maxscale/__main__.py).
"""

import sys

from maxscale.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
