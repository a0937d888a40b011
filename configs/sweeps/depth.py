"""Depth transfer (docs/transfer.md): CompleteP (alpha = 1) vs depth-muP (alpha = 1/2) vs the same model with
alpha = 0 (plain muP, no depth factors). Base: docs/transfer.md's width-64, depth-2 model.

  python tools/sweep.py configs/sweeps/depth.py                 # depths 2..16 at width 64, 9 LRs, 1 seed (72 runs)
  python tools/sweep.py configs/sweeps/depth.py:width=128,depths=2+8+32,seeds=3,lrs=-10:-5,\
      series=completep+depth_mup+alpha0 --vectorize=18    # 162 runs
  python tools/transfer_report.py runs/depth

Arguments (`FILE.py:key=value,...`):
  width=W       every width dimension scaled from the base's 64 (scale_shapes); runs land in depth_w<W>
  depths=A+B    depths (base depth 2)
  seeds=N       seeds 0..N-1 of init and data order (N > 1 adds a seed axis)
  series=...    completep (alpha = 1), depth_mup (the depth_mup rule, alpha = 1/2), alpha0 (CompleteP with alpha = 0)
  lrs=LO:HI     learning rates 2^LO .. 2^HI, a factor of 2 apart
  corpus=FILE   a text file instead of the stdlib corpus (runs land in <name>_<file stem>)
With no arguments the sweep is the original one (same run ids): completep and alpha0, 2^-12 .. 2^-4.
"""

import os

from maxscale import config, parameterization
from maxscale.analysis import tune

BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "transfer_base.py")
DEFAULTS = {
    "width": "64",
    "depths": "2+4+8+16",
    "seeds": "1",
    "series": "completep+alpha0",
    "lrs": "-12:-4",
    "corpus": "",
}
SERIES = {
    "completep": {"parameterization.name": "completep", "parameterization.depth_alpha": 1.0},
    "alpha0": {"parameterization.name": "completep", "parameterization.depth_alpha": 0.0},
    "depth_mup": {"parameterization.name": "depth_mup"},
}


def get_sweep(arg: str = ""):
    a = tune.sweep_arguments(arg, DEFAULTS, "depth.py")
    unknown = [s for s in a["series"].split("+") if s not in SERIES]
    if unknown:
        raise ValueError(f"depth.py: unknown series {unknown[0]!r}; choose from {', '.join(SERIES)}")
    lo, _, hi = a["lrs"].partition(":")
    lrs = [2.0**e for e in range(int(lo), int(hi) + 1)]
    width = int(a["width"])
    base = config.resolve(config.load(BASE))
    shapes = [
        parameterization.scale_shapes(base, depth=int(d), **({"width": width} if width != 64 else {}))
        for d in a["depths"].split("+")
    ]
    grid = {"shape": shapes, "alpha": [SERIES[s] for s in a["series"].split("+")], "optimizer.lr": lrs}
    if int(a["seeds"]) > 1:
        grid["seed"] = [{"train.seed": s, "data.seed": s} for s in range(int(a["seeds"]))]
    sweep = {"config": BASE, "fixed": {}, "grid": grid}
    if width != 64:
        sweep["name"] = f"depth_w{width}"
    if a["corpus"]:
        sweep["fixed"] = {"data.source": a["corpus"]}
        sweep["name"] = sweep.get("name", "depth") + "_" + os.path.splitext(os.path.basename(a["corpus"]))[0]
    return sweep
