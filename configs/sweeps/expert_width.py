"""MoE transfer across the expert hidden size M (docs/moe.md): 4 experts, top-2, learning rates a factor of 2 apart,
under the paper's rules (mean-field expert-down init), the fan-in control (`expert_down_init=fan_in`, whose optimal
LR the paper reports to drift with M) and SP.

  python tools/sweep.py configs/sweeps/expert_width.py          # M 48..384, 7 LRs, 200 steps, one seed: 84 runs
  python tools/sweep.py configs/sweeps/expert_width.py:tinyshakespeare.txt   # a second corpus: 5 LRs, 60 runs
  python tools/sweep.py configs/sweeps/expert_width.py:sizes=48+192+768,steps=800,seeds=3,lrs=-10:-8 --vectorize=9
  python tools/transfer_report.py runs/expert_width --scale=model.moe.expert_ffn_size

Arguments (`FILE.py:key=value,...`; a bare file name is `corpus=`, as before):
  sizes=48+96+192+384  expert hidden sizes M (the base is 96)
  steps=200            train.steps (the cosine schedule and eval follow it); another value names the sweep
                       expert_width_T<steps>, so its runs never mix with the 200-step ones
  seeds=1              seeds (train and data order) per point
  lrs=-11:-5           log2 of the learning rates, one octave apart (with a corpus: -10:-6)
  variants=mean_field+fan_in+sp
  corpus=FILE          a text file instead of the stdlib corpus (its own sweep, expert_width_<file stem>)
The default arguments give the 200-step sweeps' points and run ids unchanged.
"""

import os
import re

from maxscale.analysis import tune

BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "moe_base.py")
VARIANTS = {
    "mean_field": {"parameterization.name": "completep", "parameterization.expert_down_init": "mean_field"},
    "fan_in": {"parameterization.name": "completep", "parameterization.expert_down_init": "fan_in"},
    "sp": {"parameterization.name": "sp"},
}
FORMATS = (  # argument: (pattern, what to write)
    ("sizes", r"[1-9]\d*(\+[1-9]\d*)*", "M+M+... (positive integers)"),
    ("steps", r"[1-9]\d*", "T (train.steps, >= 8)"),
    ("seeds", r"[1-9]\d*", "N >= 1"),
    ("lrs", r"-?\d+(:-?\d+)?", "A:B (integer log2 learning rates, e.g. -10:-8)"),
)


def _args(arg: str) -> dict:
    if arg and "=" not in arg:  # the older form: the corpus file alone
        arg = "corpus=" + arg
    defaults = {"sizes": "48+96+192+384", "steps": "200", "seeds": "1", "lrs": "", "variants": "+".join(VARIANTS)}
    a = tune.sweep_arguments(arg, {**defaults, "corpus": ""}, "expert_width.py")
    a["lrs"] = a["lrs"] or ("-10:-6" if a["corpus"] else "-11:-5")
    for key, pattern, what in FORMATS:
        if not re.fullmatch(pattern, a[key]):
            raise ValueError(f"expert_width.py: {key}={a[key]!r}; use {key}={what}")
    if int(a["steps"]) < 8:
        raise ValueError(f"expert_width.py: steps={a['steps']}; use steps=T with T >= 8")
    for v in a["variants"].split("+"):
        if v not in VARIANTS:
            raise ValueError(f"expert_width.py: unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    return a


def get_sweep(arg: str = ""):
    a = _args(arg)
    lo, _, hi = a["lrs"].partition(":")
    lrs = [2.0**e for e in range(int(lo), int(hi or lo) + 1)]
    steps, seeds = int(a["steps"]), int(a["seeds"])
    fixed, name = {}, "expert_width"
    if steps != 200:  # the horizon: schedule, eval and checkpoint at its end (moe_base's are at 200)
        fixed.update({"train.steps": steps, "train.eval_every": steps, "checkpoint.every": steps})
        name += f"_T{steps}"
    if a["corpus"]:
        fixed["data.source"] = a["corpus"]
        name += "_" + os.path.splitext(os.path.basename(a["corpus"]))[0]
    shapes = [{"model.moe.expert_ffn_size": int(m)} for m in a["sizes"].split("+")]
    seed_points = [{}] if seeds == 1 else [{"train.seed": s, "data.seed": s} for s in range(seeds)]
    points = [
        {**VARIANTS[v], "optimizer.lr": lr, **s} for v in a["variants"].split("+") for lr in lrs for s in seed_points
    ]
    sweep = {"config": BASE, "grid": {"shape": shapes}, "points": points}
    if fixed:
        sweep["fixed"] = fixed
    if name != "expert_width":
        sweep["name"] = name
    return sweep
