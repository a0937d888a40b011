"""Base tuning (docs/transfer.md, "Base tuning"): the muP workflow's first half. Tune the width-64 base model's
learning rate together with its multipliers, then transfer the best to wide models (`width_tuned.py`).

Searched, log-uniform over a Latin hypercube (one stratum per point in every dimension, fixed RNG seed):
  optimizer.lr                      2^-10 .. 2^-5
  parameterization.output_mult      2^-3  .. 2^4     readout multiplier (muP divides it by the width ratio)
  parameterization.input_mult       2^-4  .. 2^2     embedding output multiplier
  parameterization.init_std         2^-8  .. 2^-3    hidden matrices' base init std (muP: x (fan_in/base)^-1/2)
  parameterization.embed_init_std   2^-8  .. 2^0     embedding init std
  parameterization.attn_mult        2^-2  .. 2^3     attention logit multiplier
plus the untuned defaults (every multiplier 1, init std 0.02) at 2^-9, 2^-8, 2^-7 as the reference.

Arguments (`FILE.py:arg`, comma-separated key=value):
  n=N          search points (default 64)
  top=DIR      the confirmation stage: the best `k` points of the sweep in DIR (lowest mean eval loss over the
               seeds it has) rerun with `seeds` seeds; seed 0's runs are the search's own, so they are reused
  k=K          points confirmed (default 6);  seeds=S  seeds per point (default 3)
  corpus=FILE  a text file instead of the stdlib corpus (runs land in base_tune_<file stem>)

  python tools/sweep.py configs/sweeps/base_tune.py --vectorize=8            # 67 runs, 1 seed
  python tools/sweep.py configs/sweeps/base_tune.py:top=runs/base_tune --vectorize=8   # + (seeds-1) x k runs
  python tools/tune_report.py runs/base_tune
"""

import os

import numpy as np

from maxscale.analysis import tune

BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "transfer_base.py")
SPACE = {  # field: (log2 low, log2 high)
    "optimizer.lr": (-10, -5),
    "parameterization.output_mult": (-3, 4),
    "parameterization.input_mult": (-4, 2),
    "parameterization.init_std": (-8, -3),
    "parameterization.embed_init_std": (-8, 0),
    "parameterization.attn_mult": (-2, 3),
}
DEFAULTS = [{"optimizer.lr": 2.0**e} for e in (-9, -8, -7)]


def latin_hypercube(n: int, seed: int = 0) -> list[dict]:
    """n points, each dimension split into n equal log2 strata with one point per stratum, rounded to 3 digits."""
    rng = np.random.default_rng(seed)
    points = [{} for _ in range(n)]
    for field, (lo, hi) in SPACE.items():
        u = (rng.permutation(n) + rng.random(n)) / n
        for p, x in zip(points, lo + (hi - lo) * u, strict=True):
            p[field] = float(f"{2.0**x:.3g}")
    return points


def _args(arg: str) -> dict:
    out = tune.sweep_arguments(arg, {"n": "64", "k": "6", "seeds": "3", "top": "", "corpus": ""}, "base_tune.py")
    return out


def get_sweep(arg: str = ""):
    a = _args(arg)
    sweep = {"config": BASE, "fixed": {"parameterization.name": "mup"}}
    if a["corpus"]:
        sweep["fixed"]["data.source"] = a["corpus"]
        sweep["name"] = "base_tune_" + os.path.splitext(os.path.basename(a["corpus"]))[0]
    else:
        sweep["name"] = "base_tune"
    if not a["top"]:
        sweep["points"] = latin_hypercube(int(a["n"])) + DEFAULTS
        return sweep
    best = tune.best_points(a["top"], list(SPACE), k=int(a["k"]))
    seeds = [{"train.seed": s, "data.seed": s} for s in range(int(a["seeds"]))]
    sweep["grid"] = {"seed": seeds}
    sweep["points"] = [b["point"] for b in best]
    return sweep
