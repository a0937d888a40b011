"""MoE transfer across the number of experts (docs/moe.md): E in {4, 8, 16, 32} with k/E = 1/2 fixed (k grows with
E), 7 learning rates a factor of 2 apart, under the paper's parameterization (muP family with the MoE rows) and SP.
Same token budget at every E (200 steps x 8 x 64 tokens). About 56 runs of a width-64 model.

  python tools/sweep.py configs/sweeps/experts.py
  python tools/transfer_report.py runs/experts --scale=model.moe.num_experts
"""

import os

BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "moe_base.py")
EXPERTS = (4, 8, 16, 32)
LRS = [2.0**e for e in range(-11, -4)]  # 2^-11 .. 2^-5


def get_sweep():
    shapes = [
        {"model.moe.num_experts": e, "model.moe.num_active": e // 2, "model.moe.capacity_factor": 2.0} for e in EXPERTS
    ]
    points = [{"parameterization.name": name, "optimizer.lr": lr} for name in ("completep", "sp") for lr in LRS]
    return {"config": BASE, "grid": {"shape": shapes}, "points": points}
