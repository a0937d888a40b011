"""LR-horizon analysis: how the optimal learning rate moves with the training horizon T, and which schedule wins at
equal compute (Bordelon & Mori 2026, "Theory of optimal learning rate schedules and scaling laws for a random
feature model"; docs/analysis.md).

For a sweep over (optimizer.lr, train.steps) [x schedule x ...], `transfer.analyze` with scale = train.steps gives,
per series (the schedule and every other varying field) and horizon T, the optimal LR: the argmin of the final eval
loss over the LR grid (mean over seeds), refined by a parabola in log2 LR, with 95% bootstrap intervals over seeds
when there are two or more. On top of it:

  power law   eta*(T) = K T^-xi by least squares of log2 eta* on log2 T, over the horizons whose optimum is not on
              the edge of the LR grid (an edge optimum is a bound, not an estimate; if fewer than two are inside,
              all are used and the fit is flagged). 95% interval of xi: with >= 2 seeds, a bootstrap over seeds
              (whole seeds resampled jointly across horizons, as transfer's intervals; an LR at which any seed
              diverged stays diverged); with one seed, the least-squares t interval (>= 3 horizons).
  schedules   at each horizon (same steps, model and batch: equal compute) the best final loss of every schedule
              over the LR grid (the grid minimum of the mean over seeds) and the winner among the series that
              differ only in schedule fields (schedule.name, decay_fraction, power_chi, ...). A sweep with one
              horizon is compared the same way (the schedule field is then the scale axis of transfer.analyze).
"""

from __future__ import annotations

import math

import numpy as np

from maxscale.analysis import plotstyle, transfer
from maxscale.errors import ConfigError

STEPS = "train.steps"
SCHEDULE = "schedule."


def swept_hp(runs: list[dict], hp: str | None = None) -> str:
    """The swept hyperparameter: `hp`, else the first varying field of transfer.HP_FIELDS (ConfigError if none)."""
    vary = transfer.varying(runs)
    hp = hp or next((f for f in transfer.HP_FIELDS if f in vary), None)
    if hp is None or hp not in vary:
        raise ConfigError(f"no swept hyperparameter among the varying fields {vary}; sweep optimizer.lr")
    return hp


def members(runs: list[dict], table: dict) -> dict[str, list[dict]]:
    """{series label of `table` (a transfer.analyze result): its runs}."""
    out: dict[str, list[dict]] = {}
    for r in runs:
        label = ", ".join(f"{f.split('.')[-1]}={r['config'].get(f)}" for f in table["series_fields"]) or "all"
        out.setdefault(label, []).append(r)
    return out


# ----------------------------------------------------------------------------------------------------------------
# eta*(T) ~ T^-xi


def analyze(runs: list[dict], hp: str | None = None) -> dict:
    """{hp, transfer (the table of transfer.analyze with scale train.steps), series: {label: fit_series + runs}}."""
    hp = swept_hp(runs, hp)
    if STEPS not in transfer.varying(runs):
        raise ConfigError(f"{STEPS} does not vary: the horizon analysis needs runs at two or more horizons")
    table = transfer.analyze(runs, hp, STEPS)
    groups = members(runs, table)
    series = {
        label: {**fit_series(ser), "runs": sorted(r["id"] for r in groups[label])}
        for label, ser in table["series"].items()
    }
    return {"hp": hp, "transfer": table, "series": series}


def fit_series(ser: dict) -> dict:
    """xi, K (eta* = K T^-xi), the 95% interval of xi and how it was made, for one series of transfer.analyze."""
    pts = [(T, c["optimum"]) for T, c in ser["scales"].items() if c["optimum"]["log2_opt"] is not None]
    used = [(T, o) for T, o in pts if not o["at_edge"]]
    flags = []
    if len(used) < 2:
        used = pts
        flags.append("edge optima used")
    out = {"horizons": [T for T, _ in used], "n_horizons": len(pts), "xi": None, "K": None, "xi_ci": None}
    out.update(ci_method=None, flags=flags)
    if len(used) < 2:
        out["flags"] = flags + ["fewer than 2 horizons with an optimum"]
        return out
    x = np.log2([T for T, _ in used])
    y = np.array([o["log2_opt"] for _, o in used])
    slope, intercept = np.polyfit(x, y, 1)
    out.update(xi=float(-slope), K=float(2.0**intercept))
    if ser["seeds"] >= 2:
        out["xi_ci"], out["ci_method"] = _bootstrap_xi(ser, out["horizons"]), f"bootstrap over {ser['seeds']} seeds"
    elif len(used) >= 3:
        out["xi_ci"], out["ci_method"] = _t_interval(x, y), "least-squares t interval (1 seed)"
    return out


def _t_interval(x: np.ndarray, y: np.ndarray) -> list[float]:
    """95% interval of xi = -slope from the residuals of the straight-line fit (n - 2 degrees of freedom)."""
    from scipy import stats

    slope, intercept = np.polyfit(x, y, 1)
    resid = y - (slope * x + intercept)
    se = math.sqrt(float(resid @ resid) / (len(x) - 2) / float(((x - x.mean()) ** 2).sum()))
    half = float(stats.t.ppf(0.975, len(x) - 2)) * se
    return [float(-slope - half), float(-slope + half)]


def _bootstrap_xi(ser: dict, horizons: list) -> list[float] | None:
    """95% percentile interval of xi, resampling whole seeds jointly across the horizons."""
    grids = []
    for T in horizons:
        c = ser["scales"][T]
        loss_SH = np.array([[np.nan if v is None else v for v in row] for row in c["loss_by_seed"]], np.float64)
        diverged_SH = np.broadcast_to(np.asarray(c["diverged"], bool), loss_SH.shape)
        grids.append((c["hp"], loss_SH, diverged_SH))
    n, x = grids[0][1].shape[0], np.log2(horizons)
    rng = np.random.default_rng(0)
    xis = []
    for _ in range(transfer.BOOTSTRAP):
        idx = rng.integers(0, n, n)
        y = [transfer.optimum(h, transfer._mean_curve(l[idx], d[idx]))["log2_opt"] for h, l, d in grids]
        if None not in y:
            xis.append(-np.polyfit(x, y, 1)[0])
    return [float(q) for q in np.percentile(xis, [2.5, 97.5])] if xis else None


def markdown(h: dict) -> str:
    hp = h["hp"].split(".")[-1]
    lines = [
        f"Optimal {hp} vs horizon T (train.steps): eta*(T) = K T^-xi, least squares in log2 over the horizons whose "
        "optimum is inside the grid; [95% interval]",
        "",
        "| series | horizons fitted | xi | 95% interval of xi | K | flags |",
        "|---|---|---|---|---|---|",
    ]
    for label, s in h["series"].items():
        xi = "-" if s["xi"] is None else f"{s['xi']:.3f}"
        ci = f"[{s['xi_ci'][0]:.3f}, {s['xi_ci'][1]:.3f}] ({s['ci_method']})" if s["xi_ci"] else "-"
        k = "-" if s["K"] is None else f"{s['K']:.4g}"
        horizons = ", ".join(map(str, s["horizons"]))
        lines.append(f"| {label} | {horizons} | {xi} | {ci} | {k} | {', '.join(s['flags']) or '-'} |")
    return "\n".join(lines) + "\n\n" + transfer.markdown(h["transfer"])


def plot(h: dict, path: str) -> None:
    """eta* vs T (log-log) per series, with the 95% intervals of the optima and the fitted power law."""
    from maxscale.analysis import runs as runs_lib

    plt = runs_lib.pyplot()
    fig, ax = plt.subplots(figsize=(6.2, 4.6))
    cmap = plotstyle.colour
    for i, (label, s) in enumerate(h["series"].items()):
        scales = h["transfer"]["series"][label]["scales"]
        pts = [(T, c["optimum"]) for T, c in scales.items() if c["optimum"]["log2_opt"] is not None]
        if not pts:
            continue
        T = np.array([p[0] for p in pts], np.float64)
        y = np.array([p[1]["log2_opt"] for p in pts])
        ci = [p[1].get("log2_opt_ci") or [v, v] for p, v in zip(pts, y)]
        err = np.abs(np.array(ci).T - y)
        ax.errorbar(T, 2.0**y, yerr=2.0**y * (1 - 2.0**-err), fmt="o", ms=4, color=cmap(i % 10), capsize=2)
        edge = np.array([p[1]["at_edge"] for p in pts])
        ax.scatter(T[edge], 2.0 ** y[edge], marker="s", facecolors="none", edgecolors=cmap(i % 10), s=50)
        name = label if s["xi"] is None else f"{label}: xi={s['xi']:.2f}"
        if s["xi"] is not None:
            grid = np.geomspace(T.min(), T.max(), 20)
            ax.plot(grid, s["K"] * grid ** -s["xi"], color=cmap(i % 10), lw=1, label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("horizon T (train.steps)", fontsize=8)
    ax.set_ylabel(f"optimal {h['hp']} (square: on the grid edge)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=plotstyle.DPI)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# Schedules at equal compute


def schedules(runs: list[dict], hp: str | None = None) -> dict:
    """{hp, records: [{T, schedule, others, loss, opt, at_edge, runs}], best: [{T, others, schedule, loss}]}.
    A record is one schedule at one horizon: its best final loss over the LR grid. Raises ConfigError if no
    schedule field varies."""
    hp = swept_hp(runs, hp)
    vary = transfer.varying(runs)
    sched = [f for f in vary if f.startswith(SCHEDULE)]
    if not sched:
        raise ConfigError("no schedule field varies (schedule.name, decay_fraction, ...); nothing to compare")
    scale = STEPS if STEPS in vary else sched[0]
    table = transfer.analyze(runs, hp, scale)
    records = []
    for label, group in members(runs, table).items():
        for s, curve in table["series"][label]["scales"].items():
            at = [r for r in group if r["config"].get(scale) == s]
            o, c = curve["optimum"], at[0]["config"]
            records.append(
                {
                    "T": c.get(STEPS),
                    "schedule": _schedule_label(c, sched),
                    "others": ", ".join(f"{f}={c.get(f)}" for f in table["series_fields"] if f not in sched),
                    "loss": o["loss"],
                    "opt": o["opt"],
                    "at_edge": o["at_edge"],
                    "runs": sorted(r["id"] for r in at),
                }
            )
    best: dict = {}
    for rec in records:
        key = (rec["T"], rec["others"])
        if rec["loss"] is not None and (key not in best or rec["loss"] < best[key]["loss"]):
            best[key] = rec
    winners = [{k: v[k] for k in ("T", "others", "schedule", "loss")} for v in best.values()]
    return {"hp": hp, "records": records, "best": sorted(winners, key=lambda b: (b["T"] or 0, b["others"]))}


def _schedule_label(config: dict, fields: list[str]) -> str:
    """A schedule's label: its name, then its other varying fields ("wsd, decay_fraction=0.1")."""
    return ", ".join(
        str(config.get(f)) if f == "schedule.name" else f"{f[len(SCHEDULE) :]}={config.get(f)}" for f in fields
    )


def schedule_markdown(s: dict) -> str:
    names = list(dict.fromkeys(r["schedule"] for r in s["records"]))
    by = {(r["T"], r["others"], r["schedule"]): r for r in s["records"]}
    lines = [
        f"Best final {transfer.METRIC} of each schedule at equal compute (same horizon T, model and batch), over the "
        f"{s['hp'].split('.')[-1]} grid (mean over seeds; [optimal LR]; * = on the grid edge); best in bold",
        "",
        "| T | other fields | " + " | ".join(names) + " | best |",
        "|---" * (len(names) + 3) + "|",
    ]
    for b in s["best"]:
        T, others, winner = b["T"], b["others"], b["schedule"]
        cells = []
        for n in names:
            r = by.get((T, others, n))
            if r is None or r["loss"] is None:
                cells.append("-")
                continue
            cell = f"{r['loss']:.4f} [{r['opt']:.3g}{'*' if r['at_edge'] else ''}]"
            cells.append(f"**{cell}**" if n == winner else cell)
        lines.append(f"| {T} | {others or '-'} | " + " | ".join(cells) + f" | {winner} |")
    return "\n".join(lines) + "\n"


def schedule_plot(s: dict, path: str) -> None:
    """Best loss vs horizon, one line per schedule (one panel per value of the other fields)."""
    from maxscale.analysis import runs as runs_lib

    plt = runs_lib.pyplot()
    panels = list(dict.fromkeys(r["others"] for r in s["records"]))
    names = list(dict.fromkeys(r["schedule"] for r in s["records"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.4 * len(panels), 4.2), squeeze=False, sharey=True)
    cmap = plotstyle.colour
    for ax, panel in zip(axes[0], panels):
        for i, n in enumerate(names):
            rs = sorted((r for r in s["records"] if r["others"] == panel and r["schedule"] == n), key=lambda r: r["T"])
            rs = [r for r in rs if r["loss"] is not None]
            ax.plot([r["T"] for r in rs], [r["loss"] for r in rs], marker="o", ms=4, color=cmap(i % 10), label=n)
        ax.set_xscale("log", base=2)
        ax.set_title(panel or "all", fontsize=8)
        ax.set_xlabel("horizon T (train.steps)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    axes[0, 0].set_ylabel(f"best final {transfer.METRIC} over the LR grid", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=plotstyle.DPI)
    plt.close(fig)
