"""Width transfer (docs/transfer.md): SP vs muP at the default multipliers, widths 64..512 (every width dimension:
d_model, d_ffn, head dim), 7 learning rates a factor of 2 apart. Base shapes = the width-64 model, so both
parameterizations agree there.

  python tools/sweep.py configs/sweeps/width.py && python tools/transfer_report.py runs/width

Arguments (comma-separated key=value; none = the original one-seed sweep, same run ids):
  seeds=N       seeds 0..N-1 of init and data order (N > 1 adds a seed axis)
  widths=64+128+256+512   the widths (the base stays 64)
  corpus=FILE   a text file instead of the stdlib corpus (runs land in width_<file stem>)

  python tools/sweep.py configs/sweeps/width.py:seeds=3,widths=64+128+256+512+1024 --vectorize=21
"""

import os

from maxscale import config, parameterization
from maxscale.analysis import tune

BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "transfer_base.py")
DEFAULTS = {"seeds": "1", "widths": "64+128+256+512", "corpus": ""}
LRS = {
    "sp": [2.0**e for e in range(-13, -6)],  # 2^-13 .. 2^-7
    "mup": [2.0**e for e in range(-11, -4)],
}  # 2^-11 .. 2^-5


def get_sweep(arg: str = ""):
    a = tune.sweep_arguments(arg, DEFAULTS, "width.py")
    base = config.resolve(config.load(BASE))
    shapes = [parameterization.scale_shapes(base, width=int(w)) for w in a["widths"].split("+")]
    points = [{"parameterization.name": name, "optimizer.lr": lr} for name, lrs in LRS.items() for lr in lrs]
    grid = {"shape": shapes}
    if int(a["seeds"]) > 1:
        grid["seed"] = [{"train.seed": s, "data.seed": s} for s in range(int(a["seeds"]))]
    sweep = {"config": BASE, "grid": grid, "points": points}
    if a["corpus"]:
        sweep["fixed"] = {"data.source": a["corpus"]}
        sweep["name"] = "width_" + os.path.splitext(os.path.basename(a["corpus"]))[0]
    return sweep
