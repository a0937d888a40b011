"""MoE transfer across the number of experts (docs/moe.md): E in {4, 8, 16, 32} with k/E = 1/2 fixed (k grows with
E), 6 learning rates a factor of 2 apart, 2 seeds (train and data order), under the paper's parameterization
(CompleteP with the MoE rows) and the naive control: SP with MaxText's expert init, which counts the experts axis as
fan-in so the experts' init shrinks as E^-1/2. (Plain SP equals the paper's rules here: at fixed width no rule
depends on E.) Same token budget at every E (200 steps x 8 x 64 tokens). 96 runs of a width-64 model, on the
stdlib corpus or on any text file given as the argument.

  python tools/sweep.py configs/sweeps/experts.py                   # the stdlib corpus
  python tools/sweep.py configs/sweeps/experts.py:tinyshakespeare.txt   # a second corpus: any text file
  python tools/transfer_report.py runs/experts --scale=model.moe.num_experts
"""

import os

BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "moe_base.py")
EXPERTS = (4, 8, 16, 32)
LRS = [2.0**e for e in range(-10, -4)]  # 2^-10 .. 2^-5
SEEDS = (0, 1)
VARIANTS = {
    "paper": {"parameterization.name": "completep"},
    "naive": {"parameterization.name": "sp", "parameterization.expert_init_counts_experts": True},
}


def get_sweep(corpus: str = ""):
    shapes = [
        {"model.moe.num_experts": e, "model.moe.num_active": e // 2, "model.moe.capacity_factor": 2.0} for e in EXPERTS
    ]
    seeds = [{"train.seed": s, "data.seed": s} for s in SEEDS]
    points = [{**v, "optimizer.lr": lr} for v in VARIANTS.values() for lr in LRS]
    sweep = {"config": BASE, "grid": {"shape": shapes, "seed": seeds}, "points": points}
    if corpus:  # a second corpus: its own sweep directory, runs/experts_<file stem>
        sweep["fixed"] = {"data.source": corpus}
        sweep["name"] = "experts_" + os.path.splitext(os.path.basename(corpus))[0]
    return sweep
