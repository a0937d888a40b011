#!/usr/bin/env python3
"""Post-training quantization of a trained run (logic in maxscale/tools/ptq.py): eval loss per bit width -> ptq.json.

python tools/ptq.py --run=runs/<sweep>/<id> [--step=S] --bits=3,4,5,6,8 --method=rtn|gptq [--granularity=per_channel]
                    [--format=int|float] [--calib_batches=8] [--embeddings]

The same command: `maxscale ptq ...` (maxscale/__main__.py).
"""

import sys

from maxscale.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["ptq", *sys.argv[1:]]))
