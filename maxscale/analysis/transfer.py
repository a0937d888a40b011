"""Transfer analysis: does the optimal hyperparameter move as the model grows?

Reads every run of a sweep directory (runs/<sweep>/<run-id>/: sweep_run.json or config.json, result.json,
metrics.jsonl), finds the fields that vary, and splits them into
  the swept hyperparameter   (`hp`, default: the first varying field of HP_FIELDS, e.g. optimizer.lr),
  the scale axis             (`scale`, default: the first varying field of SCALE_FIELDS, e.g. model.width),
  series                     (every other varying field that is not fixed by the scale, e.g. parameterization.name).
Per series and scale the optimum is the HP with the lowest final eval loss, refined by the vertex of a least-squares
parabola in log2(HP) through it and up to two grid points on each side (a single run per point is noisy; five
points average some of that out), kept within one grid step of the grid minimum. An optimum on the edge of the
grid, or next to a diverged run, is flagged: the true optimum may lie outside. The drift of a series is max - min
of log2(optimum) over its scales, in octaves (factors of 2). Seeds (REPLICATE_FIELDS: train.seed, data.seed) are
replicates, not series: the curve is the mean over seeds of each HP's loss (an HP at which any seed diverged counts as
diverged), and with two or more seeds a bootstrap over seeds (resampled jointly across scales, since a seed fixes the
data order at every scale) gives 95% intervals for each optimum, the drift and the slope, and for each pair of series
with the same seeds, the paired interval of their slopes' difference (do the two rules separate?). Diverged runs
(non-finite loss or worse than a uniform guess) are listed and plotted as crosses, never dropped silently; runs that
have not finished are counted as such.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from typing import Any

import numpy as np

from maxscale import cli, paths
from maxscale.analysis import plotstyle
from maxscale.errors import ConfigError

HP_FIELDS = (
    *("optimizer.lr", "parameterization.init_std", "parameterization.embed_init_std", "parameterization.output_mult"),
    *("parameterization.input_mult", "parameterization.attn_mult", "optimizer.weight_decay", "optimizer.eps"),
    *("optimizer.b2", "schedule.warmup_steps"),
)
SCALE_FIELDS = (
    *("model.width", "model.depth", "model.num_heads", "model.head_dim", "model.ffn_size", "model.moe.num_experts"),
    *("model.moe.expert_ffn_size", "train.steps", "train.batch_size"),
)
METRIC = "eval/loss"
REPLICATE_FIELDS = ("train.seed", "data.seed")
BOOTSTRAP = 400  # resamples of the seeds (fixed generator: the report is deterministic)


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
    return out


def read_json(path: str) -> Any:
    try:
        with paths.as_path(path).open() as fh:  # a gs:// run too
            return json.load(fh)
    except (OSError, ValueError):  # missing, unreadable, torn or not JSON
        return None


def _final_metric(run_dir: str, metric: str, steps: int) -> float | None:
    """The metric logged at the final step, from metrics.jsonl; None if the run did not get there."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    value = None
    with open(path) as fh:
        for line in fh:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if metric in rec and rec.get("step") == steps:
                value = rec[metric]
    return value


def load_runs(sweep_dir: str, metric: str = METRIC) -> list[dict]:
    """[{id, config (flat dict), loss, status}] for every run directory; status is done | diverged | unfinished."""
    if not os.path.isdir(sweep_dir):
        raise ConfigError(f"{sweep_dir!r} is not a directory; pass a sweep directory such as runs/width")
    index = read_json(os.path.join(sweep_dir, "sweep.json"))
    planned = {r["id"] for r in index["runs"]} if index else None
    runs = []
    for rid in sorted(os.listdir(sweep_dir)):
        d = os.path.join(sweep_dir, rid)
        if not os.path.isdir(d):
            continue
        if planned is not None and rid not in planned and not os.path.exists(os.path.join(d, "config.json")):
            continue  # planned by an earlier version of the sweep file and never started
        plan = read_json(os.path.join(d, "sweep_run.json"))
        cfg = plan["config"] if plan else read_json(os.path.join(d, "config.json"))
        if not cfg:
            continue
        flat_cfg = flat(cfg)
        steps = flat_cfg.get("train.steps")
        loss = _final_metric(d, metric, steps)
        started = os.path.exists(os.path.join(d, "config.json"))
        result = read_json(os.path.join(d, "result.json")) or {}
        if result.get("status") == "diverged":  # e.g. stopped at a non-finite loss before the final eval
            status = "diverged"
        elif loss is None:
            status = "unfinished" if started else "not run"
        else:
            vocab = flat_cfg.get("model.vocab_size", 256)
            status = "done" if math.isfinite(loss) and loss < math.log(vocab) else "diverged"
        runs.append({"id": rid, "config": flat_cfg, "loss": loss, "status": status})
    if not runs:
        raise ConfigError(f"{sweep_dir}: no run directories with a config; run the sweep first (tools/sweep.py)")
    return runs


def varying(runs: list[dict]) -> list[str]:
    keys = sorted(set().union(*(r["config"] for r in runs)))
    return [k for k in keys if len({repr(r["config"].get(k)) for r in runs}) > 1]


def _determined_by(runs: list[dict], field: str, by: tuple[str, ...]) -> bool:
    """Whether `field`'s value is a function of the fields `by` over these runs."""
    seen: dict = {}
    for r in runs:
        key = repr([r["config"].get(b) for b in by])
        if seen.setdefault(key, repr(r["config"].get(field))) != repr(r["config"].get(field)):
            return False
    return True


def choose_axes(runs: list[dict], hp: str | None = None, scale: str | None = None) -> tuple[str, str, list[str]]:
    """(hp field, scale field, series fields)."""
    vary = varying(runs)
    if hp is None:
        hp = next((f for f in HP_FIELDS if f in vary), None)
        if hp is None:
            raise ConfigError(f"no swept hyperparameter found among the varying fields {vary}; pass --hp=FIELD")
    if scale is None:
        scale = next((f for f in SCALE_FIELDS if f in vary and f != hp), None)
        if scale is None:
            raise ConfigError(f"no scale axis found among the varying fields {vary}; pass --scale=FIELD")
    for name, field in (("--hp", hp), ("--scale", scale)):
        if field not in vary:
            raise ConfigError(f"{name}={field} does not vary in this sweep; varying fields: {', '.join(vary)}")
    # series: the other varying fields, less those that follow from the scale and the remaining series fields
    # (e.g. num_heads and head_dim follow from the width and width_grows); model sizes go first. The parameterization
    # name always stays: it says the most (depth_mup's depth_alpha=-1, "the rule's", would not)
    series = [f for f in vary if f not in (hp, scale, *REPLICATE_FIELDS) and not f.startswith("parameterization.base_")]
    for f in sorted(series, key=lambda f: (not f.startswith("model."), f)):
        if f != "parameterization.name" and _determined_by(runs, f, (scale, *[g for g in series if g != f])):
            series.remove(f)
    return hp, scale, series


def optimum(hps: list[float], losses: list[float | None], half_window: int = 2) -> dict:
    """The optimum of one loss-vs-HP curve: grid argmin, refined by a least-squares parabola in log2(HP) over the
    argmin and up to `half_window` finite neighbours on each side. Points with loss None (diverged) end the window."""
    order = np.argsort(hps)
    x = np.log2(np.asarray(hps, np.float64)[order])
    y = np.array([np.nan if losses[i] is None else losses[i] for i in order], np.float64)
    ok = np.isfinite(y)
    if not ok.any():
        return {"log2_opt": None, "opt": None, "loss": None, "at_edge": False, "refined": False}
    i = int(np.nanargmin(y))
    res = {
        "log2_opt": float(x[i]),
        "loss": float(y[i]),
        "at_edge": i == 0 or i == len(x) - 1 or not (ok[i - 1] and ok[i + 1]),
        "refined": False,
        "grid_opt": float(2 ** x[i]),
    }
    if not res["at_edge"]:
        lo = hi = i
        while lo > 0 and i - lo < half_window and ok[lo - 1]:
            lo -= 1
        while hi < len(x) - 1 and hi - i < half_window and ok[hi + 1]:
            hi += 1
        a, b, _ = np.polyfit(x[lo : hi + 1], y[lo : hi + 1], 2)
        res["fit_points"] = hi - lo + 1
        if a > 0:
            vertex = float(np.clip(-b / (2 * a), x[i - 1], x[i + 1]))
            res.update(log2_opt=vertex, refined=True)
    res["opt"] = float(2 ** res["log2_opt"])
    return res


def _seed(r: dict) -> tuple:
    return tuple(r["config"].get(f) for f in REPLICATE_FIELDS)


def _mean_curve(loss_SH: np.ndarray, diverged_SH: np.ndarray) -> list[float | None]:
    """Mean over seeds (rows) per HP (column), ignoring missing (nan) runs; None where any seed diverged or none ran."""
    out = []
    for h in range(loss_SH.shape[1]):
        col = loss_SH[:, h]
        ok = np.isfinite(col)
        out.append(None if diverged_SH[:, h].any() or not ok.any() else float(col[ok].mean()))
    return out


def _series(members: list[dict], hp: str, scale: str) -> dict:
    seeds = sorted({_seed(r) for r in members}, key=repr)
    row = {sd: i for i, sd in enumerate(seeds)}
    per_scale, grids = {}, {}
    for s in sorted({r["config"][scale] for r in members}):
        at = [r for r in members if r["config"][scale] == s]
        done = [r for r in at if r["status"] in ("done", "diverged")]
        hps = sorted({r["config"][hp] for r in done})
        loss_SH = np.full((len(seeds), len(hps)), np.nan)
        diverged_SH = np.zeros((len(seeds), len(hps)), bool)
        for r in done:
            i, j = row[_seed(r)], hps.index(r["config"][hp])
            if r["status"] == "diverged":
                diverged_SH[i, j] = True
            else:
                loss_SH[i, j] = r["loss"]
        mean = _mean_curve(loss_SH, diverged_SH)
        curve = {
            "hp": hps,
            "loss": mean,
            "diverged": [m is None and diverged_SH[:, j].any() for j, m in enumerate(mean)],
            "seeds": int(np.isfinite(loss_SH).any(1).sum()),
            "loss_by_seed": [[None if not np.isfinite(v) else float(v) for v in rw] for rw in loss_SH],
            "unfinished": sum(r["status"] in ("unfinished", "not run") for r in at),
        }
        curve["optimum"] = optimum(hps, mean) if done else optimum([1.0], [None])
        per_scale[s], grids[s] = curve, (hps, loss_SH, diverged_SH)
    opts = [c["optimum"]["log2_opt"] for c in per_scale.values() if c["optimum"]["log2_opt"] is not None]
    scales = [s for s, c in per_scale.items() if c["optimum"]["log2_opt"] is not None]
    out = {
        "scales": per_scale,
        "seeds": len(seeds),
        "drift_octaves": float(max(opts) - min(opts)) if len(opts) >= 2 else None,
        "log2_opt_vs_log2_scale": (
            float(np.polyfit(np.log2(scales), opts, 1)[0])
            if len(opts) >= 2 and isinstance(scales[0], (int, float))
            else None
        ),
        "drift_ci": None,
        "any_at_edge": any(c["optimum"]["at_edge"] for c in per_scale.values()),
        "diverged": sum(sum(c["diverged"]) for c in per_scale.values()),
        "unfinished": sum(c["unfinished"] for c in per_scale.values()),
    }
    if len(seeds) >= 2:
        _bootstrap(out, grids, len(seeds))
        out["_seed_ids"] = repr(seeds)
    return out


def _bootstrap(series: dict, grids: dict, n_seeds: int) -> None:
    """95% intervals of each scale's log2 optimum and of the drift, resampling whole seeds (jointly at all scales)."""
    rng = np.random.default_rng(0)
    opts_BS = np.full((BOOTSTRAP, len(grids)), np.nan)
    for b in range(BOOTSTRAP):
        idx = rng.integers(0, n_seeds, n_seeds)
        for k, (hps, loss_SH, diverged_SH) in enumerate(grids.values()):
            if hps:
                o = optimum(hps, _mean_curve(loss_SH[idx], diverged_SH[idx]))["log2_opt"]
                opts_BS[b, k] = np.nan if o is None else o
    for k, curve in enumerate(series["scales"].values()):
        col = opts_BS[:, k][np.isfinite(opts_BS[:, k])]
        curve["optimum"]["log2_opt_ci"] = [float(q) for q in np.percentile(col, [2.5, 97.5])] if col.size else None
    ok = np.isfinite(opts_BS).sum(1) >= 2
    if ok.any():
        drift_B = np.nanmax(opts_BS[ok], 1) - np.nanmin(opts_BS[ok], 1)
        series["drift_ci"] = [float(q) for q in np.percentile(drift_B, [2.5, 97.5])]
    scales = list(series["scales"])
    if series["log2_opt_vs_log2_scale"] is not None and np.isfinite(opts_BS).all(1).any():
        x = np.log2(np.asarray(scales, np.float64))
        slope_B = np.array([np.polyfit(x, row, 1)[0] if np.isfinite(row).all() else np.nan for row in opts_BS])
        series["slope_ci"] = [float(q) for q in np.nanpercentile(slope_B, [2.5, 97.5])]
        series["_slope_B"] = slope_B  # draw b resampled the same seeds in every series: paired differences


def _slope_differences(series: dict) -> list[dict]:
    """Each pair of series with the same seeds: the difference of their slopes with a 95% interval over the same
    seed resamples (a seed fixes the init and the data order in both, so the pairing cancels their shared noise).
    An interval that excludes 0 says the two rules move the optimum differently with scale."""
    draws = {label: (s.pop("_seed_ids"), s.pop("_slope_B", None)) for label, s in series.items() if "_seed_ids" in s}
    out = []
    for a, b in itertools.combinations([k for k, (_, d) in draws.items() if d is not None], 2):
        d = draws[a][1] - draws[b][1]
        if draws[a][0] == draws[b][0] and np.isfinite(d).any():
            diff = series[a]["log2_opt_vs_log2_scale"] - series[b]["log2_opt_vs_log2_scale"]
            ci = [float(q) for q in np.nanpercentile(d, [2.5, 97.5])]
            out.append({"a": a, "b": b, "slope_difference": float(diff), "ci": ci})
    return out


def analyze(runs: list[dict], hp: str | None = None, scale: str | None = None) -> dict:
    hp, scale, series_fields = choose_axes(runs, hp, scale)
    table: dict = {
        "hp": hp,
        "scale": scale,
        "series_fields": series_fields,
        "series": {},
        "counts": {s: sum(r["status"] == s for r in runs) for s in ("done", "diverged", "unfinished", "not run")},
    }
    groups: dict = {}
    for r in runs:
        label = ", ".join(f"{f.split('.')[-1]}={r['config'].get(f)}" for f in series_fields) or "all"
        groups.setdefault(label, []).append(r)
    for label, members in sorted(groups.items()):
        table["series"][label] = _series(members, hp, scale)
    table["slope_differences"] = _slope_differences(table["series"])
    return table


# ----------------------------------------------------------------------------------------------------------------
# Outputs


def markdown(table: dict) -> str:
    hp, scale = table["hp"], table["scale"]
    hp_name, scale_name = hp.split(".")[-1], scale.split(".")[-1]
    lines = [
        f"Optimal {hp_name} per {scale_name} (final {METRIC}, mean over seeds; quadratic refinement in log2 "
        f"{hp_name}; * = optimum on the grid edge; [95% bootstrap interval over seeds] where there are 2 or more)",
        "",
    ]
    scales = sorted({s for ser in table["series"].values() for s in ser["scales"]})
    lines.append(
        "| series | "
        + " | ".join(f"{scale_name}={s}" for s in scales)
        + " | drift (octaves) | slope d log2 opt / d log2 scale | diverged | unfinished |"
    )
    lines.append("|---" * (len(scales) + 5) + "|")
    for label, ser in table["series"].items():
        cells = []
        for s in scales:
            c = ser["scales"].get(s)
            o = c["optimum"] if c else None
            if not o or o["log2_opt"] is None:
                cells.append("-")
            else:
                ci = o.get("log2_opt_ci")
                ci = f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""
                cells.append(f"2^{o['log2_opt']:.2f}{'*' if o['at_edge'] else ''}{ci} ({o['loss']:.3f})")
        drift = "-" if ser["drift_octaves"] is None else f"{ser['drift_octaves']:.2f}"
        if ser.get("drift_ci"):
            drift += f" [{ser['drift_ci'][0]:.2f}, {ser['drift_ci'][1]:.2f}]"
        slope = "-" if ser["log2_opt_vs_log2_scale"] is None else f"{ser['log2_opt_vs_log2_scale']:+.2f}"
        if ser.get("slope_ci"):
            slope += f" [{ser['slope_ci'][0]:+.2f}, {ser['slope_ci'][1]:+.2f}]"
        lines.append(
            f"| {label} | " + " | ".join(cells) + f" | {drift} | {slope} | {ser['diverged']} | {ser['unfinished']} |"
        )
    if table.get("slope_differences"):
        lines += [
            "",
            "Slope differences, paired over seeds (an interval without 0: the two move the optimum differently):",
        ]
        lines += [
            f"- {d['a']} - {d['b']}: {d['slope_difference']:+.2f} [{d['ci'][0]:+.2f}, {d['ci'][1]:+.2f}]"
            for d in table["slope_differences"]
        ]
    c = table["counts"]
    seeds = sorted({ser["seeds"] for ser in table["series"].values()})
    lines += [
        "",
        f"Seeds per series: {', '.join(map(str, seeds))}.",
        "",
        f"Runs: {c['done']} finished, {c['diverged']} diverged (plotted as x), {c['unfinished']} "
        f"unfinished, {c['not run']} not run.",
    ]
    return "\n".join(lines) + "\n"


def plot(table: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(table["series"])
    fig, axes = plt.subplots(1, len(labels), figsize=(5.0 * len(labels), 4.2), squeeze=False, sharey=True)
    finite = [
        l
        for ser in table["series"].values()
        for c in ser["scales"].values()
        for l, dv in zip(c["loss"], c["diverged"])
        if not dv and l is not None and math.isfinite(l)
    ]
    lo = min(finite) if finite else 0.0
    hi = min(lo + 1.2, max(finite)) + 0.02 if finite else 1.0  # higher losses are drawn at the top (^)
    for ax, label in zip(axes[0], labels):
        ser = table["series"][label]
        cmap = plotstyle.colour  # distinct colours, none pale on white
        for i, (s, c) in enumerate(ser["scales"].items()):
            xs = np.asarray(c["hp"], np.float64)
            ys = np.array([np.nan if (dv or l is None) else l for l, dv in zip(c["loss"], c["diverged"])])
            ax.plot(xs, np.minimum(ys, hi), lw=1.4, label=f"{s}", **plotstyle.series(i))
            clipped = ys > hi
            if clipped.any():
                ax.scatter(xs[clipped], np.full(clipped.sum(), hi), marker="^", color=cmap(i), s=14)
            bad = np.asarray(c["diverged"], bool)
            if bad.any():
                ax.scatter(xs[bad], np.full(bad.sum(), hi), marker="x", color=cmap(i), s=18)
            o = c["optimum"]
            if o["log2_opt"] is not None:
                ax.axvline(o["opt"], color=cmap(i), lw=0.6, ls=":")
        drift = ser["drift_octaves"]
        ax.set_title(f"{label}\ndrift {drift:.2f} octaves" if drift is not None else label, fontsize=8)
        ax.set_xscale("log", base=2)
        ax.set_ylim(lo - 0.02, hi + 0.02)
        ax.set_xlabel(table["hp"], fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(title=table["scale"].split(".")[-1], fontsize=6, title_fontsize=6)
    axes[0, 0].set_ylabel(f"final {METRIC} (x: diverged, ^: above the axis)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=plotstyle.DPI)
    plt.close(fig)


def report(sweep_dir: str, out_dir: str | None = None, hp: str | None = None, scale: str | None = None) -> dict:
    """Analyses `sweep_dir` and writes transfer.json, transfer.md and transfer.png to `out_dir` (default: it)."""
    out_dir = out_dir or sweep_dir
    table = analyze(load_runs(sweep_dir), hp, scale)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "transfer.json"), "w") as fh:
        json.dump(table, fh, indent=1, default=str)
    md = markdown(table)
    with open(os.path.join(out_dir, "transfer.md"), "w") as fh:
        fh.write(md)
    plot(table, os.path.join(out_dir, "transfer.png"))
    return table


@cli.command("transfer_report")
def main(argv: list[str]) -> int:
    """maxscale transfer-report runs/<sweep> [--hp=optimizer.lr] [--scale=model.width] [--out=DIR]"""
    p = cli.Parser("transfer_report", __doc__)
    p.add_argument("sweep_dir", help="a sweep directory, e.g. runs/width")
    p.add_argument("--hp", default=None, help="the tuned field (default: detected, e.g. optimizer.lr)")
    p.add_argument("--scale", default=None, help="the scale field (default: detected, e.g. model.width)")
    p.add_argument("--out", default=None, help="output directory (default: SWEEP_DIR)")
    args = p.parse(argv)
    table = report(args.sweep_dir, args.out, args.hp, args.scale)
    print(markdown(table), end="")
    print(f"wrote {os.path.join(args.out or args.sweep_dir, 'transfer.md')}, transfer.json and transfer.png")
    return 0
