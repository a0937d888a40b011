#!/usr/bin/env python3
"""Coordinate check (logic in maxscale/analysis/coord_check.py): mean |x| of every module output vs width or depth.

  python tools/coord_check.py --config=configs/tiny.py --config.optimizer.lr=0.005 --axis=width \\
      --sizes=64,128,256,512,1024 --parameterizations=sp,mup,completep --seeds=3 --steps=5 --out=runs/coord/width
  python tools/coord_check.py --config=configs/tiny.py --axis=depth --sizes=2,4,8,16,32 \\
      --parameterizations=completep,depth_mup,completep:0 --out=runs/coord/depth

The same command: `maxscale coord-check ...` (maxscale/__main__.py).
"""

import sys

from maxscale.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["coord-check", *sys.argv[1:]]))
