"""LR horizon and schedules (docs/analysis.md, Bordelon & Mori 2026): the optimal LR vs the horizon T, eta*(T) ~ T^-xi,
and the loss of each schedule at equal compute.

The model is configs/sweeps/transfer_base.py under muP (base shapes = its own width-64 shapes, so the optimum is the
one that transfers across widths): width 64, depth 2, seq 64, batch 8. Grid: T = train.steps in {100, 200, 400,
800} x 6 learning rates 2^-11 .. 2^-6 x schedules constant, cosine and wsd (decay over the last 20%; cosine and wsd
end at 0.1 x the peak), 10 warmup steps for all, final eval on 32 held-out batches at T. A timed subset (cosine,
T = 100 and 800, 2^-10 .. 2^-5) put the optimum at 2^-7 for T = 100 and 2^-9 for T = 800, hence this grid. 72 runs,
27,000 steps: ~26 minutes on this machine's 2 CPU cores shared with other sweeps (17 s per T = 100 run, 27 s per
T = 800 run, most of it start-up and compilation), less on free cores.

  python tools/sweep.py configs/sweeps/horizon.py
  python tools/report.py runs/horizon         # LR horizon (xi with a 95% interval) and schedules sections

Arguments (`configs/sweeps/horizon.py:ARG`, comma-separated key=value):
  seeds=N        train.seed 0 .. N-1 for every point (default 1). With two or more seeds the report's optima and xi
                 get 95% bootstrap intervals over seeds; with one seed, xi gets the least-squares t interval.
                 data.seed stays fixed, so the seeds differ in the init only (set data.seed too for data order).
  schedules=A+B  schedules to compare (default constant+cosine+wsd; power adds eta0 (1 + t/t0)^-chi, chi 0.5).
  corpus=FILE    a text file instead of the stdlib corpus (runs land in horizon_<file stem>)
e.g. python tools/sweep.py configs/sweeps/horizon.py:seeds=3,schedules=constant+cosine+wsd+power
"""

import os

from maxscale import config, parameterization
from maxscale.errors import ConfigError

BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "transfer_base.py")
HORIZONS = (100, 200, 400, 800)
LRS = [2.0**e for e in range(-11, -5)]  # 2^-11 .. 2^-6
SCHEDULES = ("constant", "cosine", "wsd")
KNOWN = ("constant", "cosine", "wsd", "power")


def _args(arg: str) -> tuple[int, tuple[str, ...], str]:
    seeds, schedules, corpus = 1, SCHEDULES, ""
    for item in filter(None, arg.split(",")):
        key, _, value = item.partition("=")
        if key == "seeds" and value.isdigit() and int(value) >= 1:
            seeds = int(value)
        elif key == "schedules" and value and all(s in KNOWN for s in value.split("+")):
            schedules = tuple(value.split("+"))
        elif key == "corpus" and value:
            corpus = value
        else:
            raise ConfigError(
                f"horizon sweep argument {item!r}: use seeds=N (N >= 1), schedules=A+B of {KNOWN} or corpus=FILE"
            )
    return seeds, schedules, corpus


def get_sweep(arg: str = ""):
    seeds, schedules, corpus = _args(arg)
    base = config.resolve(config.load(BASE))
    base.parameterization.name = "mup"
    base.train.update(eval_steps=32, log_every=50)
    base.schedule.update(warmup_steps=10, final_lr_fraction=0.1, decay_fraction=0.2)
    pinned = parameterization.scale_shapes(base)  # base shapes = this model's: muP multipliers are 1 here
    points = [
        {"schedule.name": s, "train.steps": T, "train.eval_every": T, "checkpoint.every": T, "train.seed": seed}
        for s in schedules
        for T in HORIZONS
        for seed in range(seeds)
    ]
    name = "horizon"
    if corpus:
        pinned = {**pinned, "data.source": corpus}
        name += "_" + os.path.splitext(os.path.basename(corpus))[0]
    return {"name": name, "config": base, "fixed": pinned, "grid": {"optimizer.lr": LRS}, "points": points}
