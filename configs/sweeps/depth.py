"""Depth transfer (docs/transfer.md): CompleteP (alpha = 1) vs the same model with alpha = 0 (plain muP, no depth
factors), depths 2..16 at width 64, 9 learning rates a factor of 2 apart. Base depth = 2.

  python tools/sweep.py configs/sweeps/depth.py && python tools/transfer_report.py runs/depth
"""

import os

from maxscale import config, parameterization

BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "transfer_base.py")
DEPTHS = (2, 4, 8, 16)
LRS = [2.0**e for e in range(-12, -3)]  # 2^-12 .. 2^-4


def get_sweep():
    base = config.resolve(config.load(BASE))
    shapes = [parameterization.scale_shapes(base, depth=d) for d in DEPTHS]
    alphas = [{"parameterization.name": "completep", "parameterization.depth_alpha": a} for a in (1.0, 0.0)]
    return {"config": BASE, "fixed": {}, "grid": {"shape": shapes, "alpha": alphas, "optimizer.lr": LRS}}
