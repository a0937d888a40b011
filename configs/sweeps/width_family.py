"""A width family for the analysis suite (docs/analysis.md): runs that differ only in width and seed, checkpoints
kept at log-spaced steps, for width consistency (Vyas et al.) and weight spectra (Lauditi et al.) of SP vs muP.

  series=mup   the base-tuned muP model of `tuned=DIR` (a base_tune.py sweep) at its tuned LR, widths 64..512
  series=sp    SP at its default multipliers and one LR for every width, 2^-9 (SP's optimum near width 128)
  seeds=S      default 2 (an ensemble of two per width);  widths=64+128+256+512 (default)
  corpus=FILE  a text file instead of the stdlib corpus

Runs land in width_family_<series>[_<corpus stem>]; run the sweep with --keep_checkpoints:

  python tools/sweep.py configs/sweeps/width_family.py:series=mup,tuned=runs/base_tune --keep_checkpoints
  python tools/sweep.py configs/sweeps/width_family.py:series=sp --keep_checkpoints
  python -m maxscale.analysis.consistency runs/width_family_mup
  python -m maxscale.analysis.spectra runs/width_family_mup
"""

import os

from maxscale import config, parameterization
from maxscale.analysis import tune

BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "transfer_base.py")
KEEP = (25, 50, 100, 200)
SP_LR = 2.0**-9


def _args(arg: str) -> dict:
    defaults = {"series": "", "tuned": "", "seeds": "2", "widths": "64+128+256+512", "corpus": ""}
    out = tune.sweep_arguments(arg, defaults, "width_family.py")
    if out["series"] not in ("mup", "sp") or (out["series"] == "mup" and not out["tuned"]):
        raise ValueError("width_family.py needs series=sp, or series=mup with tuned=DIR (a base_tune sweep)")
    return out


def get_sweep(arg: str = ""):
    a = _args(arg)
    fixed = {"checkpoint.keep_steps": KEEP, "checkpoint.every": 50}
    if a["series"] == "mup":
        fixed.update({"parameterization.name": "mup", **tune.best_tuned(a["tuned"])})
    else:
        fixed.update({"parameterization.name": "sp", "optimizer.lr": SP_LR})
    name = f"width_family_{a['series']}"
    if a["corpus"]:
        fixed["data.source"] = a["corpus"]
        name += "_" + os.path.splitext(os.path.basename(a["corpus"]))[0]
    base = config.resolve(config.load(BASE))
    shapes = [parameterization.scale_shapes(base, width=int(w)) for w in a["widths"].split("+")]
    seeds = [{"train.seed": s, "data.seed": 0} for s in range(int(a["seeds"]))]
    return {"config": BASE, "fixed": fixed, "grid": {"shape": shapes, "seed": seeds}, "name": name}
