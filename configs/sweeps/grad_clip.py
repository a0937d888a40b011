"""Does gradient clipping move the optimal LR across width under muP? (docs/training.md, gradient clipping)

muP, widths 64, 128, 256 (every width dimension, from scale_shapes), 8 learning rates a factor of 2 apart, three
clipping rules: off, a fixed global-norm threshold of 1 (what SP runs use) and the relative rule (clip at 2 x the
running mean norm, the muP default). The base is docs/transfer.md's (200 steps, no clipping there). 72 runs.

  python tools/sweep.py configs/sweeps/grad_clip.py
  python tools/transfer_report.py runs/grad_clip
"""

import os

from maxscale import config, parameterization

BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "transfer_base.py")
WIDTHS = (64, 128, 256)
LRS = [2.0**e for e in range(-12, -4)]  # 2^-12 .. 2^-5
RULES = {
    "off": {"optimizer.grad_clip": 0.0},
    "global": {"optimizer.grad_clip": 1.0, "optimizer.grad_clip_mode": "global"},
    "relative": {"optimizer.grad_clip": 1.0, "optimizer.grad_clip_mode": "relative", "optimizer.grad_clip_ratio": 2.0},
}


def get_sweep():
    base = config.resolve(config.load(BASE))
    shapes = [parameterization.scale_shapes(base, width=w) for w in WIDTHS]
    points = [{**rule, "optimizer.lr": lr} for rule in RULES.values() for lr in LRS]
    return {"config": BASE, "fixed": {"parameterization.name": "mup"}, "grid": {"shape": shapes}, "points": points}
