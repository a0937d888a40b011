#!/usr/bin/env python3
"""Compile the train step for a target mesh on simulated CPU devices; report memory per device (logic in
maxscale/parallel/compile_check.py).

  python tools/compile_check.py --config=configs/base.py --mesh=data=8,fsdp=8 --device=H100
  python tools/compile_check.py --config=configs/tiny.py --mesh=2x4x2 --json
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root

from maxscale.parallel import compile_check  # noqa: E402

if __name__ == "__main__":
    sys.exit(compile_check.main(sys.argv[1:]))
