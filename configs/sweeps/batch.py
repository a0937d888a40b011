"""Batch size and the muP optimum (docs/transfer.md): does the optimal LR move with the batch size at a fixed number
of steps? Reports the slope d log2(eta*) / d log2(B).

The model is configs/sweeps/transfer_base.py under muP at its own base shapes (as configs/sweeps/horizon.py, so the
optimum is the one that transfers across widths): width 64, depth 2, seq 64, 200 steps, cosine. Grid: batch size
4, 8, 16, 32 x 7 learning rates 2^-11 .. 2^-5 x seeds (init and data order).

  python tools/sweep.py configs/sweeps/batch.py:seeds=3 --vectorize=21     # 84 runs
  python tools/transfer_report.py runs/batch                                 # the scale axis is train.batch_size

Arguments: seeds=N (default 1), batches=A+B (default 4+8+16+32), corpus=FILE (runs land in batch_<file stem>).
"""

import os

from maxscale import config, parameterization
from maxscale.analysis import tune

BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "transfer_base.py")
LRS = [2.0**e for e in range(-11, -4)]  # 2^-11 .. 2^-5


def get_sweep(arg: str = ""):
    a = tune.sweep_arguments(arg, {"seeds": "1", "batches": "4+8+16+32", "corpus": ""}, "batch.py")
    base = config.resolve(config.load(BASE))
    base.parameterization.name = "mup"
    pinned = parameterization.scale_shapes(base)  # base shapes = this model's: muP multipliers are 1 here
    grid = {
        "train.batch_size": [int(b) for b in a["batches"].split("+")],
        "optimizer.lr": LRS,
        "seed": [{"train.seed": s, "data.seed": s} for s in range(int(a["seeds"]))],
    }
    sweep = {"config": BASE, "fixed": {**pinned, "parameterization.name": "mup"}, "grid": grid}
    if a["corpus"]:
        sweep["fixed"]["data.source"] = a["corpus"]
        sweep["name"] = "batch_" + os.path.splitext(os.path.basename(a["corpus"]))[0]
    return sweep
