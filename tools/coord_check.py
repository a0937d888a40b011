#!/usr/bin/env python3
"""Coordinate check (logic in maxscale/analysis/coord_check.py): mean |x| of every module output vs width or depth.

  python tools/coord_check.py --config=configs/tiny.py --config.optimizer.lr=0.005 --axis=width \\
      --sizes=64,128,256,512,1024 --parameterizations=sp,mup,completep --seeds=3 --steps=5 --out=runs/coord/width
  python tools/coord_check.py --config=configs/tiny.py --axis=depth --sizes=2,4,8,16,32 \\
      --parameterizations=completep,depth_mup,completep:0 --out=runs/coord/depth
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root

from maxscale.analysis import coord_check  # noqa: E402

if __name__ == "__main__":
    sys.exit(coord_check.main(sys.argv[1:]))
