"""Base tuning: rank the points of a random-search sweep by their eval loss averaged over seeds.

A point is one setting of the tuned fields (e.g. `configs/sweeps/base_tune.py`'s LR and multipliers); its runs
are the seeds it was trained with (REPLICATE_FIELDS). Diverged runs make the point's loss infinite; unfinished
ones are left out (and counted). `best_points` feeds the confirmation stage and the transfer sweep
(`configs/sweeps/width_tuned.py`); `python tools/tune_report.py runs/base_tune` prints the ranking.
"""

from __future__ import annotations

import math
import os

import numpy as np

from maxscale.analysis import runs as runs_lib
from maxscale.analysis import transfer
from maxscale.errors import ConfigError

# The base model's tuned hyperparameters (configs/sweeps/base_tune.py): the LR and the muP multipliers.
TUNED_FIELDS = (
    "optimizer.lr",
    "parameterization.output_mult",
    "parameterization.input_mult",
    "parameterization.init_std",
    "parameterization.embed_init_std",
    "parameterization.attn_mult",
)


def sweep_arguments(arg: str, defaults: dict, prog: str) -> dict:
    """The `FILE.py:key=value,...` argument of the tuning sweep files: `defaults` updated by it (values stay
    strings); ValueError naming `prog` and the keys it takes on an unknown key or an item without `=`."""
    out = dict(defaults)
    for item in filter(None, arg.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in out:
            raise ValueError(f"{prog}: unknown argument {item!r}; use {', '.join(k + '=' for k in out)}")
        out[key] = value
    return out


def best_tuned(sweep_dir: str, min_seeds: int = 3) -> dict:
    """The best point of TUNED_FIELDS in a base-tuning sweep among those with `min_seeds` finished seeds."""
    return best_points(sweep_dir, list(TUNED_FIELDS), k=1, min_seeds=min_seeds)[0]["point"]


def best_points(sweep_dir: str, fields: list[str], k: int = 0, min_seeds: int = 1) -> list[dict]:
    """[{point: {field: value}, mean, std, losses, seeds}] over the distinct settings of `fields`, best mean loss
    first (at most k of them when k > 0); points with fewer than `min_seeds` finished seeds are left out."""
    by_point: dict[tuple, list[float]] = {}
    for r in transfer.load_runs(sweep_dir):
        if r["status"] not in ("done", "diverged"):
            continue
        key = tuple(r["config"].get(f) for f in fields)
        by_point.setdefault(key, []).append(r["loss"] if r["status"] == "done" else math.inf)
    out = []
    for key, losses in by_point.items():
        if len(losses) < min_seeds:
            continue
        finite = np.isfinite(losses).all()
        out.append(
            {
                "point": dict(zip(fields, key, strict=True)),
                "mean": float(np.mean(losses)) if finite else math.inf,
                "std": float(np.std(losses, ddof=1)) if finite and len(losses) > 1 else 0.0,
                "losses": losses,
                "seeds": len(losses),
            }
        )
    if not out:
        raise ConfigError(f"{sweep_dir}: no finished run with {min_seeds}+ seeds; run the sweep first (tools/sweep.py)")
    out.sort(key=lambda b: (b["mean"], -b["seeds"]))
    return out[:k] if k > 0 else out


def markdown(best: list[dict], fields: list[str]) -> str:
    short = [f.split(".")[-1] for f in fields]
    lines = [
        "| rank | " + " | ".join(short) + " | eval loss (mean +- sd over seeds) | seeds |",
        "|" + "---|" * (len(fields) + 3),
    ]
    for i, b in enumerate(best, 1):
        vals = " | ".join(f"2^{math.log2(v):.2f}" if v and v > 0 else str(v) for v in b["point"].values())
        loss = f"{b['mean']:.4f} +- {b['std']:.4f}" if math.isfinite(b["mean"]) else "diverged"
        lines.append(f"| {i} | {vals} | {loss} | {b['seeds']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    p = runs_lib.parser("maxscale.analysis.tune", __doc__)
    p.add_argument("sweep_dir", help="a sweep directory, e.g. runs/base_tune")
    p.add_argument("--fields", default=",".join(transfer.HP_FIELDS[:6]), help="the tuned fields, comma-separated")
    p.add_argument("--top", type=int, default=10, help="rows shown (0 = all)")
    p.add_argument("--min_seeds", type=int, default=1, help="leave out points with fewer finished seeds")
    p.add_argument("--out", default="", help="also write tune.md and tune.json into this directory")

    def body(args):
        fields = [f for f in args.fields.split(",") if f]
        best = best_points(args.sweep_dir, fields, args.top, args.min_seeds)
        text = markdown(best, fields)
        print(text, end="")
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            runs_lib.write_outputs(args.out, "tune", {"fields": fields, "best": best}, text)

    return runs_lib.cli_main(p, argv, body)
