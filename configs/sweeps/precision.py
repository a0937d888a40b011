"""Precision scaling (docs/precision.md): model size x tokens x weight precision, plus activation and KV marginals.

The base is configs/sweeps/transfer_base.py (byte-level LM on the stdlib corpus, depth 2, seq 64) at batch 16 under
muP with base width 64, so the one learning rate 2^-8 (the muP optimum of docs/transfer.md) serves every width.

  grid   width       64, 96, 128 (every width dimension scaled together; 0.12M, 0.26M, 0.46M non-embedding params)
         steps       150, 300, 600 (x 16 x 64 tokens: D = 154k, 307k, 614k), warmup 10% of the steps
  points P_w         int3, int4, int6, int8, none (high precision), at every (width, steps)     45 runs
         P_a         int4, int6 (weights and KV high precision), at steps 150 and 600           12 runs
         P_kv        int4, int6, whole attention (queries, keys, values, probabilities), 150/600 12 runs

69 runs, about 30 minutes on 2 CPU cores at `nice -n 10`. Granularities are the paper's: weights per output
channel, activations per tensor, KV per token. Keep the checkpoints for post-training quantization:

  python tools/sweep.py configs/sweeps/precision.py --keep_checkpoints
  python tools/ptq.py --run=runs/precision/<id> --bits=3,4,5,6,8 --method=gptq     # the high-precision runs
  python tools/precision_report.py runs/precision
"""

import os

from maxscale import config, parameterization

BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "transfer_base.py")
WIDTHS = (64, 96, 128)
STEPS = (150, 300, 600)
MARGINAL_STEPS = (150, 600)
WEIGHTS = ("int3", "int4", "int6", "int8", "none")
ACTIVATIONS = ("int4", "int6")
KV = ("int4", "int6")


def _steps(n: int) -> dict:
    return {"train.steps": n, "schedule.warmup_steps": n // 10}


def get_sweep():
    base = config.resolve(config.load(BASE))
    shapes = [parameterization.scale_shapes(base, width=w) for w in WIDTHS]
    points = [{**_steps(n), "quant.weights": w} for n in STEPS for w in WEIGHTS]
    points += [{**_steps(n), "quant.activations": a} for n in MARGINAL_STEPS for a in ACTIVATIONS]
    points += [{**_steps(n), "quant.kv": kv, "quant.whole_attention": True} for n in MARGINAL_STEPS for kv in KV]
    fixed = {
        "parameterization.name": "mup",
        "optimizer.lr": 2.0**-8,
        "optimizer.grad_clip": 1.0,
        "train.batch_size": 16,
        "train.eval_every": 1_000_000,  # one eval, at the last step
        "train.log_every": 50,
        "checkpoint.every": 1_000_000,  # one checkpoint, at the last step (kept for PTQ with --keep_checkpoints)
        "checkpoint.max_to_keep": 1,
    }
    return {"config": BASE, "fixed": fixed, "grid": {"shape": shapes}, "points": points}
