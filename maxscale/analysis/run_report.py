"""report.py's sections for any run directory and any sweep, whatever it varies (report.py adds the sections of
specific sweep designs: transfer, scaling laws, LR horizon, ...).

  a single run (a directory with config.json or sweep_run.json):
    curves      train/eval loss, LR, gradient norm, MFU and tokens/s against the step (metrics.jsonl)
    MoE routing the moe/* metrics against the step, where the run logged them (MoE models)
    quant       the quant/* metrics (quantization errors) against the step, where logged
  a sweep:
    runs        every run ranked by final eval loss, with the fields that vary between them
    curves      eval (else train) loss against the step of each run (the 12 best when there are more)
    hyperparameters  final loss against each varying field (mean over seeds, one line per value of the others);
                when only one hyperparameter varies (e.g. an LR sweep), its optimum (quadratic refinement in log2, as
                transfer.py) with a 95% interval: a bootstrap over seeds with 2 or more, else the neighbouring grid
                points (the optimum lies between them)
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from maxscale import paths
from maxscale.analysis import plotstyle, transfer

CURVES = (("loss", ("train/loss", "eval/loss")), ("lr", ("lr",)), ("grad norm", ("grad_norm",)))
SPEED = ("mfu", "tokens_per_s")
MAX_CURVES = 12


class Skip(Exception):
    """This section does not apply; the message says why."""


def is_run(path: str) -> bool:
    return any(paths.as_path(os.path.join(path, f)).is_file() for f in ("config.json", "sweep_run.json"))


def read_metrics(run_dir: str) -> list[dict]:
    """metrics.jsonl's records (torn or non-JSON lines skipped)."""
    out = []
    try:
        with paths.as_path(os.path.join(run_dir, "metrics.jsonl")).open() as fh:  # a gs:// run too
            for line in fh:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict) and "step" in rec:
                    out.append(rec)
    except OSError:
        pass
    return out


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], float(r[key])) for r in records if isinstance(r.get(key), (int, float))]
    if key in SPEED:  # runs before 2026-12 wrote 0 at an attempt's first logged step (no rate yet): not drawn as a dip
        pts = [p for p in pts if p[1] > 0]
    return [p[0] for p in pts], [p[1] for p in pts]


def _last(records: list[dict], key: str):
    xs, ys = series(records, key)
    return (xs[-1], ys[-1]) if xs else (None, None)


def _panel(ax, records: list[dict], keys, title: str, log: bool = False) -> None:
    for i, k in enumerate(keys):
        xs, ys = series(records, k)
        if xs:
            ax.plot(xs, ys, label=k, lw=1.3, **plotstyle.series(i))
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step", fontsize=9)
    if log and all(v > 0 for k in keys for v in series(records, k)[1]):
        ax.set_yscale("log")
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    if len(keys) > 1:
        ax.legend(fontsize=7, ncol=1 + len(keys) // 10)


def plot_panels(path: str, records: list[dict], panels: list[tuple[str, tuple]]) -> None:
    from maxscale.analysis import runs as runs_lib

    plt = runs_lib.pyplot()
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    for ax, (title, keys) in zip(axes.flat, panels):
        _panel(ax, records, keys, title, log=title in ("loss", "grad norm"))
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=plotstyle.DPI)
    plt.close(fig)


def run_sections(ctx) -> list[tuple[str, str]]:
    """[(title, markdown)] of a single run: curves, then MoE routing and quantization errors where logged."""
    records = read_metrics(ctx.dir)
    if not records:
        raise Skip(f"{ctx.dir}: no metrics.jsonl records yet (the run has not logged a step)")
    keys = sorted(set().union(*records))
    panels = [(t, tuple(k for k in ks if k in keys)) for t, ks in CURVES]
    panels = [p for p in panels if p[1]] + [("MFU", ("mfu",)), ("tokens/s", ("tokens_per_s",))]
    plot_panels(ctx.path("curves"), records, panels)
    rows = ["| metric | last step | value |", "|---|---|---|"]
    for k in ("train/loss", "eval/loss", "lr", "grad_norm", "mfu", "tokens_per_s", "tokens_seen"):
        step, value = _last(records, k)
        if step is not None:
            rows.append(f"| {k} | {step} | {value:.6g} |")
    ctx.tables["curves"] = {k: _last(records, k) for k in keys}
    out = [
        ("Curves", "\n".join(rows) + "\n\n" + ctx.figure("curves", [ctx.run_id], "Loss, LR, gradient norm, speed. "))
    ]
    for title, prefix, name in (("MoE routing", "moe/", "moe"), ("Quantization errors", "quant/", "quant")):
        group = [k for k in keys if k.startswith(prefix)]
        if not group:
            ctx.skipped.append({"section": title, "reason": f"no {prefix}* metrics in metrics.jsonl"})
            continue
        chunks = [tuple(group[i : i + 8]) for i in range(0, len(group), 8)]
        plot_panels(ctx.path(name), records, [(f"{title} ({j + 1})", c) for j, c in enumerate(chunks)])
        last = [f"| {k} | {_last(records, k)[1]:.6g} |" for k in group]
        ctx.tables[name] = {k: _last(records, k) for k in group}
        text = "| metric | last value |\n|---|---|\n" + "\n".join(last) + "\n\n"
        out.append((title, text + ctx.figure(name, [ctx.run_id], f"{title} over training. ")))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Sweeps


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def runs_section(ctx) -> str:
    """Every run ranked by final eval loss (diverged and unfinished last), with the fields that vary."""
    order = {"done": 0, "diverged": 1, "unfinished": 2, "not run": 3}
    ranked = sorted(ctx.runs, key=lambda r: (order[r["status"]], r["loss"] if r["loss"] is not None else math.inf))
    fields = ctx.vary
    head = "| rank | run | " + " | ".join(f.split(".")[-1] for f in fields) + " | final eval/loss | status |"
    lines = [head, "|---" * (len(fields) + 4) + "|"]
    for i, r in enumerate(ranked):
        loss = "-" if r["loss"] is None else f"{r['loss']:.4f}"
        cells = " | ".join(_fmt(r["config"].get(f)) for f in fields)
        lines.append(f"| {i + 1} | {r['id']} | {cells} | {loss} | {r['status']} |")
    ctx.tables["runs"] = [{"id": r["id"], "loss": r["loss"], "status": r["status"]} for r in ranked]
    return "\n".join(lines) + "\n"


def sweep_curves_section(ctx) -> str:
    from maxscale.analysis import runs as runs_lib

    done = sorted((r for r in ctx.runs if r["loss"] is not None), key=lambda r: r["loss"])[:MAX_CURVES]
    if not done:
        raise Skip("no run has a final eval loss yet")
    plt, primary = runs_lib.pyplot(), primary_fields(ctx)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), squeeze=False)
    for i, r in enumerate(done):
        recs = read_metrics(os.path.join(ctx.dir, r["id"]))
        label = r["id"] + " " + " ".join(f"{f.split('.')[-1]}={_fmt(r['config'].get(f))}" for f in primary)
        for ax, key in zip(axes[0], ("train/loss", "eval/loss")):
            xs, ys = series(recs, key)
            ax.plot(xs, ys, lw=1.2, label=label, **plotstyle.series(i))
    for ax, key in zip(axes[0], ("train/loss", "eval/loss")):
        ax.set(xlabel="step", ylabel=key, yscale="log")
        ax.grid(alpha=0.3)
    axes[0, 1].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(ctx.path("sweep_curves"), dpi=plotstyle.DPI)
    plt.close(fig)
    note = f"The {len(done)} best runs. " if len(done) < len([r for r in ctx.runs if r["loss"] is not None]) else ""
    return ctx.figure("sweep_curves", [r["id"] for r in done], f"Train and eval loss over training. {note}")


def _numeric(runs: list[dict], field: str) -> bool:
    return (
        all(isinstance(r["config"].get(field), (int, float)) for r in runs) and field not in transfer.REPLICATE_FIELDS
    )


def _hp_curves(runs: list[dict], field: str, others: list[str]) -> dict:
    """{label of the other fields: (values, mean final loss over seeds or None)} of finished runs."""
    groups, order = {}, {}
    for r in runs:
        if r["status"] not in ("done", "diverged"):
            continue
        label = ", ".join(f"{f.split('.')[-1]}={_fmt(r['config'].get(f))}" for f in others) or "all"
        order[label] = tuple((str(type(v)), v) for v in (r["config"].get(f) for f in others))
        loss = r["loss"] if r["status"] == "done" else None
        groups.setdefault(label, {}).setdefault(r["config"][field], []).append(loss)
    out = {}
    for label, by_value in sorted(groups.items(), key=lambda kv: order[kv[0]]):
        xs = sorted(by_value)
        out[label] = (xs, [None if None in by_value[x] else float(np.mean(by_value[x])) for x in xs])
    return out


def optimum(ctx, field: str) -> dict:
    """The optimum of `field` when it is the only varying field besides seeds (transfer.py's refinement and, with
    two or more seeds, its bootstrap over seeds); the 95% interval, else the neighbouring grid points."""
    scale = "model.width"  # constant here: transfer's per-scale analysis over one scale
    ser = transfer._series([r for r in ctx.runs if r["status"] != "not run"], field, scale)
    curve = next(iter(ser["scales"].values()))
    o = dict(curve["optimum"])
    if o.get("log2_opt") is None:
        raise Skip(f"no finished run to locate the optimum of {field}")
    ci = o.get("log2_opt_ci")
    if ci:
        o["interval"], o["interval_kind"] = [2 ** ci[0], 2 ** ci[1]], f"95% bootstrap over {ser['seeds']} seeds"
    else:
        xs = curve["hp"]
        i = xs.index(o["grid_opt"]) if o.get("grid_opt") in xs else 0
        o["interval"] = [xs[max(i - 1, 0)], xs[min(i + 1, len(xs) - 1)]]
        o["interval_kind"] = "the neighbouring grid points (one seed: no bootstrap)"
    o["seeds"] = ser["seeds"]
    return o


def primary_fields(ctx) -> list[str]:
    """The varying fields that are set, not derived: hyperparameters first, then sizes, then the rest; a field that
    follows from one already kept (head_dim from width, base_* shapes) is left out. Seeds are replicates."""
    rank = {f: i for i, f in enumerate(transfer.HP_FIELDS + transfer.SCALE_FIELDS)}
    order = sorted((f for f in ctx.vary if f not in transfer.REPLICATE_FIELDS), key=lambda f: (rank.get(f, 99), f))
    kept: list[str] = []
    for f in order:
        if f.startswith("parameterization.base_") or any(transfer._determined_by(ctx.runs, f, (g,)) for g in kept):
            continue
        kept.append(f)
    return kept


def hp_section(ctx) -> str:
    primary = primary_fields(ctx)
    fields = [f for f in primary if _numeric(ctx.runs, f)][:3]
    if not fields:
        raise Skip("no numeric field varies besides seeds")
    from maxscale.analysis import runs as runs_lib

    plt = runs_lib.pyplot()
    fig, axes = plt.subplots(1, len(fields), figsize=(5.6 * len(fields), 4.4), squeeze=False)
    lines, tables = [], {}
    for ax, field in zip(axes[0], fields):
        others = [f for f in primary if f != field]
        curves = _hp_curves(ctx.runs, field, others)
        tables[field] = {k: {"values": v[0], "loss": v[1]} for k, v in curves.items()}
        for i, (label, (xs, ys)) in enumerate(curves.items()):
            ax.plot(xs, [np.nan if y is None else y for y in ys], lw=1.3, label=label, **plotstyle.series(i))
        positive = all(x > 0 for xs, _ in curves.values() for x in xs)
        ax.set(xlabel=field, ylabel="final eval/loss (mean over seeds)", xscale="log" if positive else "linear")
        ax.grid(alpha=0.3)
        if len(curves) > 1:  # below the axes: many series must not cover the curves
            ax.legend(fontsize=7, ncol=2 if len(curves) > 6 else 1, loc="upper center", bbox_to_anchor=(0.5, -0.16))
        if not others and field in transfer.HP_FIELDS and positive:
            o = optimum(ctx, field)
            tables[field]["optimum"] = o
            ax.axvline(o["opt"], color="grey", ls=":", lw=1)
            ax.axvspan(*o["interval"], color="grey", alpha=0.15)
            edge = " (on the grid's edge: the optimum may lie outside)" if o["at_edge"] else ""
            lines.append(
                f"Optimal {field}: {o['opt']:.4g} (grid best {o['grid_opt']:.4g}, loss {o['loss']:.4f}), interval "
                f"[{o['interval'][0]:.4g}, {o['interval'][1]:.4g}]: {o['interval_kind']}{edge}.\n"
            )
    fig.savefig(ctx.path("hyperparameters"), dpi=plotstyle.DPI, bbox_inches="tight")
    plt.close(fig)
    ctx.tables["hyperparameters"] = tables
    return (
        "\n".join(lines) + "\n" + ctx.figure("hyperparameters", ctx.used(), "Final eval loss vs each varying field. ")
    )


def describe(run_dir: str) -> str:
    """One line of a run's config: model size, parameterization, steps and LR."""
    cfg = transfer.read_json(os.path.join(run_dir, "config.json"))
    cfg = cfg or (transfer.read_json(os.path.join(run_dir, "sweep_run.json")) or {}).get("config") or {}
    f = transfer.flat(cfg)
    keys = (
        "model.width",
        "model.depth",
        "model.moe.num_experts",
        "parameterization.name",
        "train.steps",
        "optimizer.lr",
    )
    return ", ".join(f"{k.split('.')[-1]}={_fmt(f[k])}" for k in keys if k in f)
