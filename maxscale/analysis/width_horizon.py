"""Width and horizon (issue #27): from which training horizon does the wider model win, under muP and under SP tuned
per width, and when do a narrow and a wide model start to disagree? (`configs/sweeps/horizon_width.py`)

For a sweep over (optimizer.lr, model.width, train.steps) x parameterization, every cell (series, horizon T, width)
is a small LR grid with seeds:

  best loss    the grid LR whose seed-mean final eval loss is lowest; its mean over seeds with a 95% interval
               +-1.96 s/sqrt(n), s the seed standard deviation pooled over the series' cells (the runs at each
               cell's best LR), so a one-seed cell gets an interval too
  optimal LR   the grid argmin and the parabola vertex of transfer.optimum (flagged when on the grid edge)
  width pays   at horizon T: the widest width's best loss is below the narrowest's by more than 1.96 standard
               errors of the difference; "pays from T" = the shortest horizon from which it holds at every longer
               horizon tried (None: it does not within the horizons tried); plus the least-squares slope of the best
               loss against log2 width (nats per doubling)
  muP vs SP    at every (T, width): muP - SP with its interval, and which is better beyond it

Width consistency (consistency.width_consistency on the runs that kept checkpoints: one parameterization and LR,
the narrowest and widest width, >= 2 seeds): at every kept step, the mean KL(widest seed 0 || run) of the narrowest
width's runs against the same for the widest width's other seeds (the seed floor), and the eval-loss gap narrow -
wide at every logged step. "Disagree from step s": from s on, at every later step, the narrow KL exceeds the seed
floor (predictions) and |gap| exceeds 1.96 standard errors from the seed spread (loss; > 0 with one seed per width).
"""

from __future__ import annotations

import math
import os

import numpy as np

from maxscale.analysis import plotstyle, transfer

WIDTH, STEPS, SERIES = "model.width", "train.steps", "parameterization.name"
Z = 1.96
NAMES = {"mup": "muP", "sp": "SP", "sp_tuned": "SP (tuned mults)"}


class Skip(Exception):
    """The section does not apply to these runs; the message says why."""


def series_label(cfg: dict) -> str:
    """mup, sp (multipliers 1) or sp_tuned (SP with tuned multipliers, as width_tuned.py's series)."""
    name = cfg.get(SERIES, "sp")
    return name + ("_tuned" if name != "mup" and cfg.get("parameterization.output_mult", 1.0) != 1.0 else "")


def _cell(members: list[dict], hp: str) -> dict:
    """One (series, T, width) cell: the seed-mean curve over its LRs, the best grid LR and its per-seed losses."""
    seeds = sorted({tuple(r["config"].get(f) for f in transfer.REPLICATE_FIELDS) for r in members}, key=repr)
    hps = sorted({r["config"][hp] for r in members})
    loss_SH = np.full((len(seeds), len(hps)), np.nan)
    diverged = np.zeros(len(hps), bool)
    for r in members:
        i = seeds.index(tuple(r["config"].get(f) for f in transfer.REPLICATE_FIELDS))
        j = hps.index(r["config"][hp])
        if r["status"] == "diverged":
            diverged[j] = True
        elif r["status"] == "done":
            loss_SH[i, j] = r["loss"]
    ok = np.isfinite(loss_SH)
    mean = [None if diverged[j] or not ok[:, j].any() else float(loss_SH[ok[:, j], j].mean()) for j in range(len(hps))]
    out = {"lrs": hps, "mean_curve": mean, "runs": [r["id"] for r in members]}
    if all(m is None for m in mean):
        return {**out, "loss": None, "n": 0, "losses": [], "best_lr": None, "optimum": None}
    finite = [k for k, m in enumerate(mean) if m is not None]
    j = min(finite, key=lambda k: mean[k])
    losses = [float(v) for v in loss_SH[ok[:, j], j]]
    opt = transfer.optimum(hps, mean)
    return {
        **out,
        "loss": mean[j],
        "losses": losses,
        "n": len(losses),
        "sd": float(np.std(losses, ddof=1)) if len(losses) > 1 else None,
        "best_lr": hps[j],
        "best_at_edge": j in (finite[0], finite[-1]),  # a bound: a better LR may lie outside the finished grid
        "optimum": {"log2_opt": opt["log2_opt"], "at_edge": opt["at_edge"], "refined": opt["refined"]},
    }


def _pooled_sd(cells: list[dict]) -> float | None:
    num = sum((c["n"] - 1) * c["sd"] ** 2 for c in cells if c["n"] > 1)
    dof = sum(c["n"] - 1 for c in cells if c["n"] > 1)
    return math.sqrt(num / dof) if dof else None


def analyze(runs: list[dict], hp: str = "optimizer.lr") -> dict:
    """{series: {T: {width: cell}}, pooled_sd, verdict: {series: {T: ...}, pays_from}, vs_sp: {T: {width: ...}}}."""
    vary = transfer.varying(runs)
    for f in (WIDTH, STEPS, hp):
        if f not in vary:
            raise Skip(f"{f} does not vary (needs an LR grid at two or more widths and horizons)")
    groups: dict = {}
    for r in runs:
        c = r["config"]
        groups.setdefault((series_label(c), c[STEPS], c[WIDTH]), []).append(r)
    table: dict = {}
    for (s, T, w), members in sorted(groups.items()):
        table.setdefault(s, {}).setdefault(T, {})[w] = _cell(members, hp)
    pooled = {s: _pooled_sd([c for by_w in t.values() for c in by_w.values()]) for s, t in table.items()}
    for s, by_T in table.items():
        for by_w in by_T.values():
            for c in by_w.values():
                c["se"] = pooled[s] / math.sqrt(c["n"]) if pooled[s] is not None and c["n"] else None
    verdict = {s: _verdict(by_T) for s, by_T in table.items()}
    return {"hp": hp, "series": table, "pooled_sd": pooled, "verdict": verdict, "vs_sp": _vs_sp(table)}


def _diff(a: dict, b: dict) -> tuple[float | None, float | None]:
    """a - b and its standard error (None where either is missing)."""
    if a.get("loss") is None or b.get("loss") is None:
        return None, None
    se = math.sqrt(a["se"] ** 2 + b["se"] ** 2) if a["se"] is not None and b["se"] is not None else None
    return a["loss"] - b["loss"], se


def _verdict(by_T: dict) -> dict:
    """Per horizon: widest - narrowest with its interval, whether width pays, the slope per doubling; pays_from."""
    out: dict = {"horizons": {}}
    for T, by_w in sorted(by_T.items()):
        ws = sorted(w for w, c in by_w.items() if c["loss"] is not None)
        if len(ws) < 2:
            continue
        d, se = _diff(by_w[ws[-1]], by_w[ws[0]])
        slope = float(np.polyfit(np.log2(ws), [by_w[w]["loss"] for w in ws], 1)[0])
        pays = se is not None and d < -Z * se
        out["horizons"][T] = {"widths": [ws[0], ws[-1]], "diff": d, "se": se, "pays": pays, "slope": slope}
    hs = sorted(out["horizons"])
    out["pays_from"] = next((T for i, T in enumerate(hs) if all(out["horizons"][t]["pays"] for t in hs[i:])), None)
    return out


def _vs_sp(table: dict) -> dict:
    if "mup" not in table or "sp" not in table:
        return {}
    out: dict = {}
    for T, by_w in table["mup"].items():
        for w, c in by_w.items():
            other = table["sp"].get(T, {}).get(w)
            if other is None:
                continue
            d, se = _diff(c, other)
            if d is None:
                continue
            better = "tie" if se is None or abs(d) <= Z * se else ("muP" if d < 0 else "SP")
            out.setdefault(T, {})[w] = {"diff": d, "se": se, "better": better}
    return out


# ----------------------------------------------------------------------------------------------------------------
# Width consistency of the kept-checkpoint family


def consistency_summary(table: dict) -> dict:
    """Per kept step the narrow width's KL and top-1 against the widest seed 0 next to the seed floor (the widest
    width's other seeds), the eval-loss gap narrow - wide per logged step, and the steps from which they disagree."""
    info, ref = table["runs"], table["reference"]
    widths = sorted({i["width"] for i in info.values()})
    narrow = [r for r, i in info.items() if i["width"] == widths[0]]
    wide = [r for r, i in info.items() if i["width"] == widths[-1]]
    twins = [r for r in wide if r != ref]
    rows = []
    for s in table["steps"]:
        m = table["per_step"][s]["models"]
        rows.append(
            {
                "step": s,
                "kl_width": float(np.mean([m[r]["kl"] for r in narrow])),
                "kl_seed": float(np.mean([m[r]["kl"] for r in twins])) if twins else None,
                "top1_width": float(np.mean([m[r]["top1"] for r in narrow])),
                "top1_seed": float(np.mean([m[r]["top1"] for r in twins])) if twins else None,
            }
        )
    pred = [r["kl_seed"] is not None and r["kl_width"] > r["kl_seed"] for r in rows]
    gaps = _loss_gaps(table["loss_curves"], narrow, wide)
    return {
        "widths": [widths[0], widths[-1]],
        "reference": ref,
        "kept_steps": rows,
        "loss_gap": gaps,
        "predictions_disagree_from": _from(rows, pred),
        "loss_disagrees_from": _from(gaps, [g["disagree"] for g in gaps]),
    }


def _from(rows: list[dict], flags: list[bool]) -> int | None:
    """The first row's step from which every flag is true (None if the last is false)."""
    return next((rows[i]["step"] for i in range(len(rows)) if all(flags[i:])), None)


def _loss_gaps(curves: dict, narrow: list[str], wide: list[str]) -> list[dict]:
    steps = sorted(set.intersection(*[set(curves[r]["steps"]) for r in narrow + wide]))
    out = []
    for s in steps:
        a = [curves[r]["loss"][curves[r]["steps"].index(s)] for r in narrow]
        b = [curves[r]["loss"][curves[r]["steps"].index(s)] for r in wide]
        gap = float(np.mean(a) - np.mean(b))
        var = (np.var(a, ddof=1) / len(a) if len(a) > 1 else 0.0) + (np.var(b, ddof=1) / len(b) if len(b) > 1 else 0.0)
        se = float(math.sqrt(var)) if len(a) > 1 and len(b) > 1 else None
        out.append({"step": s, "gap": gap, "se": se, "disagree": abs(gap) > (Z * se if se is not None else 0.0)})
    return out


# ----------------------------------------------------------------------------------------------------------------
# Outputs and the report section


def _fmt_cell(c: dict | None) -> str:
    if c is None or c.get("loss") is None:
        return "-"
    ci = f" +- {Z * c['se']:.3f}" if c.get("se") is not None else ""
    edge = "*" if c.get("best_at_edge") else ""
    return f"{c['loss']:.3f}{ci} ({c['n']}) @ 2^{math.log2(c['best_lr']):.2f}{edge}"


def _fmt_diff(d: float | None, se: float | None) -> str:
    if d is None:
        return "-"
    return f"{d:+.3f}" + (f" +- {Z * se:.3f}" if se is not None else "")


def statement(res: dict, series: str) -> str:
    v = res["verdict"].get(series)
    if not v or not v["horizons"]:
        return f"{NAMES.get(series, series)}: fewer than two widths at every horizon"
    hs = sorted(v["horizons"])
    w = v["horizons"][hs[0]]["widths"]
    if v["pays_from"] is None:
        return (
            f"{NAMES.get(series, series)}: width {w[1]} does not beat width {w[0]} beyond the interval at every "
            f"horizon from some T on, within the horizons tried (T = {', '.join(map(str, hs))})"
        )
    return f"{NAMES.get(series, series)}: width {w[1]} beats width {w[0]} from T = {v['pays_from']} steps on"


def markdown(res: dict) -> str:
    widths = sorted({w for by_T in res["series"].values() for by_w in by_T.values() for w in by_w})
    lines = [
        "Best final eval loss per cell: mean over seeds +- 95% interval (seed sd pooled over the series' cells), "
        "(seeds) @ the grid LR that gives it (* on the edge of the cell's LR grid: the loss is a bound); widest - "
        "narrowest with its interval; slope in nats per width doubling",
        "",
        "| series | T | " + " | ".join(f"width {w}" for w in widths) + " | widest - narrowest | slope | wider wins |",
        "|---|---|" + "---|" * len(widths) + "---|---|---|",
    ]
    for s, by_T in res["series"].items():
        for T, by_w in sorted(by_T.items()):
            v = res["verdict"][s]["horizons"].get(T, {})
            cells = " | ".join(_fmt_cell(by_w.get(w)) for w in widths)
            slope = f"{v['slope']:+.3f}" if v else "-"
            lines.append(
                f"| {NAMES.get(s, s)} | {T} | {cells} | {_fmt_diff(v.get('diff'), v.get('se'))} | {slope} | "
                f"{'yes' if v.get('pays') else 'no'} |"
            )
    lines += ["", *[f"- {statement(res, s)}" for s in res["series"]], ""]
    lines += ["Optimal LR (parabola vertex in log2 LR over the cell's grid; * = grid edge, a bound)", ""]
    lines += ["| series | T | " + " | ".join(f"width {w}" for w in widths) + " |", "|---|---|" + "---|" * len(widths)]
    for s, by_T in res["series"].items():
        for T, by_w in sorted(by_T.items()):
            opts = []
            for w in widths:
                o = (by_w.get(w) or {}).get("optimum")
                opts.append(
                    "-" if not o or o["log2_opt"] is None else f"2^{o['log2_opt']:.2f}{'*' if o['at_edge'] else ''}"
                )
            lines.append(f"| {NAMES.get(s, s)} | {T} | " + " | ".join(opts) + " |")
    if res["vs_sp"]:
        lines += ["", "muP - SP (best loss each; negative: muP better; the better one where beyond the interval)", ""]
        lines += ["| T | " + " | ".join(f"width {w}" for w in widths) + " |", "|---|" + "---|" * len(widths)]
        for T, by_w in sorted(res["vs_sp"].items()):
            row = [by_w.get(w) for w in widths]
            txt = ["-" if d is None else f"{_fmt_diff(d['diff'], d['se'])} ({d['better']})" for d in row]
            lines.append(f"| {T} | " + " | ".join(txt) + " |")
    return "\n".join(lines) + "\n"


def consistency_markdown(summ: dict) -> str:
    w0, w1 = summ["widths"]
    lines = [
        f"Width consistency, width {w0} against width {w1} (reference run {summ['reference']}): KL(ref || run) and "
        f"top-1 agreement of width {w0} next to the seed floor (width {w1}'s other seeds)",
        "",
        "| step | KL width | KL seed floor | top-1 width | top-1 seed floor |",
        "|---|---|---|---|---|",
    ]
    for r in summ["kept_steps"]:
        f = ["-" if r[k] is None else f"{r[k]:.4f}" for k in ("kl_width", "kl_seed", "top1_width", "top1_seed")]
        lines.append(f"| {r['step']} | " + " | ".join(f) + " |")
    lines += ["", f"| step | eval loss gap width {w0} - {w1} | 95% interval |", "|---|---|---|"]
    for g in summ["loss_gap"]:
        ci = "-" if g["se"] is None else f"{Z * g['se']:.4f}"
        lines.append(f"| {g['step']} | {g['gap']:+.4f} | {ci} |")
    p, lo = summ["predictions_disagree_from"], summ["loss_disagrees_from"]
    lines += [
        "",
        f"- predictions disagree beyond the seed floor from step: {p if p is not None else 'not by the last step'}",
        f"- eval losses disagree beyond their interval from step: {lo if lo is not None else 'not by the last step'}",
    ]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: str) -> None:
    """One panel per horizon: best loss vs width (log2), one line per series with its 95% interval."""
    from maxscale.analysis import runs as runs_lib

    plt = runs_lib.pyplot()
    horizons = sorted({T for by_T in res["series"].values() for T in by_T})
    fig, axes = plt.subplots(1, len(horizons), figsize=(4.2 * len(horizons), 3.8), squeeze=False)
    for ax, T in zip(axes[0], horizons):
        for k, (s, by_T) in enumerate(res["series"].items()):
            cells = sorted((w, c) for w, c in by_T.get(T, {}).items() if c["loss"] is not None)
            if not cells:
                continue
            err = [Z * c["se"] if c["se"] is not None else 0.0 for _, c in cells]
            ax.errorbar(
                [w for w, _ in cells],
                [c["loss"] for _, c in cells],
                yerr=err,
                marker="o",
                capsize=3,
                color=plotstyle.colour(k),
                label=NAMES.get(s, s),
            )
        ax.set(xscale="log", xlabel="width", title=f"T = {T} steps")
        ax.set_xticks(sorted({w for by_T in res["series"].values() for w in by_T.get(T, {})}))
        ax.get_xaxis().set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())
        ax.minorticks_off()
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("best final eval loss")
    fig.tight_layout()
    fig.savefig(path, dpi=plotstyle.DPI)
    plt.close(fig)


def _consistency_table(ctx) -> dict | None:
    """The consistency table of the kept-checkpoint family spanning the narrowest and widest width with >= 2 seeds
    at the widest (seeds may differ in data order too: data.seed is allowed to vary): the width section's when it
    has one, else computed here; None when there is no such family."""
    widths = {r["config"][WIDTH] for r in ctx.runs}
    span = {min(widths), max(widths)}

    def usable(ws: list) -> bool:
        return span <= set(ws) and ws.count(max(widths)) >= 2

    for fam in (ctx.tables.get("width consistency and spectra") or {}).values():
        if usable([i["width"] for i in fam["consistency"]["runs"].values()]):
            return fam["consistency"]
    from maxscale.analysis import consistency
    from maxscale.analysis import runs as runs_lib

    free = set(consistency.WIDTH_FIELDS) | set(transfer.REPLICATE_FIELDS)
    keys = [f for f in transfer.varying(ctx.runs) if f not in free and not f.startswith(("checkpoint.", "mesh."))]
    groups: dict = {}
    for r in ctx.runs:
        if r["status"] == "done" and os.path.isdir(os.path.join(ctx.dir, r["id"], "checkpoints")):
            groups.setdefault(tuple(repr(r["config"].get(f)) for f in keys), []).append(r)
    fams = [m for m in groups.values() if usable([r["config"][WIDTH] for r in m])]
    if not fams:
        return None
    members = max(fams, key=len)
    rs = [runs_lib.Run.open(os.path.join(ctx.dir, r["id"])) for r in members]
    return consistency.width_consistency(rs, allow=("data.seed",))


def section(ctx) -> str:
    """The report section (maxscale/analysis/report.py): the tables, the plot and the consistency summary."""
    res = analyze(ctx.runs, ctx.hp or "optimizer.lr")
    plot(res, ctx.path("width_horizon"))
    parts = [markdown(res), ctx.figure("width_horizon", ctx.used(), "Best loss vs width, one panel per horizon. ")]
    table = _consistency_table(ctx)
    if table is None:
        parts.append(
            "Width consistency: no kept-checkpoint family spans the narrowest and widest width with 2 seeds at the "
            "widest (horizon_width.py:consistency=T, --keep_checkpoints)"
        )
    else:
        res["consistency"] = consistency_summary(table)
        parts.append(consistency_markdown(res["consistency"]))
    ctx.tables["width and horizon"] = res
    return "\n".join(parts)
