#!/usr/bin/env python3
"""Compile the train step for a target mesh on simulated CPU devices; report memory per device (logic in
maxscale/parallel/compile_check.py).

  python tools/compile_check.py --config=configs/base.py --mesh=data=8,fsdp=8 --device=H100
  python tools/compile_check.py --config=configs/tiny.py --mesh=2x4x2 --json

The same command: `maxscale compile-check ...` (maxscale/__main__.py).
"""

import sys

from maxscale.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["compile-check", *sys.argv[1:]]))
