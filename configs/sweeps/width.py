"""Width transfer (docs/transfer.md): SP vs muP, widths 64..512 (every width dimension: d_model, d_ffn, head dim),
7 learning rates a factor of 2 apart. Base shapes = the width-64 model, so both parameterizations agree there.

  python tools/sweep.py configs/sweeps/width.py && python tools/transfer_report.py runs/width
"""

import os

from maxscale import config, parameterization

BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "transfer_base.py")
WIDTHS = (64, 128, 256, 512)
LRS = {
    "sp": [2.0**e for e in range(-13, -6)],  # 2^-13 .. 2^-7
    "mup": [2.0**e for e in range(-11, -4)],
}  # 2^-11 .. 2^-5


def get_sweep():
    base = config.resolve(config.load(BASE))
    shapes = [parameterization.scale_shapes(base, width=w) for w in WIDTHS]
    points = [{"parameterization.name": name, "optimizer.lr": lr} for name, lrs in LRS.items() for lr in lrs]
    return {"config": BASE, "grid": {"shape": shapes}, "points": points}
