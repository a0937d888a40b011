"""Multi-head scaling (Bordelon, Chaudhry, Pehlevan, "Infinite limits of multi-head transformer dynamics"): the two
ways to grow attention with the width under muP, more heads at a fixed head dim (`heads`) or a larger head dim at
fixed heads (`head_dim`), each with the 1/d_head logit scaling (muP's) and 1/sqrt(d_head) (SP's).
Widths 64, 128, 256 from the base's 4 heads of 16, 6 learning rates a factor of 2 apart (2^-10 .. 2^-5). The base is
docs/transfer.md's. Growing heads keeps d_head = d0, where the logit scale d0^(a - 1/2) d_head^-a is d0^-1/2 for
every exponent a: the two scalings are one model there, so that combination runs once (as 1/d): 54 runs per seed,
not 72.

  python tools/sweep.py configs/sweeps/heads.py              # one seed
  python tools/sweep.py configs/sweeps/heads.py:3            # 3 seeds (train and data order): 162 runs
  python tools/sweep.py configs/sweeps/heads.py:seeds=3,corpus=FILE   # on a text file (runs in heads_<stem>)
  python tools/transfer_report.py runs/heads
"""

import os

from maxscale import config, parameterization
from maxscale.analysis import tune

BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "transfer_base.py")
WIDTHS = (64, 128, 256)
LRS = [2.0**e for e in range(-10, -4)]  # 2^-10 .. 2^-5
SCALINGS = {"1/d": 1.0, "1/sqrt(d)": 0.5}  # parameterization.attn_exponent


def get_sweep(arg: str = "1"):
    a = tune.sweep_arguments(arg if "=" in arg else f"seeds={arg}", {"seeds": "1", "corpus": ""}, "heads.py")
    base = config.resolve(config.load(BASE))
    shapes = [
        {**parameterization.scale_shapes(base, width=w, grows=grows), "parameterization.width_grows": grows}
        for grows in ("heads", "head_dim")
        for w in WIDTHS
    ]
    points = [
        {**shape, "parameterization.attn_exponent": e, "optimizer.lr": lr}
        for shape in shapes
        for e in SCALINGS.values()
        if shape["parameterization.width_grows"] == "head_dim" or e == 1.0  # heads: one model for every exponent
        for lr in LRS
    ]
    grid = {"seed": [{"train.seed": s, "data.seed": s} for s in range(int(a["seeds"]))]}
    sweep = {"config": BASE, "fixed": {"parameterization.name": "mup"}, "grid": grid, "points": points}
    if a["corpus"]:
        sweep["fixed"]["data.source"] = a["corpus"]
        sweep["name"] = "heads_" + os.path.splitext(os.path.basename(a["corpus"]))[0]
    return sweep
