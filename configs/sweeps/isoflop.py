"""IsoFLOP grid (Hoffmann et al. 2022, Approach 2; docs/analysis.md): 3 compute budgets x 5 model sizes under muP.

The model is configs/sweeps/transfer_base.py (depth 2, 4 heads, SwiGLU ffn 3 x width, seq 64, batch 8) scaled in
width with `parameterization.scale_shapes` (head dim and ffn follow the width; base shapes pinned to the width-64
model), so one learning rate serves every size (muP). Widths 16 .. 128 have N = 11k, 21k, 35k, 72k, 123k, 265k, 459k
non-embedding parameters (`transformer.count_params`, readout included); budget i trains the five widths
WIDTHS[i : i + 5], a window that slides with the budget as the optimum does (a timed first budget put it between
widths 24 and 32, ~100 tokens per parameter: byte-level models this small want many tokens). For each budget C,
train.steps = round(C / (6 N x batch x seq_len)), so 6 N D is C within 1% (D = steps x batch x seq_len tokens);
the cosine schedule decays to 0.1 over exactly those steps (Hoffmann's recipe), after 20 warmup steps. The whole
stdlib corpus (31 MB) is used, so no run repeats data. Final eval on 32 held-out batches (16k tokens, the same for
every run).

Budgets 5e11, 1.5e12 and 4.5e12 FLOPs (6ND): 1,300 .. 42,000 steps per run, 4 .. 700 tokens per parameter.
`python configs/sweeps/isoflop.py` prints the plan and a time estimate fitted to the first budget's runs: ~35 min
for all 15 runs on this machine's 2 cores while other sweeps ran on them (the first budget took 4.6 min), less on
free cores.

  python tools/sweep.py configs/sweeps/isoflop.py                 # or configs/sweeps/isoflop.py:0.004 (the LR)
  python tools/fit_law.py --runs=runs/isoflop --law=isoflop       # a, b with 10-90% bootstrap intervals
  python tools/fit_law.py --runs=runs/isoflop --law=chinchilla    # Approach 3 on the same 15 runs
  python tools/report.py runs/isoflop                             # both, with plots and residuals: report.md
"""

import os

from maxscale import config, parameterization

BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "transfer_base.py")
WIDTHS = (16, 24, 32, 48, 64, 96, 128)
BUDGETS = (5e11, 1.5e12, 4.5e12)  # FLOPs, C = 6 N D; budget i trains WIDTHS[i : i + SIZES]
SIZES = 5
LR = 2.0**-7  # muP at base width 64: one LR for every size
WARMUP = 20
# Seconds per step, a + b x (flops_per_token x tokens per step), fitted to the 7 timed runs of budget 5e11 (widths
# 16 .. 128) on this machine's 2 CPU cores shared with other sweeps; only for the estimate printed by __main__.
STEP_S = (4.5e-3, 3.5e-11)
RUN_OVERHEAD_S = 5.0  # compile + final eval, per run in one sweep process


def base_config(lr: float = LR):
    base = config.resolve(config.load(BASE))
    base.parameterization.name = "mup"
    base.optimizer.lr = lr
    base.data.max_bytes = 0  # the whole stdlib corpus
    base.train.update(eval_steps=32, log_every=100)
    base.schedule.update(name="cosine", warmup_steps=WARMUP, final_lr_fraction=0.1)
    return base


def plan(lr: float = LR) -> list[dict]:
    """One row per run: budget C, width, N (non-embedding), steps, tokens D, the overrides and the resolved config."""
    from maxscale.model import transformer
    from maxscale.tools import sweep as sweep_lib

    base = base_config(lr)
    tokens_per_step = base.train.batch_size * base.data.seq_len
    rows = []
    for i, c in enumerate(BUDGETS):
        for w in WIDTHS[i : i + SIZES]:
            shape = parameterization.scale_shapes(base, width=w)
            cfg = config.resolve(sweep_lib.apply_overrides(base, shape))
            n = transformer.count_params(cfg)["non_embedding"]
            steps = max(int(round(c / (6 * n * tokens_per_step))), 2 * WARMUP)
            overrides = {**shape, "train.steps": steps, "train.eval_every": steps, "checkpoint.every": steps}
            rows.append(
                {
                    "C": c,
                    "width": w,
                    "N": n,
                    "steps": steps,
                    "D": steps * tokens_per_step,
                    "flops_per_token": transformer.flops_per_token(cfg),
                    "overrides": overrides,
                }
            )
    return rows


def get_sweep(arg: str = ""):
    lr = float(arg) if arg else LR
    return {"name": "isoflop", "config": base_config(lr), "points": [r["overrides"] for r in plan(lr)]}


def estimate_s(row: dict, tokens_per_step: int = 512) -> float:
    a, b = STEP_S
    return row["steps"] * (a + b * row["flops_per_token"] * tokens_per_step) + RUN_OVERHEAD_S


if __name__ == "__main__":
    total = 0.0
    print("      C  width        N   steps          D  D/N  est. s")
    for r in plan():
        s = estimate_s(r)
        total += s
        ratio = r["D"] / r["N"]
        print(f"{r['C']:.1e}  {r['width']:5d}  {r['N']:7d}  {r['steps']:6d}  {r['D']:9d}  {ratio:3.0f}  {s:6.0f}")
    print(f"{len(plan())} runs, estimated {total / 60:.0f} min on 2 busy CPU cores")
