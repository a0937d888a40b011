"""Width consistency: do networks of different widths learn the same function? (Vyas et al. 2023)

    python -m maxscale.analysis.consistency SWEEP_DIR [--steps=0,50,100] [--eval_batches=N] [--out=DIR]
writes consistency.json, consistency.md and consistency.png.

The runs of a sweep must differ only in width (model.width and the sizes that follow it) and train.seed: same data
order (data.seed), horizon and hyperparameters. The reference is the widest run with the lowest seed. At each step
that every run has (0 is rebuilt from the seed; the others are kept checkpoints), every model predicts the next
token on the same fixed eval tokens (the reference's eval batches), and per token x, with p the reference's and q
a model's next-token distribution, z the log-probabilities centred over the vocabulary (= centred logits):
  kl          mean_x KL(p || q) = sum_v p_v (log p_v - log q_v)                                  (nats)
  top1        mean_x [argmax p == argmax q]: top-1 agreement
  logit_dist  mean_x mean_v (z_v - z_ref_v)^2: the squared distance of centred logits
  loss        mean_x -log q(next token): the model's eval loss on these tokens
kl and logit_dist are exactly 0, top1 exactly 1, for a model compared with itself. For each width with several
seeds, the ensemble q_ens = mean_e q_e (probabilities averaged) gives the same metrics, plus `member_kl` and
`member_loss` (means over the single members) and `seed_var`, mean_x (1/(E-1)) sum_e mean_v (z_e - z_mean)^2. The
bias of narrower width is the ensemble's kl, which averaging over seeds does not remove (convexity: kl <=
member_kl). Loss curves (eval/loss of metrics.jsonl) of every run are tabulated at the matched steps, with the gap
to the reference.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

import numpy as np

from maxscale.analysis import plotstyle, transfer
from maxscale.analysis import runs as runs_lib
from maxscale.errors import ConfigError
from maxscale.tools.sweep import NOT_HASHED

WIDTH_FIELDS = (
    "model.width",
    "model.ffn_size",
    "model.num_heads",
    "model.num_kv_heads",
    "model.head_dim",
    "model.moe.expert_ffn_size",
    "model.moe.shared_ffn_size",
)
SEED_FIELD = "train.seed"
METRICS = ("kl", "top1", "logit_dist", "loss")


# ----------------------------------------------------------------------------------------------------------------
# Distribution arithmetic (numpy, float64)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def kl(logp: np.ndarray, logq: np.ndarray) -> np.ndarray:
    """KL(p || q) per token from log-probabilities [..., V]; exactly 0 where logq == logp."""
    return np.sum(np.exp(logp) * (logp - logq), axis=-1)


def mixture(logps: list[np.ndarray]) -> np.ndarray:
    """log of the mean of the probabilities: the ensemble's log-probabilities."""
    stacked = np.stack(logps)
    top = stacked.max(0)
    return top + np.log(np.mean(np.exp(stacked - top), axis=0))


def centred(logp: np.ndarray) -> np.ndarray:
    return logp - logp.mean(-1, keepdims=True)


# ----------------------------------------------------------------------------------------------------------------
# Comparing predictors on fixed tokens


def compare(
    reference: str,
    predictors: dict[str, Callable[[np.ndarray], np.ndarray]],
    tokens: np.ndarray,
    ensembles: dict[str, list[str]] | None = None,
    chunk: int = 8,
) -> dict:
    """Metrics of every predictor (tokens_BT -> logits [B, T, V]) against `predictors[reference]` on `tokens`
    [N, T + 1] (inputs tokens[:, :-1], targets tokens[:, 1:]), `chunk` rows at a time; `ensembles` maps a label to
    the predictor labels averaged into it. Returns {"tokens", "models": {label: metrics}, "ensembles": {...}}."""
    ensembles = ensembles or {}
    tokens = np.asarray(tokens)
    sums = {k: dict.fromkeys(METRICS, 0.0) for k in predictors}
    ens_keys = METRICS + ("member_kl", "member_loss", "seed_var")
    ens_sums = {k: dict.fromkeys(ens_keys, 0.0) for k in ensembles}
    count = 0
    for i in range(0, len(tokens), chunk):
        x, y = tokens[i : i + chunk, :-1], tokens[i : i + chunk, 1:]
        logps = {k: log_softmax(f(x)) for k, f in predictors.items()}
        ref = logps[reference]
        ref_top, ref_z = ref.argmax(-1), centred(ref)
        stats = {}
        for k, lp in logps.items():
            stats[k] = _metrics(ref, ref_top, ref_z, lp, y)
            for m in METRICS:
                sums[k][m] += stats[k][m]
        for k, members in ensembles.items():
            ens = _metrics(ref, ref_top, ref_z, mixture([logps[m] for m in members]), y)
            for m in METRICS:
                ens_sums[k][m] += ens[m]
            ens_sums[k]["member_kl"] += np.mean([stats[m]["kl"] for m in members])
            ens_sums[k]["member_loss"] += np.mean([stats[m]["loss"] for m in members])
            if len(members) > 1:
                z = np.stack([centred(logps[m]) for m in members])
                var = np.sum((z - z.mean(0)) ** 2, axis=0).mean(-1) / (len(members) - 1)
                ens_sums[k]["seed_var"] += float(var.sum())
        count += y.size
    return {
        "tokens": count,
        "models": {k: {m: v / count for m, v in s.items()} for k, s in sums.items()},
        "ensembles": {
            k: {m: v / count for m, v in s.items()} | {"members": list(ensembles[k])} for k, s in ens_sums.items()
        },
    }


def _metrics(ref, ref_top, ref_z, lp, targets) -> dict:
    """Sums over the tokens of a chunk (divided by the count at the end)."""
    return {
        "kl": float(kl(ref, lp).sum()),
        "top1": float((lp.argmax(-1) == ref_top).sum()),
        "logit_dist": float(np.mean((centred(lp) - ref_z) ** 2, axis=-1).sum()),
        "loss": float(-np.take_along_axis(lp, targets[..., None], axis=-1).sum()),
    }


# ----------------------------------------------------------------------------------------------------------------
# Runs of one width family


def check_family(runs: list[runs_lib.Run], allow: tuple[str, ...] = ()) -> list[str]:
    """The fields that vary among `runs`; ConfigError if any is not a width size, train.seed, a field that does
    not change what a run computes (sweep.NOT_HASHED), or in `allow`."""
    vary = transfer.varying([{"config": r.flat_config()} for r in runs])
    ok = WIDTH_FIELDS + (SEED_FIELD,) + tuple(allow)
    bad = [f for f in vary if f not in ok and not any(f == n or f.startswith(n + ".") for n in NOT_HASHED)]
    if bad:
        raise ConfigError(
            f"these runs differ in more than width and seed: {', '.join(bad)}; compare runs of one width family "
            f"(same data order, horizon and hyperparameters), or pass --allow={','.join(bad)}"
        )
    return vary


def width_consistency(
    runs: list[runs_lib.Run],
    steps: list[int] | None = None,
    eval_batches: int = 0,
    allow: tuple[str, ...] = (),
) -> dict:
    """Every run against the widest (lowest seed) at the matched steps; ensembles per width with >= 2 seeds."""
    if len(runs) < 2:
        raise ConfigError(f"width consistency needs at least two runs, got {len(runs)}")
    check_family(runs, allow)
    info = {r.id: {"width": r.config.model.width, "seed": r.config.train.seed} for r in runs}
    runs = sorted(runs, key=lambda r: (-info[r.id]["width"], info[r.id]["seed"], r.id))
    ref = runs[0]
    common = sorted(set.intersection(*[{0, *r.steps()} for r in runs]))
    if steps is not None:
        missing = sorted(set(steps) - set(common))
        if missing:
            raise ConfigError(f"steps {missing} are not kept by every run; matched steps: {common}")
        common = sorted(steps)
    tokens = ref.eval_tokens(eval_batches)
    by_width = runs_lib.group(runs, "model.width")
    ensembles = {f"width {w}": [r.id for r in rs] for w, rs in by_width.items() if len(rs) > 1}
    per_step = {}
    for step in common:
        predictors = {r.id: r.predictor(step) for r in runs}
        per_step[step] = compare(ref.id, predictors, tokens, ensembles, chunk=ref.config.train.batch_size)
    return {
        "reference": ref.id,
        "runs": info,
        "steps": common,
        "per_step": per_step,
        "loss_curves": loss_curves(runs, ref),
    }


def loss_curves(runs: list[runs_lib.Run], ref: runs_lib.Run, metric: str = "eval/loss") -> dict:
    """{run id: {steps, loss, gap}}: the logged curve and its gap to the reference at the steps both logged."""
    ref_steps, ref_loss = ref.curve(metric)
    ref_at = dict(zip(ref_steps.tolist(), ref_loss.tolist()))
    out = {}
    for r in runs:
        steps, loss = r.curve(metric)
        gap = [(v - ref_at[s]) if s in ref_at else None for s, v in zip(steps.tolist(), loss.tolist())]
        out[r.id] = {"steps": steps.tolist(), "loss": loss.tolist(), "gap": gap}
    return out


# ----------------------------------------------------------------------------------------------------------------
# Outputs


def markdown(table: dict) -> str:
    info, ref = table["runs"], table["reference"]
    lines = [
        f"Width consistency against run {ref} (width {info[ref]['width']}, seed {info[ref]['seed']}): KL(ref || run) "
        "in nats per token, top-1 agreement, centred-logit distance, loss on the same eval tokens",
        "",
        "| step | run | width | seed | KL | top-1 | logit dist | loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for step, res in table["per_step"].items():
        for rid, m in res["models"].items():
            i = info[rid]
            lines.append(
                f"| {step} | {rid} | {i['width']} | {i['seed']} | {m['kl']:.5f} | {m['top1']:.4f} | "
                f"{m['logit_dist']:.5f} | {m['loss']:.4f} |"
            )
    if any(res["ensembles"] for res in table["per_step"].values()):
        lines += [
            "",
            "Ensembles (probabilities averaged over seeds) vs their single members: the ensemble's KL is the bias "
            "of narrower width, what averaging over seeds does not remove",
            "",
            "| step | ensemble | seeds | KL ensemble | KL single (mean) | loss ensemble | loss single (mean) | "
            "seed variance |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for step, res in table["per_step"].items():
            for label, e in res["ensembles"].items():
                lines.append(
                    f"| {step} | {label} | {len(e['members'])} | {e['kl']:.5f} | {e['member_kl']:.5f} | "
                    f"{e['loss']:.4f} | {e['member_loss']:.4f} | {e['seed_var']:.5f} |"
                )
    lines += [
        "",
        "Logged eval/loss and its gap to the reference (matched steps and the last)",
        "",
        "| run | width | seed | step | loss | gap |",
    ]
    lines.append("|---|---|---|---|---|---|")
    for rid, c in table["loss_curves"].items():
        shown = set(table["steps"]) | set(c["steps"][-1:])  # the matched steps and the last (all in the JSON)
        for s, l, g in zip(c["steps"], c["loss"], c["gap"]):
            if s not in shown:
                continue
            gap = "-" if g is None else f"{g:+.4f}"
            lines.append(f"| {rid} | {info[rid]['width']} | {info[rid]['seed']} | {s} | {l:.4f} | {gap} |")
    return "\n".join(lines) + "\n"


def plot(table: dict, path: str) -> None:
    """Three panels over steps: logged eval loss, KL to the reference, top-1 agreement; one colour per width."""
    plt = runs_lib.pyplot()
    info = table["runs"]
    style = runs_lib.WidthStyle(plt, [i["width"] for i in info.values()], [i["seed"] for i in info.values()])
    fig, axes = plt.subplots(1, 3, figsize=(14.0, 4.2))
    steps = table["steps"]
    for rid, i in info.items():
        kw = style(i["width"], i["seed"])
        label = f"width {i['width']}, seed {i['seed']}"
        c = table["loss_curves"][rid]
        axes[0].plot(c["steps"], c["loss"], label=label, **kw)
        if rid != table["reference"]:
            axes[1].plot(steps, [table["per_step"][s]["models"][rid]["kl"] for s in steps], marker=".", **kw)
            axes[2].plot(steps, [table["per_step"][s]["models"][rid]["top1"] for s in steps], marker=".", **kw)
    for ax, title in zip(axes, ("eval/loss", "KL(widest || run)", "top-1 agreement with the widest")):
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=plotstyle.DPI)
    plt.close(fig)


def report(sweep_dir: str, out_dir: str | None = None, steps=None, eval_batches: int = 0, allow=()) -> dict:
    table = width_consistency(runs_lib.list_runs(sweep_dir), steps, eval_batches, tuple(allow))
    out_dir = out_dir or sweep_dir
    runs_lib.write_outputs(out_dir, "consistency", table, markdown(table))
    plot(table, os.path.join(out_dir, "consistency.png"))
    return table


def main(argv: list[str]) -> int:
    p = runs_lib.parser("maxscale.analysis.consistency", __doc__)
    p.add_argument("sweep_dir", help="a sweep directory (runs/<sweep>) of one width family")
    p.add_argument("--steps", type=runs_lib.step_list, default=None, help="e.g. 0,50 (default: every matched)")
    p.add_argument("--eval_batches", type=int, default=0, help="eval batches (default: train.eval_steps)")
    p.add_argument("--allow", default="", help="comma-separated extra fields that may vary")
    p.add_argument("--out", default=None, help="output directory (default: SWEEP_DIR)")

    def body(args):
        allow = tuple(f for f in args.allow.split(",") if f)
        table = report(args.sweep_dir, args.out, args.steps, args.eval_batches, allow)
        print(markdown(table), end="")
        out = args.out or args.sweep_dir
        print(f"wrote {os.path.join(out, 'consistency.md')}, consistency.json and consistency.png")

    return runs_lib.cli_main(p, argv, body)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
