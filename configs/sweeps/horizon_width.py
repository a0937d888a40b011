"""When does width pay? (issue #27; docs/transfer.md, "Width and horizon"): the base-tuned muP model and SP tuned
per width, at widths 64..256 and horizons 200, 800, 3200 steps, with the LR grid re-centred per horizon by the
measured LR-horizon exponent instead of re-tuned blindly.

  muP  the tuned base point (a base_tune sweep's best, or the one docs/transfer.md records: lr 2^-5.54, init_std
       2^-4.98, embed_init_std 2^-0.50, output_mult 2^1.79, input_mult 2^1.43, attn_mult 2^-0.78); the LR centre at
       T = 200 is its measured transferred optimum 2^-6.0 (docs/transfer.md, 3 seeds, 2^-6.06 .. -5.84 over 64..512)
  SP   multipliers 1, init std 0.02, centred on SP's measured optimum 2^-8 x (64/width) at T = 200 (width_tuned.py)

Re-centring: eta*(T) = eta*(200) (T/200)^-xi, with an exponent per series, both measured:
  SP   xi = 0.46, the cosine schedule's exponent on the stdlib corpus (docs/analysis.md, 3 seeds, [0.36, 0.54];
       measured at width 64 with multipliers 1, SP's own). SP follows it from 200 to 800 steps on both corpora
       (the optimum fell 0.9-1.1 octaves on stdlib and 0.9-1.4 on tinyshakespeare; predicted 0.92).
  muP  xi_mup = 0: at the tuned point the optimum does not fall with the horizon (docs/transfer.md, "Width and
       horizon": 2^-5.6 .. -6.4 at 200, 800 and 3200 steps on stdlib, 2^-5.6 .. -5.8 at 200 and 800 on
       tinyshakespeare). The exponent of a default-multiplier proxy does not transfer to a tuned point. sp_tuned,
       at the same tuned multipliers, takes xi_mup too.
The 3 LRs are one octave apart (offsets -1, 0, +1): the optimum stays inside the grid when the prediction is off by
up to an octave (the interval of xi alone leaves +-0.36 octave of doubt at 3200, and the optimum moves by up to 0.2
octave across widths), and the parabola through 3 points an octave apart locates it to a fraction of an octave
(half-octave spacing would put a 0.5-octave miss on the edge). The runs docs/transfer.md reports were made with
xi_mup=0.46 (then the only exponent) and extra offsets upwards; its commands say so, and regenerate the same runs.

Arguments (`FILE.py:key=value,...`):
  tuned=DIR      a base_tune sweep (default: the point docs/transfer.md records, above)
  widths=64+128+256 (default; 512+1024 add wider models);  horizons=200+800+3200 (train.steps)
  series=mup+sp  (default; sp_tuned adds SP with the tuned multipliers, as width_tuned.py)
  seeds=2        seeds (train and data order) per point;  seeds_long=N  seeds at the longest horizon (default seeds)
  lrs=-1:1       LR offsets in octaves around each centre
  xi=0.46        SP's LR-horizon exponent;  xi_mup=0  that of the tuned point (mup, sp_tuned)
  corpus=FILE    a text file instead of the stdlib corpus (runs land in horizon_width_<file stem>)
  consistency=T  only the width-consistency family: muP at its centre LR, the narrowest and widest width, horizon
                 T, a checkpoint every T/8 (run it first, unpacked, with --keep_checkpoints; the same run ids)

  python tools/sweep.py configs/sweeps/horizon_width.py:consistency=800 --root=/work/runs27 --keep_checkpoints
  python tools/sweep.py configs/sweeps/horizon_width.py --root=/work/runs27 --vectorize=3
  python tools/report.py /work/runs27/horizon_width      # the "Width and horizon" section
"""

import importlib.util
import math
import os
import re

from maxscale import config, parameterization
from maxscale.analysis import tune

_spec = importlib.util.spec_from_file_location(
    "width_tuned", os.path.join(os.path.dirname(os.path.abspath(__file__)), "width_tuned.py")
)
width_tuned = importlib.util.module_from_spec(_spec)  # its base model, series and SP's per-width LR rule
_spec.loader.exec_module(width_tuned)

# docs/transfer.md, "Base tuning": rank 1 of the 64-point search (3 seeds), values as the search rounds them.
DOC_POINT = {
    "parameterization.output_mult": 3.46,
    "parameterization.input_mult": 2.69,
    "parameterization.init_std": 0.0317,
    "parameterization.embed_init_std": 0.707,
    "parameterization.attn_mult": 0.582,
}
MUP_LR_200 = 2.0**-6.0  # docs/transfer.md: the transferred optimum at T = 200 (2^-6.06 .. -5.84, widths 64..512)
XI = 0.46  # docs/analysis.md: cosine, stdlib, 3 seeds [0.36, 0.54]; SP follows it (docs/transfer.md)
XI_MUP = 0.0  # docs/transfer.md, "Width and horizon": the tuned point's optimum does not move with T (2 corpora)
T0 = 200
FORMATS = (  # argument: (pattern, what to write)
    ("widths", r"[1-9]\d*(\+[1-9]\d*)*", "W+W+... (positive integers)"),
    ("horizons", r"([1-9]\d*)(\+[1-9]\d*)*", "T+T+... (train.steps, each >= 8)"),
    ("seeds", r"[1-9]\d*", "N >= 1"),
    ("seeds_long", r"[1-9]\d*", "N >= 1"),
    ("lrs", r"-?\d+(:-?\d+)?", "A:B (integer octaves, e.g. -1:1)"),
    ("xi", r"\d*\.?\d+", "a number, e.g. 0.46"),
    ("xi_mup", r"\d*\.?\d+", "a number, e.g. 0"),
    ("consistency", r"[1-9]\d*", "T (a horizon, train.steps)"),
)


def _args(arg: str) -> dict:
    defaults = {
        "tuned": "",
        "widths": "64+128+256",
        "horizons": "200+800+3200",
        "series": "mup+sp",
        "seeds": "2",
        "seeds_long": "",
        "lrs": "-1:1",
        "xi": str(XI),
        "xi_mup": str(XI_MUP),
        "corpus": "",
        "consistency": "",
    }
    a = tune.sweep_arguments(arg, defaults, "horizon_width.py")
    for key, pattern, what in FORMATS:
        if a[key] and not re.fullmatch(pattern, a[key]):
            raise ValueError(f"horizon_width.py: {key}={a[key]!r}; use {key}={what}")
    for s in a["series"].split("+"):
        if s not in width_tuned.SERIES:
            raise ValueError(f"horizon_width.py: unknown series {s!r}; choose from {', '.join(width_tuned.SERIES)}")
    return a


def centre(series: str, width: int, steps: int, lr_mup: float, xi: float, xi_mup: float = XI_MUP) -> float:
    """The predicted optimal LR of a series at a width and horizon: its T = 200 optimum x (T / 200)^-exponent, the
    exponent xi_mup at the tuned point (mup, sp_tuned) and xi for SP at multipliers 1."""
    if series == "mup":
        lr, exponent = lr_mup, xi_mup
    elif series == "sp":
        lr, exponent = 2.0 ** (-8 - round(math.log2(width / 64))), xi  # width_tuned.py's SP centre
    else:  # sp_tuned: SP's LR ~ 1/width from the tuned LR
        lr, exponent = lr_mup * 64 / width, xi_mup
    return lr * (steps / T0) ** -exponent


def _base_point(tuned: str, seeds: int) -> tuple[dict, float]:
    """(the multipliers, muP's LR at T = 200): a base_tune sweep's best point, or the one the docs record."""
    if not tuned:
        return dict(DOC_POINT), MUP_LR_200
    best = tune.best_points(tuned, list(tune.TUNED_FIELDS), k=1, min_seeds=seeds)[0]["point"]
    return best, best.pop("optimizer.lr")


def _horizon(steps: int, every: int) -> dict:
    return {"train.steps": steps, "train.eval_every": every, "checkpoint.every": every, "checkpoint.max_to_keep": 9}


def get_sweep(arg: str = ""):
    a = _args(arg)
    xi, xi_mup, seeds = float(a["xi"]), float(a["xi_mup"]), int(a["seeds"])
    best, lr_mup = _base_point(a["tuned"], seeds)
    lo, _, hi = a["lrs"].partition(":")
    offsets = range(int(lo), int(hi or lo) + 1)
    widths = [int(w) for w in a["widths"].split("+")]
    horizons = [int(t) for t in a["horizons"].split("+")]
    series = a["series"].split("+")
    if a["consistency"]:
        horizons, widths, series, offsets = [int(a["consistency"])], [min(widths), max(widths)], ["mup"], [0]
    base = config.resolve(config.load(width_tuned.BASE))
    long_seeds = int(a["seeds_long"] or seeds)
    points = []
    for steps in horizons:
        n_seeds = long_seeds if steps == max(horizons) and not a["consistency"] else seeds
        every = steps // 8
        horizon = _horizon(steps, every) if a["consistency"] else {**_horizon(steps, every), "checkpoint.every": steps}
        for w in widths:
            shape = parameterization.scale_shapes(base, width=w)
            for name in series:
                extra = {"parameterization.name": "mup" if name == "mup" else "sp"}
                extra.update(best if name in ("mup", "sp_tuned") else {})
                c = centre(name, w, steps, lr_mup, xi, xi_mup)
                for e in offsets:
                    for s in range(n_seeds):
                        seed = {"train.seed": s, "data.seed": s}
                        points.append({**shape, **extra, **horizon, **seed, "optimizer.lr": c * 2.0**e})
    sweep = {"config": width_tuned.BASE, "points": points, "name": "horizon_width"}
    if a["corpus"]:
        sweep["fixed"] = {"data.source": a["corpus"]}
        sweep["name"] += "_" + os.path.splitext(os.path.basename(a["corpus"]))[0]
    return sweep
