#!/usr/bin/env python3
"""Post-training quantization of a trained run (logic in maxscale/quant/ptq.py): eval loss per bit width -> ptq.json.

python tools/ptq.py --run=runs/<sweep>/<id> [--step=S] --bits=3,4,5,6,8 --method=rtn|gptq [--granularity=per_channel]
                    [--format=int|float] [--calib_batches=8] [--embeddings]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root

from maxscale.quant import ptq  # noqa: E402

if __name__ == "__main__":
    sys.exit(ptq.main(sys.argv[1:]))
