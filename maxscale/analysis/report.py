"""One report of a run or a sweep: detects what it is and what the sweep varies, and writes report.md with the
sections that apply.

    python tools/report.py runs/<sweep> [--out=DIR]        (or runs/<run>: a single run)

writes report.md, report.json (every table, the skipped sections and, per figure, the run ids it was drawn from)
and the PNGs into DIR (default: the directory). A single run: its curves (loss, eval, LR, gradient norm, MFU,
tokens/s), MoE routing (moe/*) and quantization errors (quant/*) where logged (run_report.py). A sweep, always: the
runs ranked by final eval loss, their loss curves, final loss against each varying field and, when only one
hyperparameter varies, its optimum with an interval (run_report.py); then, where they apply:

  transfer                       a hyperparameter (transfer.HP_FIELDS) and a model size vary: optimum per size,
                                 drift in octaves (transfer.py)
  width consistency and spectra  runs differ in model.width and kept checkpoints: for each width family (runs that
                                 differ only in width and seed; with an HP grid, the HP value with the lowest mean
                                 loss), KL / top-1 agreement with the widest (consistency.py) and the top singular
                                 values of the hidden matrices over training (spectra.py); at most 4 families
  scaling laws                   model size and tokens vary: IsoFLOP (Approach 2) when >= 2 budgets C = 6 N D have
                                 >= 3 sizes each, and Chinchilla Approach 3 with its residuals from >= 6 (N, D)
                                 points; with an HP grid, each (N, D) takes its lowest loss over the grid
  LR horizon                     train.steps and an HP vary: eta*(T) ~ T^-xi with a 95% interval (horizon.py)
  schedules                      a schedule field and an HP vary: best loss per schedule at equal compute
  width and horizon              model.width, train.steps and an HP vary: best loss vs width per horizon and
                                 parameterization, where width starts to pay, narrow vs wide consistency
Sections that do not apply are listed with the reason; so is an analysis that fails on these runs.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from maxscale import cli
from maxscale.analysis import horizon, plotstyle, run_report, transfer
from maxscale.errors import ConfigError

SIZE_FIELDS = tuple(f for f in transfer.SCALE_FIELDS if f not in ("train.steps", "train.batch_size"))
TOKEN_FIELDS = ("train.steps", "train.batch_size", "data.seq_len")
MAX_FAMILIES = 4
IGNORED = ("checkpoint.", "train.log_every", "train.eval_every", "train.sample_", "mesh.", "distributed.")


class Skip(Exception):
    """This section does not apply; the message says why."""


class Context:
    """What every section reads: the runs, what varies, the output directory; and what the report collects."""

    def __init__(self, sweep_dir: str, out_dir: str):
        self.dir, self.out = sweep_dir, out_dir
        self.run_id, self.skipped = os.path.basename(os.path.normpath(sweep_dir)), []
        self.single = run_report.is_run(sweep_dir)
        self.runs = [] if self.single else transfer.load_runs(sweep_dir)
        self.vary = [f for f in transfer.varying(self.runs) if not f.startswith(IGNORED)]
        self.hp = next((f for f in transfer.HP_FIELDS if f in self.vary), None)
        self.sizes = [f for f in SIZE_FIELDS if f in self.vary]
        self.figures: dict[str, list[str]] = {}
        self.tables: dict[str, object] = {}

    def figure(self, name: str, ids, title: str = "") -> str:
        """Registers <name>.png with the run ids it was drawn from; returns its markdown (image and run list)."""
        ids = sorted(set(ids))
        self.figures[f"{name}.png"] = ids
        return f"![{name}]({name}.png)\n\n{title}Runs ({len(ids)}): {', '.join(ids)}\n"

    def path(self, name: str) -> str:
        return os.path.join(self.out, f"{name}.png")

    def used(self, runs=None) -> list[str]:
        """Ids of the runs an analysis reads: finished or diverged."""
        return [r["id"] for r in (self.runs if runs is None else runs) if r["status"] in ("done", "diverged")]


# ----------------------------------------------------------------------------------------------------------------
# Sections: each returns its markdown or raises Skip


def transfer_section(ctx: Context) -> str:
    if ctx.hp is None:
        raise Skip(f"no swept hyperparameter (none of {', '.join(transfer.HP_FIELDS[:4])}, ... varies)")
    if not ctx.sizes:
        if "train.steps" in ctx.vary:
            raise Skip("the scale axis is only train.steps (see LR horizon)")
        raise Skip(f"no model-size field varies ({', '.join(SIZE_FIELDS[:3])}, ...)")
    table = transfer.analyze(ctx.runs, ctx.hp, ctx.sizes[0])
    ctx.tables["transfer"] = table
    transfer.plot(table, ctx.path("transfer"))
    return transfer.markdown(table) + "\n" + ctx.figure("transfer", ctx.used())


def width_families(ctx: Context, runs: list[dict]) -> list[tuple[str, list[dict]]]:
    """[(label, runs)] of runs that differ only in width and seed, at most MAX_FAMILIES, with >= 2 widths each."""
    from maxscale.analysis import consistency

    free = set(consistency.WIDTH_FIELDS) | {consistency.SEED_FIELD, ctx.hp}
    key_fields = [f for f in ctx.vary if f not in free]
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault(tuple(repr(r["config"].get(f)) for f in key_fields), []).append(r)
    families = []
    for members in groups.values():
        if ctx.hp:  # the HP value with the most widths, then the lowest mean loss
            by_hp: dict = {}
            for r in members:
                by_hp.setdefault(r["config"][ctx.hp], []).append(r)
            members = min(by_hp.values(), key=lambda rs: (-_n_widths(rs), float(np.mean([r["loss"] for r in rs]))))
        if _n_widths(members) >= 2:
            c = members[0]["config"]
            label = ", ".join(f"{f.split('.')[-1]}={c.get(f)}" for f in key_fields + ([ctx.hp] if ctx.hp else []))
            families.append((label or "all", members))
    return families[:MAX_FAMILIES]


def _n_widths(runs: list[dict]) -> int:
    return len({r["config"].get("model.width") for r in runs})


def width_section(ctx: Context) -> str:
    if "model.width" not in ctx.vary:
        raise Skip("model.width does not vary")
    done = [r for r in ctx.runs if r["status"] == "done"]
    kept = [r for r in done if os.path.isdir(os.path.join(ctx.dir, r["id"], "checkpoints"))]
    if not kept:
        raise Skip(
            "no kept checkpoints (rerun the sweep with tools/sweep.py ... --keep_checkpoints, checkpoint.every < "
            "train.steps and checkpoint.max_to_keep large enough)"
        )
    families = width_families(ctx, kept)
    if not families:
        raise Skip("no two runs with kept checkpoints differ only in width and seed")
    from maxscale.analysis import consistency, spectra
    from maxscale.analysis import runs as runs_lib

    parts, tables = [], {}
    for k, (label, members) in enumerate(families):
        rs = [runs_lib.Run.open(os.path.join(ctx.dir, r["id"])) for r in members]
        ids = [r.id for r in rs]
        table = consistency.width_consistency(rs)
        consistency.plot(table, ctx.path(f"consistency_{k}"))
        trajs = [spectra.trajectory(r) for r in rs]
        spectra.plot_top_k(trajs, ctx.path(f"spectra_{k}"))
        tables[label] = {"consistency": table, "spectra": trajs}
        parts += [
            f"### Family {k}: {label}",
            "",
            consistency.markdown(table),
            ctx.figure(f"consistency_{k}", ids, "Width consistency. "),
            spectra.markdown(trajs),
            ctx.figure(f"spectra_{k}", ids, "Top singular values / init bulk edge over training. "),
        ]
    ctx.tables["width consistency and spectra"] = tables
    return "\n".join(parts)


def _tuned_points(ctx: Context) -> tuple[np.ndarray, ...]:
    """(N, D, loss, C, ids per point) of the finished high-precision runs; seeds averaged per (N, D, HP) and the
    lowest loss over the HP grid kept per (N, D)."""
    from maxscale.analysis import law_cli

    try:
        rows, _, _ = law_cli.read_sweep(ctx.dir)
    except (KeyError, TypeError) as e:
        raise Skip(f"incomplete run configs ({type(e).__name__}: {e}); count_params needs resolved ones") from None
    rows = [r for r in rows if all(math.isinf(r[c]) for c in law_cli.QUANT_FIELDS)]
    cells: dict = {}
    for r in rows:
        hp = transfer.flat(r["config"]).get(ctx.hp) if ctx.hp else None
        cells.setdefault((r["N"], r["D"]), {}).setdefault(hp, []).append(r)
    points = []
    for (n, d), by_hp in sorted(cells.items()):
        best = min(by_hp.values(), key=lambda rs: np.mean([r["loss"] for r in rs]))
        points.append((n, d, float(np.mean([r["loss"] for r in best])), 6 * n * d, [r["id"] for r in best]))
    if not points:
        raise Skip("no finished high-precision runs")
    N, D, L, C = (np.array([p[i] for p in points], np.float64) for i in range(4))
    return N, D, L, C, [p[4] for p in points]


def scaling_section(ctx: Context) -> str:
    if not ctx.sizes:
        raise Skip("no model-size field varies")
    if not any(f in ctx.vary for f in TOKEN_FIELDS):
        raise Skip("train.steps (and batch, seq_len) do not vary: every run has the same tokens D")
    from maxscale.analysis import scaling_laws

    N, D, L, C, ids = _tuned_points(ctx)
    out: dict = {"points": [{"N": n, "D": d, "loss": l, "C": c, "runs": i} for n, d, l, c, i in zip(N, D, L, C, ids)]}
    lines, notes = [], []
    iso = chin = None
    try:
        iso = scaling_laws.isoflop_fit(N, D, L, C, n_boot=200)
        out["isoflop"] = _isoflop_dict(iso)
        lines += _isoflop_markdown(iso)
    except ConfigError as e:
        notes.append(f"IsoFLOP skipped: {e}")
    if len(np.unique(N)) >= 2 and len(np.unique(D)) >= 2 and len(N) >= 6:
        chin = scaling_laws.fit_chinchilla(N, D, L, groups=N, n_boot=50)
        pred = scaling_laws.chinchilla_loss(chin.params, {"N": N, "D": D})
        out["chinchilla"] = {
            **chin.params,
            "ci": {k: list(v) for k, v in chin.ci.items()},
            "r2": chin.r2,
            "r2_heldout": chin.r2_heldout,
            **scaling_laws.allocation(chin.params),
            "residuals": (np.log(L) - np.log(pred)).tolist(),
        }
        lines += _chinchilla_markdown(out["chinchilla"], N, D, L, pred, ids)
    else:
        notes.append(f"Chinchilla Approach 3 skipped: {len(N)} (N, D) points, it needs >= 6 with 2+ sizes and tokens")
    if iso is None and chin is None:
        raise Skip("; ".join(notes))
    ctx.tables["scaling laws"] = out
    _plot_scaling(ctx.path("scaling_laws"), N, D, L, C, iso, out.get("chinchilla"))
    lines += [f"- {n}" for n in notes] + ["", ctx.figure("scaling_laws", [i for p in ids for i in p])]
    return "\n".join(lines)


def _isoflop_dict(iso) -> dict:
    budgets = [{k: getattr(m, k) for k in ("C", "N_opt", "D_opt", "L_min", "n_sizes", "flags")} for m in iso.budgets]
    return {"a": iso.a, "b": iso.b, "k_N": iso.k_N, "k_D": iso.k_D, "ci": iso.ci, "budgets": budgets}


def _isoflop_markdown(iso) -> list[str]:
    ci = {k: f" [{lo:.3f}, {hi:.3f}]" for k, (lo, hi) in iso.ci.items()}
    lines = [
        "IsoFLOP (Hoffmann Approach 2): per budget a parabola of loss vs ln N; N* = k_N C^a, D* = k_D C^b "
        "[10-90% bootstrap, runs resampled within budgets]",
        "",
        f"a = {iso.a:.3f}{ci.get('a', '')}, b = {iso.b:.3f}{ci.get('b', '')} (a + b = {iso.a + iso.b:.3f})",
        "",
        "| budget C (6ND) | N* | D* | D*/N* | L_min | sizes | flags |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in iso.budgets:
        lines.append(
            f"| {m.C:.3g} | {m.N_opt:.4g} | {m.D_opt:.4g} | {m.D_opt / m.N_opt:.1f} | {m.L_min:.4f} | "
            f"{m.n_sizes} | {', '.join(m.flags) or '-'} |"
        )
    return lines + [""]


def _chinchilla_markdown(fit: dict, N, D, L, pred, ids) -> list[str]:
    ci = fit["ci"]
    consts = ", ".join(f"{k} = {fit[k]:.4g} [{ci[k][0]:.3g}, {ci[k][1]:.3g}]" for k in ("E", "A", "B", "alpha", "beta"))
    r2h = "-" if fit["r2_heldout"] is None else f"{fit['r2_heldout']:.4f}"
    lines = [
        "Chinchilla Approach 3: L = E + A N^-alpha + B D^-beta (Huber on log L; [95% bootstrap])",
        "",
        f"{consts}; R^2 of log L {fit['r2']:.4f}, held out by size {r2h}; compute-optimal a = {fit['a']:.3f}, "
        f"b = {fit['b']:.3f}",
        "",
        "| runs | N | D | loss | fit | residual (log) |",
        "|---|---|---|---|---|---|",
    ]
    for n, d, l, p, i in zip(N, D, L, pred, ids):
        lines.append(f"| {', '.join(i)} | {n:.4g} | {d:.4g} | {l:.4f} | {p:.4f} | {math.log(l / p):+.4f} |")
    return lines + [""]


def _plot_scaling(path, N, D, L, C, iso, chin) -> None:
    from maxscale.analysis import runs as runs_lib
    from maxscale.analysis.scaling_laws import _budget_keys

    plt = runs_lib.pyplot()
    panels = (["isoflop", "optima"] if iso else []) + (["residuals"] if chin else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.0 * len(panels), 4.2), squeeze=False)
    ax = dict(zip(panels, axes[0]))
    keys = _budget_keys(C)
    cmap = plotstyle.colour
    for i, c in enumerate(np.unique(keys)):
        sel = keys == c
        if iso:
            ax["isoflop"].scatter(N[sel], L[sel], color=cmap(i), s=14, label=f"C={c:.2g}")
            m = next(m for m in iso.budgets if m.C == c)
            x = np.linspace(np.log(N[sel].min()), np.log(N[sel].max()), 50)
            ax["isoflop"].plot(np.exp(x), np.polyval(m.coeffs[::-1], x), color=cmap(i), lw=0.8)
            ax["isoflop"].scatter([m.N_opt], [m.L_min], marker="*", color=cmap(i), s=50)
        if chin:
            ax["residuals"].scatter(N[sel], np.asarray(chin["residuals"])[sel], color=cmap(i), s=14, label=f"C={c:.2g}")
    if iso:
        cs = np.array([m.C for m in iso.budgets])
        ax["optima"].scatter(cs, [m.N_opt for m in iso.budgets], color="C0", label=f"N*, a={iso.a:.2f}")
        ax["optima"].scatter(cs, [m.D_opt for m in iso.budgets], color="C1", label=f"D*, b={iso.b:.2f}")
        ax["optima"].plot(cs, iso.N_opt(cs), color="C0", lw=0.8)
        ax["optima"].plot(cs, iso.D_opt(cs), color="C1", lw=0.8)
        ax["optima"].set(xscale="log", yscale="log", xlabel="C = 6ND (FLOPs)")
        ax["optima"].minorticks_off()
        ax["isoflop"].set(xscale="log", xlabel="N (non-embedding)", ylabel="final eval/loss")
    if chin:
        ax["residuals"].axhline(0, color="grey", lw=0.5)
        ax["residuals"].set(xscale="log", xlabel="N (non-embedding)", ylabel="log L - log L_fit (Approach 3)")
    for a in axes[0]:
        a.legend(fontsize=6)
        a.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=plotstyle.DPI)
    plt.close(fig)


def horizon_section(ctx: Context) -> str:
    if ctx.hp is None:
        raise Skip("no swept hyperparameter (an LR grid at each horizon)")
    if "train.steps" not in ctx.vary:
        raise Skip("train.steps does not vary (one horizon)")
    h = horizon.analyze(ctx.runs, ctx.hp)
    ctx.tables["LR horizon"] = h
    horizon.plot(h, ctx.path("horizon"))
    transfer.plot(h["transfer"], ctx.path("horizon_curves"))
    return "\n".join(
        [
            horizon.markdown(h),
            ctx.figure("horizon", ctx.used(), "Optimal LR vs horizon with the fitted power law. "),
            ctx.figure("horizon_curves", ctx.used(), "Final loss vs LR, one curve per horizon. "),
        ]
    )


def schedule_section(ctx: Context) -> str:
    if not any(f.startswith(horizon.SCHEDULE) for f in ctx.vary):
        raise Skip("no schedule field varies (schedule.name, decay_fraction, ...)")
    if ctx.hp is None:
        raise Skip("no swept hyperparameter: each schedule must be tuned over an LR grid to compare them")
    s = horizon.schedules(ctx.runs, ctx.hp)
    ctx.tables["schedules"] = s
    horizon.schedule_plot(s, ctx.path("schedules"))
    ids = [i for rec in s["records"] for i in rec["runs"] if i in set(ctx.used())]
    return horizon.schedule_markdown(s) + "\n" + ctx.figure("schedules", ids, "Best loss per schedule vs horizon. ")


def width_horizon_section(ctx: Context) -> str:
    from maxscale.analysis import width_horizon

    try:
        return width_horizon.section(ctx)
    except width_horizon.Skip as e:
        raise Skip(str(e)) from None


def _sweep_section(fn):
    def section(ctx: Context) -> str:
        try:
            return fn(ctx)
        except run_report.Skip as e:
            raise Skip(str(e)) from None

    return section


SECTIONS = (
    ("runs", "Runs", run_report.runs_section),
    ("curves", "Loss curves", _sweep_section(run_report.sweep_curves_section)),
    ("hyperparameters", "Loss vs hyperparameters", _sweep_section(run_report.hp_section)),
    ("transfer", "Transfer", transfer_section),
    ("width consistency and spectra", "Width consistency and spectra", width_section),
    ("scaling laws", "Scaling laws", scaling_section),
    ("LR horizon", "LR horizon", horizon_section),
    ("schedules", "Schedules", schedule_section),
    ("width and horizon", "Width and horizon", width_horizon_section),
)


# ----------------------------------------------------------------------------------------------------------------
# The report


def report(sweep_dir: str, out_dir: str | None = None) -> dict:
    """Writes report.md, report.json and the PNGs of every section that applies; returns report.json's content."""
    from maxscale.analysis import runs as runs_lib

    out_dir = out_dir or sweep_dir
    ctx = Context(sweep_dir, out_dir)  # reads the runs first: a bad directory creates nothing
    os.makedirs(out_dir, exist_ok=True)
    applied, skipped, bodies = _single_run(ctx) if ctx.single else _sweep(ctx)
    skipped += ctx.skipped
    if ctx.single:
        what = f"A single run ({run_report.describe(ctx.dir)})."
    else:
        c = {s: sum(r["status"] == s for r in ctx.runs) for s in ("done", "diverged", "unfinished", "not run")}
        what = (
            f"{len(ctx.runs)} runs: {c['done']} finished, {c['diverged']} diverged, {c['unfinished']} unfinished, "
            f"{c['not run']} not run. Varying fields: {', '.join(ctx.vary) or 'none'}."
        )
    head = [f"# Report: {sweep_dir}", "", what, "", f"Sections: {', '.join(applied) or 'none'}. Skipped:", ""]
    head += [*[f"- {s['section']}: {s['reason']}" for s in skipped], ""]
    with open(os.path.join(out_dir, "report.md"), "w") as fh:
        fh.write("\n".join(head + bodies) + "\n")
    rep = {"sweep": sweep_dir, "sections": applied, "skipped": skipped, "figures": ctx.figures, "tables": ctx.tables}
    with open(os.path.join(out_dir, "report.json"), "w") as fh:
        json.dump(rep, fh, indent=1, default=runs_lib._plain)
    return rep


def _sweep(ctx: Context) -> tuple[list, list, list]:
    applied, skipped, bodies = [], [], []
    for name, title, section in SECTIONS:
        try:
            bodies.append(f"## {title}\n\n{section(ctx)}")
            applied.append(name)
        except (Skip, ConfigError) as e:
            skipped.append({"section": name, "reason": " ".join(str(e).split())})
    return applied, skipped, bodies


def _single_run(ctx: Context) -> tuple[list, list, list]:
    try:
        parts = run_report.run_sections(ctx)
    except run_report.Skip as e:
        return [], [{"section": "curves", "reason": str(e)}], []
    return [t.lower() for t, _ in parts], [], [f"## {t}\n\n{body}" for t, body in parts]


@cli.command("report")
def main(argv: list[str]) -> int:
    p = cli.Parser("report", __doc__)
    p.add_argument("sweep_dir", help="a sweep directory (runs/<sweep>) or a run directory (runs/<run>)")
    p.add_argument("--out", default=None, help="output directory (default: SWEEP_DIR)")
    args = p.parse(argv)
    rep = report(args.sweep_dir, args.out)
    out = args.out or args.sweep_dir
    print(f"sections: {', '.join(rep['sections']) or 'none'}")
    for s in rep["skipped"]:
        print(f"skipped {s['section']}: {s['reason']}")
    print(f"wrote {os.path.join(out, 'report.md')}, report.json and {len(rep['figures'])} PNG(s)")
    return 0
