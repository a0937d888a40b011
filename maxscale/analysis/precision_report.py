"""Precision report of a sweep: the laws of Kumar et al. fitted to its runs, next to the paper's Table 2, with plots.

  python tools/precision_report.py runs/<sweep> [--out=DIR] [--boot=100]

Reads the sweep directory as `tools/fit_law.py --runs=` does (maxscale/analysis/law_cli.py `read_sweep`) and fits
  chinchilla   L = A N^-alpha + B D^-beta + E, alpha = beta, on the high-precision runs
  precision    N -> N_eff = N prod_x (1 - exp(-P_x / gamma_x + n_x)) for the kinds that vary, on every run
  ptq          delta = C_T exp(-P_post / gamma_post) D^gamma_D / N^gamma_N, on the ptq.json points (if any)
each with percentile-bootstrap 95% CIs and the leave-one-size-out R^2 of log L, and the compute-optimal precision P*
under C = (6/16) N D P. Writes precision.json, precision.md and five PNGs into --out (default: the sweep directory):

  precision_fit.png        predicted vs observed loss (precision law)
  precision_bits.png       loss vs weight bits, one line per model size, one panel per token count
  precision_neff.png       N_eff / N vs bits per kind: the fit, the paper, and each run's loss inverted
  precision_pstar.png      P* vs compute for the fit and for Table 2
  precision_ptq.png        PTQ degradation vs D / N per post-training bit width (if ptq.json points exist)
"""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import Sequence

import numpy as np

from maxscale import cli
from maxscale.analysis import law_cli, plotstyle, precision_laws, scaling_laws
from maxscale.analysis.laws import FitResult, fit_law

PAPER = precision_laws.PAPER_TABLE2
KIND_COLUMNS = {"w": "P_w", "a": "P_a", "kv": "P_kv"}
KIND_NAMES = {"w": "weights", "a": "activations", "kv": "KV / attention"}
PSTAR_BUDGETS = tuple(10.0**e for e in range(11, 24, 2))  # FLOPs: from this sweep's scale to the paper's
PSTAR_CI_BUDGET = 1e19  # FLOPs; with alpha = beta, P* does not depend on the budget (Kumar et al. sec. 4)


def _columns(rows: list[dict], names: Sequence[str]) -> dict[str, np.ndarray]:
    return {n: np.array([r[n] for r in rows], float) for n in names}


def _fit_summary(res: FitResult) -> dict:
    return {
        "params": res.params,
        "ci": {k: list(v) for k, v in res.ci.items()},
        "r2": res.r2,
        "r2_heldout": res.r2_heldout,
        "n_points": res.n_points,
    }


def fit_all(runs: list[dict], points: list[dict], n_boot: int = 100, seed: int = 0) -> dict:
    """The three fits (None where there are too few points) and P* at PSTAR_BUDGETS for the fit and the paper."""
    out: dict = {"kinds": [k for k, c in KIND_COLUMNS.items() if any(math.isfinite(r[c]) for r in runs)] or ["w"]}
    hp = [r for r in runs if all(math.isinf(r[c]) for c in KIND_COLUMNS.values())]
    sizes = lambda rows: np.array([r["N"] for r in rows])  # noqa: E731 - groups: leave one model size out
    out["chinchilla"] = None
    if len(hp) >= 5:
        res = fit_law(
            scaling_laws.chinchilla_law(tie=True),
            _columns(hp, ("N", "D")),
            [r["loss"] for r in hp],
            groups=sizes(hp),
            n_boot=n_boot,
            seed=seed,
        )
        out["chinchilla"] = _fit_summary(res)
    law = precision_laws.precision_law(tuple(out["kinds"]))
    cols = _columns(runs, ("N", "D") + tuple(KIND_COLUMNS[k] for k in out["kinds"]))
    res = fit_law(law, cols, [r["loss"] for r in runs], groups=sizes(runs), n_boot=n_boot, seed=seed, n_starts=12)
    out["precision"] = _fit_summary(res)
    out["pstar"] = {"fit": _pstar(res.params), "paper": _pstar(PAPER), "ci": _pstar_ci(res)}
    positive = [p for p in points if p["delta"] > 0]
    out["ptq"] = None
    if len(positive) >= 6:
        res = fit_law(
            precision_laws.ptq_law(),
            _columns(positive, ("N", "D", "P_post")),
            [p["delta"] for p in positive],
            groups=sizes(positive),
            n_boot=n_boot,
            seed=seed,
        )
        out["ptq"] = _fit_summary(res)
    out["ptq_points"] = {"total": len(points), "positive": len(positive)}
    return out


def _pstar_ci(res: FitResult, level: float = 0.95) -> list[float] | None:
    """Percentile interval of P* at PSTAR_CI_BUDGET over the bootstrap draws (None without draws)."""
    draws = []
    for i in range(len(next(iter(res.boot.values()), []))):
        try:
            draws.append(
                precision_laws.compute_optimal_precision({k: v[i] for k, v in res.boot.items()}, PSTAR_CI_BUDGET)["P"]
            )
        except ValueError:
            continue
    tail = 100 * (1 - level) / 2
    return [float(np.percentile(draws, tail)), float(np.percentile(draws, 100 - tail))] if draws else None


def _pstar(params: dict) -> list[dict]:
    rows = []
    for budget in PSTAR_BUDGETS:
        try:
            rows.append({"C": budget, **precision_laws.compute_optimal_precision(params, budget)})
        except ValueError:  # no valid point of the law at this budget
            continue
    return rows


# ----------------------------------------------------------------------------------------------------- markdown


def _constants_table(fit: dict, names: Sequence[str]) -> list[str]:
    lines = ["| constant | fit | 95% CI | paper (Table 2) |", "|---|---|---|---|"]
    for name in names:
        if name not in fit["params"]:
            continue
        lo, hi = fit["ci"].get(name, (None, None))
        ci = f"[{lo:.4g}, {hi:.4g}]" if lo is not None else "-"
        paper = f"{PAPER[name]:.4g}" if name in PAPER else "-"
        lines.append(f"| {name} | {fit['params'][name]:.4g} | {ci} | {paper} |")
    r2h = fit["r2_heldout"]
    lines += ["", f"{fit['n_points']} points; R^2 of log L {fit['r2']:.4f}; held-out R^2 (leave one size out) "]
    lines[-1] += "-" if r2h is None else f"{r2h:.4f}"
    return lines


def markdown(sweep_dir: str, runs: list[dict], skipped: dict, fits: dict) -> str:
    hp = sum(all(math.isinf(r[c]) for c in KIND_COLUMNS.values()) for r in runs)
    lines = [
        f"# Precision scaling laws: {sweep_dir}",
        "",
        f"{len(runs)} finished runs ({hp} high precision); skipped: {law_cli._skipped_text(skipped)}. "
        f"Kinds varied: {', '.join(KIND_NAMES[k] for k in fits['kinds'])}.",
        "",
        "## Chinchilla law on the high-precision runs (alpha = beta)",
        "",
    ]
    if fits["chinchilla"]:
        lines += _constants_table(fits["chinchilla"], ("A", "alpha", "B", "E"))
    else:
        lines.append("Too few high-precision runs (< 5).")
    lines += ["", "## Precision law on every run", ""]
    gammas = [f"{s}_{k}" for k in fits["kinds"] for s in ("gamma", "n")]
    lines += _constants_table(fits["precision"], ["A", "alpha", "B", "E", *gammas])
    ci = fits["pstar"]["ci"]
    ci_text = f"; 95% bootstrap CI of P* at C = {PSTAR_CI_BUDGET:.0e}: [{ci[0]:.2f}, {ci[1]:.2f}] bits" if ci else ""
    lines += ["", f"Compute-optimal precision (C = 6/16 N D P, every fitted kind at P bits){ci_text}:", ""]
    lines += ["| C (FLOPs) | P* fit | N* fit | P* paper | N* paper |", "|---|---|---|---|---|"]
    paper = {p["C"]: p for p in fits["pstar"]["paper"]}
    for p in fits["pstar"]["fit"]:
        q = paper.get(p["C"], {"P": math.nan, "N": math.nan})
        lines.append(f"| {p['C']:.0e} | {p['P']:.2f} | {p['N']:.3g} | {q['P']:.2f} | {q['N']:.3g} |")
    lines += ["", "## PTQ degradation law", ""]
    pts = fits["ptq_points"]
    if fits["ptq"]:
        lines += _constants_table(fits["ptq"], ("C_T", "gamma_post", "gamma_D", "gamma_N"))
        lines += ["", f"{pts['positive']} of {pts['total']} PTQ points have delta > 0 (the fit is in log delta)."]
    else:
        lines.append(f"Not fitted: {pts['positive']} PTQ points with delta > 0 (needs 6; run tools/ptq.py).")
    lines += ["", "## Figures", ""]
    for name in ("fit", "bits", "neff", "pstar", "ptq"):
        lines.append(f"![{name}](precision_{name}.png)")
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _predict(params: dict, rows: list[dict], kinds: Sequence[str]) -> np.ndarray:
    return precision_laws.precision_loss(params, _columns(rows, ("N", "D") + tuple(KIND_COLUMNS[k] for k in kinds)))


def plot_fit(runs: list[dict], fits: dict, path: str) -> None:
    plt = _pyplot()
    params, kinds = fits["precision"]["params"], fits["kinds"]
    pred, obs = _predict(params, runs, kinds), np.array([r["loss"] for r in runs])
    bits = np.array([min(min(r[c] for c in KIND_COLUMNS.values()), 17.0) for r in runs])
    fig, ax = plt.subplots(figsize=(4.2, 3.6))
    sc = ax.scatter(obs, pred, c=bits, cmap="viridis", s=16)
    fig.colorbar(sc, ax=ax, label="lowest precision of the run (bits; 17 = high)")
    lim = [min(obs.min(), np.nanmin(pred)) * 0.98, max(obs.max(), np.nanmax(pred)) * 1.02]
    ax.plot(lim, lim, "k:", lw=0.8)
    ax.set(xlabel="observed eval loss", ylabel="precision law", title=f"R^2 (log L) {fits['precision']['r2']:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=plotstyle.DPI)
    plt.close(fig)


def plot_bits(runs: list[dict], fits: dict, path: str) -> None:
    """Loss vs P_w (high precision drawn at HP_X) for the weight-precision runs, the law's curve through them."""
    plt = _pyplot()
    params, kinds = fits["precision"]["params"], fits["kinds"]
    w_runs = [r for r in runs if math.isinf(r["P_a"]) and math.isinf(r["P_kv"])]
    Ds, Ns = sorted({r["D"] for r in w_runs}), sorted({r["N"] for r in w_runs})
    finite = [r["P_w"] for r in w_runs if math.isfinite(r["P_w"])] or [8.0]
    hp_x = max(finite) + 2
    fig, axes = plt.subplots(1, len(Ds), figsize=(3.4 * len(Ds), 3.2), squeeze=False, sharey=True)
    cmap = plotstyle.colour
    for ax, D in zip(axes[0], Ds):
        for i, N in enumerate(Ns):
            pts = sorted((r["P_w"], r["loss"]) for r in w_runs if r["D"] == D and r["N"] == N)
            xs = [hp_x if math.isinf(p) else p for p, _ in pts]
            ax.plot(xs, [loss for _, loss in pts], "o", color=cmap(i), ms=4, label=f"N={N:.3g}")
            grid = np.linspace(min(finite), hp_x - 1, 60)
            rows = [{"N": N, "D": D, "P_w": p, "P_a": math.inf, "P_kv": math.inf} for p in grid]
            ax.plot(grid, _predict(params, rows, kinds), "-", color=cmap(i), lw=1)
            ax.plot([hp_x], _predict(params, [{**rows[0], "P_w": math.inf}], kinds), "_", color=cmap(i), ms=12)
        ax.set_xticks(sorted(set(finite)) + [hp_x], [f"{p:g}" for p in sorted(set(finite))] + ["hp"])
        ax.set(title=f"D = {D:.3g} tokens", xlabel="weight bits P_w")
        ax.legend(fontsize=6)
    axes[0, 0].set_ylabel("eval loss (points) and law (lines)")
    fig.tight_layout()
    fig.savefig(path, dpi=plotstyle.DPI)
    plt.close(fig)


def plot_neff(runs: list[dict], fits: dict, path: str) -> None:
    """f_x(P) = N_eff / N per kind (fit solid, paper dashed) and each single-kind run's loss inverted for N_eff."""
    plt = _pyplot()
    p = fits["precision"]["params"]
    grid = np.linspace(2.5, 12, 200)
    fig, ax = plt.subplots(figsize=(4.6, 3.4))
    for i, k in enumerate(fits["kinds"]):
        color = f"C{i}"
        ax.plot(grid, precision_laws.precision_factor(grid, p[f"gamma_{k}"], p[f"n_{k}"]), color=color, label=k)
        ax.plot(grid, precision_laws.precision_factor(grid, PAPER[f"gamma_{k}"], PAPER[f"n_{k}"]), "--", color=color)
        single = [r for r in runs if math.isfinite(r[KIND_COLUMNS[k]])]
        single = [r for r in single if all(math.isinf(r[c]) for kk, c in KIND_COLUMNS.items() if kk != k)]
        for r in single:  # L = A N_eff^-alpha + B D^-beta + E  ->  N_eff
            excess = r["loss"] - p["E"] - p["B"] * r["D"] ** -p["beta"]
            if excess > 0:
                ax.plot(r[KIND_COLUMNS[k]], (excess / p["A"]) ** (-1 / p["alpha"]) / r["N"], ".", color=color, ms=4)
    ax.axhline(1.0, color="k", lw=0.5)
    ax.set(xlabel="bits P", ylabel="N_eff / N", title="fit (solid), Table 2 (dashed), runs (dots)", ylim=(0, 1.6))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=plotstyle.DPI)
    plt.close(fig)


def plot_pstar(fits: dict, path: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.2, 3.2))
    for label, style in (("fit", "o-"), ("paper", "s--")):
        rows = fits["pstar"][label]
        ax.plot([r["C"] for r in rows], [r["P"] for r in rows], style, ms=4, label=label)
    if fits["pstar"]["ci"]:
        ax.axhspan(*fits["pstar"]["ci"], color="C0", alpha=0.15, label="fit, 95% bootstrap CI")
    ax.set(xscale="log", xlabel="compute C = 6/16 N D P (FLOPs)", ylabel="compute-optimal P* (bits)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=plotstyle.DPI)
    plt.close(fig)


def plot_ptq(points: list[dict], fits: dict, path: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.4, 3.4))
    bits = sorted({p["P_post"] for p in points})
    cmap = plotstyle.colour
    n_mid = float(np.median([p["N"] for p in points])) if points else 1.0
    for i, b in enumerate(bits):
        pts = [p for p in points if p["P_post"] == b and p["delta"] > 0]
        ratios = [p["D"] / p["N"] for p in pts]
        ax.plot(ratios, [p["delta"] for p in pts], "o", color=cmap(i), ms=4, label=f"{b:g} bits")
        if fits["ptq"] and pts:
            ratio = np.geomspace(min(ratios), max(ratios), 30)
            cols = {"N": np.full_like(ratio, n_mid), "D": ratio * n_mid, "P_post": np.full_like(ratio, b)}
            ax.plot(ratio, precision_laws.ptq_degradation(fits["ptq"]["params"], cols), "-", color=cmap(i), lw=1)
    ax.set(xscale="log", yscale="log", xlabel="tokens per parameter D / N", ylabel="delta loss after PTQ")
    from matplotlib import ticker

    ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))  # labels 0.2 0.5 1 2 5: a range of a decade
    ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_title(f"points: runs; lines: law at N = {n_mid:.3g}", fontsize=8)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=plotstyle.DPI)
    plt.close(fig)


# -------------------------------------------------------------------------------------------------------- entry


def report(sweep_dir: str, out_dir: str | None = None, n_boot: int = 100, seed: int = 0) -> dict:
    """Fits the sweep and writes precision.json, precision.md and the PNGs into out_dir (default sweep_dir)."""
    runs, points, skipped = law_cli.read_sweep(sweep_dir)
    fits = fit_all(runs, points, n_boot=n_boot, seed=seed)
    out_dir = out_dir or sweep_dir
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "precision.json"), "w") as fh:
        json.dump({**fits, "skipped": skipped}, fh, indent=1, default=float)
    with open(os.path.join(out_dir, "precision.md"), "w") as fh:
        fh.write(markdown(sweep_dir, runs, skipped, fits))
    plot_fit(runs, fits, os.path.join(out_dir, "precision_fit.png"))
    plot_bits(runs, fits, os.path.join(out_dir, "precision_bits.png"))
    plot_neff(runs, fits, os.path.join(out_dir, "precision_neff.png"))
    plot_pstar(fits, os.path.join(out_dir, "precision_pstar.png"))
    if points:
        plot_ptq(points, fits, os.path.join(out_dir, "precision_ptq.png"))
    return fits


@cli.command("precision_report")
def main(argv: Sequence[str]) -> int:
    p = cli.Parser("precision_report", __doc__)
    p.add_argument("sweep_dir", help="a sweep directory, e.g. runs/precision")
    p.add_argument("--out", default=None, help="output directory (default: SWEEP_DIR)")
    p.add_argument("--boot", type=_whole, default=100, help="bootstrap resamples for the 95%% CIs")
    p.add_argument("--seed", type=_whole, default=0, help="seed of the bootstrap")
    args = p.parse(argv)
    report(args.sweep_dir, args.out, args.boot, args.seed)
    print(f"wrote {os.path.join(args.out or args.sweep_dir, 'precision.md')} and its figures")
    return 0


def _whole(text: str) -> int:
    """argparse type: a whole number >= 0."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text}: expected a whole number >= 0")
    return int(text)
