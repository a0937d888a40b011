"""MoE transfer across the expert hidden size M (docs/moe.md): M in {48, 96, 192, 384} at 4 experts, top-2, 7 learning
rates a factor of 2 apart, under the paper's rules (mean-field expert-down init), the fan-in control
(`expert_down_init=fan_in`, whose optimal LR the paper reports to drift with M) and SP.

  python tools/sweep.py configs/sweeps/expert_width.py
  python tools/sweep.py configs/sweeps/expert_width.py:tinyshakespeare.txt   # a second corpus: 5 LRs, 60 runs
  python tools/transfer_report.py runs/expert_width --scale=model.moe.expert_ffn_size
"""

import os

BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "moe_base.py")
SIZES = (48, 96, 192, 384)
LRS = [2.0**e for e in range(-11, -4)]
VARIANTS = {
    "mean_field": {"parameterization.name": "completep", "parameterization.expert_down_init": "mean_field"},
    "fan_in": {"parameterization.name": "completep", "parameterization.expert_down_init": "fan_in"},
    "sp": {"parameterization.name": "sp"},
}


def get_sweep(corpus: str = ""):
    shapes = [{"model.moe.expert_ffn_size": m} for m in SIZES]
    lrs = LRS[1:-1] if corpus else LRS  # the first corpus's optima all lie in 2^-8.6 .. 2^-7.5
    points = [{**v, "optimizer.lr": lr} for v in VARIANTS.values() for lr in lrs]
    sweep = {"config": BASE, "grid": {"shape": shapes}, "points": points}
    if corpus:  # its own sweep directory, runs/expert_width_<file stem>
        sweep["fixed"] = {"data.source": corpus}
        sweep["name"] = "expert_width_" + os.path.splitext(os.path.basename(corpus))[0]
    return sweep
