"""Base-tuned transfer (docs/transfer.md, "Base tuning"): the muP workflow's second half. The best base point of a
`base_tune.py` sweep (lowest mean eval loss over 3 seeds) is transferred to widths 64..512 under muP, against SP
at its default multipliers with the LR tuned at every width (the usual practice), and SP with the tuned
multipliers applied as they are at every width (SP's best shot without a per-width search of all five).

  muP (tuned)  the tuned point, LR x 2^-2 .. 2^2 around the tuned LR (5 LRs)
  SP           multipliers 1, init std 0.02, 5 LRs centred on SP's measured optimum 2^-8 x (64/width)
  SP (tuned)   the tuned multipliers under SP, 5 LRs centred on the tuned LR x 64/width (SP's LR ~ 1/width)

Every point with `seeds` seeds (train and data order). Arguments (comma-separated key=value):
  tuned=DIR    the base-tuning sweep (required), e.g. runs/base_tune
  seeds=S      default 3;  widths=64+128+256+512 (default);  series=mup+sp (default; add sp_tuned)
  corpus=FILE  a text file instead of the stdlib corpus (runs land in width_tuned_<file stem>)
  rank=K       transfer the K-th best tuned point instead of the best (default 1)
  lrs=A:B      the LR offsets in octaves around each series' centre (default -2:2)

  python tools/sweep.py configs/sweeps/width_tuned.py:tuned=runs/base_tune --vectorize=8
  python tools/transfer_report.py runs/width_tuned
"""

import math
import os

from maxscale import config, parameterization
from maxscale.analysis import tune

BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "transfer_base.py")
SERIES = ("mup", "sp", "sp_tuned")


def _args(arg: str) -> dict:
    defaults = {
        "tuned": "",
        "seeds": "3",
        "widths": "64+128+256+512",
        "series": "mup+sp",
        "corpus": "",
        "rank": "1",
        "lrs": "-2:2",
    }
    out = tune.sweep_arguments(arg, defaults, "width_tuned.py")
    if not out["tuned"]:
        raise ValueError("width_tuned.py needs tuned=DIR, the base_tune sweep directory (e.g. :tuned=runs/base_tune)")
    return out


def get_sweep(arg: str = ""):
    a = _args(arg)
    rank = int(a["rank"])
    best = tune.best_points(a["tuned"], list(tune.TUNED_FIELDS), k=rank, min_seeds=int(a["seeds"]))[rank - 1]["point"]
    lr0 = best.pop("optimizer.lr")
    lo, _, hi = a["lrs"].partition(":")
    offsets = range(int(lo), int(hi or lo) + 1)
    base = config.resolve(config.load(BASE))
    points = []
    for w in (int(x) for x in a["widths"].split("+")):
        shape = parameterization.scale_shapes(base, width=w)
        sp_centre = -8 - round(math.log2(w / 64))
        for name in a["series"].split("+"):
            if name == "mup":
                lrs = [lr0 * 2.0**e for e in offsets]
                extra = {"parameterization.name": "mup", **best}
            elif name == "sp":
                lrs = [2.0 ** (sp_centre + e) for e in offsets]
                extra = {"parameterization.name": "sp"}
            elif name == "sp_tuned":
                lrs = [lr0 * 64 / w * 2.0**e for e in offsets]
                extra = {"parameterization.name": "sp", **best}
            else:
                raise ValueError(f"width_tuned.py: unknown series {name!r}; choose from {', '.join(SERIES)}")
            points += [{**shape, **extra, "optimizer.lr": lr} for lr in lrs]
    seeds = [{"train.seed": s, "data.seed": s} for s in range(int(a["seeds"]))]
    sweep = {"config": BASE, "grid": {"seed": seeds}, "points": points, "name": "width_tuned"}
    if a["corpus"]:
        sweep["fixed"] = {"data.source": a["corpus"]}
        sweep["name"] += "_" + os.path.splitext(os.path.basename(a["corpus"]))[0]
    return sweep
