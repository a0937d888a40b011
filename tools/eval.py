"""Loss (nats/token) and bits per byte of a run's checkpoint on a text or token file (maxscale/tools/evaluate.py).

python tools/eval.py --run=runs/<id> --data=FILE|DIR|GLOB|TOKENS.json [--step=S] [--split=auto] [--json]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from maxscale.tools import evaluate  # noqa: E402

if __name__ == "__main__":
    sys.exit(evaluate.main())
