"""Precision scaling laws of Kumar et al. 2024 ("Scaling Laws for Precision", arXiv 2411.04330). Imports no jax.

Units: N parameters, D tokens, P bits (P = inf means high precision), L loss in nats per token, C FLOPs.

Quantized training (law "precision"): L = A N_eff^-alpha + B D^-beta + E with
    N_eff = N * prod_{x in kinds} f_x(P_x),   f_x(P) = 1 - exp(-P / gamma_x + n_x),
kinds among w (weights), a (activations), kv (attention keys/values). A kind whose precision column is absent is
high precision (f = 1). Sign convention: the offset n_x ENTERS WITH A PLUS SIGN, i.e. f_x = 1 - e^{n_x} e^{-P/gamma_x}:
with the paper's Table 2 constants this gives the compute-optimal precision P* = 7.0 bits at every budget 1e19..1e23
FLOPs (precision.md: "with them the law gives P* ~ 7 bits ... without them about 3.5"); the minus sign gives P* at
the 3-bit floor, and a shift (P - n_x)/gamma_x gives 5.6. Where f_x <= 0 (e.g. P_a = 3 with Table 2's n_a: a run that
diverges) the law has no value and returns NaN; the fitter scores such points as bad.

PTQ (law "ptq"): degradation of a high-precision-trained model quantized to P_post bits after training,
    delta_PTQ = C_T exp(-P_post / gamma_post) D^gamma_D / N^gamma_N    (delta = loss after PTQ - loss before).
Compute model: C = (6/16) N D P (bits enter linearly; 16-bit training costs 6 N D).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from scipy.optimize import minimize_scalar

from maxscale.analysis.laws import FitResult, Law, fit_law

KINDS = ("w", "a", "kv")

# Kumar et al. Table 2 (integer runs, alpha = beta). gamma_post and offset are labels inferred in precision.md.
PAPER_TABLE2 = {
    "A": 4.299e3,
    "alpha": 0.4965,
    "B": 1.806e4,
    "beta": 0.4965,
    "E": 2.7648,
    "gamma_w": 2.6745,
    "n_w": 0.3037,
    "gamma_a": 2.2102,
    "n_a": 1.4072,
    "gamma_kv": 0.9578,
    "n_kv": 2.4185,
    "C_T": 0.0598,
    "gamma_D": 0.5068,
    "gamma_N": 0.3439,
    "gamma_post": 0.5907,
    "offset": 1.1277,
}

FLOPS_PER_PARAM_TOKEN_BIT = 6.0 / 16.0  # C = (6/16) N D P


def precision_factor(P: np.ndarray, gamma: object, n: object) -> np.ndarray:
    """f(P) = 1 - exp(-P/gamma + n) in (0, 1], NaN where the law gives f <= 0. P in bits (inf: f = 1)."""
    with np.errstate(over="ignore", invalid="ignore"):
        f = 1.0 - np.exp(-np.asarray(P, float) / gamma + n)
    return np.where(f > 0, f, np.nan)


def effective_params(params: Mapping[str, object], columns: Mapping[str, np.ndarray]) -> np.ndarray:
    """N_eff = N prod_x f_x(P_x) over the kinds with both a column P_x and a constant gamma_x."""
    n_eff = columns["N"]
    for kind in KINDS:
        if f"P_{kind}" in columns and f"gamma_{kind}" in params:
            n_eff = n_eff * precision_factor(columns[f"P_{kind}"], params[f"gamma_{kind}"], params[f"n_{kind}"])
    return n_eff


def precision_loss(params: Mapping[str, object], columns: Mapping[str, np.ndarray]) -> np.ndarray:
    """A N_eff^-alpha + B D^-beta + E; columns N, D and P_w / P_a / P_kv (bits), vectorised as laws.Law.predict."""
    p = params
    with np.errstate(invalid="ignore"):
        return (
            p["A"] * np.exp(-p["alpha"] * np.log(effective_params(p, columns)))
            + p["B"] * np.exp(-p["beta"] * np.log(columns["D"]))
            + p["E"]
        )


def precision_law(kinds: Sequence[str] = KINDS, tie: bool = True) -> Law:
    """The quantized-training law for the given precision kinds; tie=True fits beta = alpha (as the paper does).

    Start grid: alpha (and beta) 0.25..1 step 0.25 (0 and 2 dropped: never near Table 2, and each value multiplies
    the grid), log E -1..1 step 0.5, log A and log B 0..25 step 5; per kind gamma in {1, 2, 4} (log grid) and
    n in {0, 1, 2}. The product (720 x 9^kinds: 5.2e5 points for three kinds) is sampled down to laws.fit_law's
    max_grid (20,000) and L-BFGS-B runs from the 12 best."""
    kinds = tuple(kinds)
    if not kinds or any(k not in KINDS for k in kinds):
        raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {kinds}")
    params = ("A", "B", "E", "alpha", "beta") + tuple(f"{s}_{k}" for k in kinds for s in ("gamma", "n"))
    grid = {
        "alpha": np.arange(0.25, 1.01, 0.25),
        "beta": np.arange(0.25, 1.01, 0.25),
        "E": np.arange(-1.0, 1.01, 0.5),
        "A": np.arange(0.0, 25.1, 5.0),
        "B": np.arange(0.0, 25.1, 5.0),
    }
    for k in kinds:
        grid[f"gamma_{k}"] = np.log([1.0, 2.0, 4.0])
        grid[f"n_{k}"] = np.array([0.0, 1.0, 2.0])
    bounds = {"alpha": (0.0, 5.0), "beta": (0.0, 5.0)}
    bounds.update({f"gamma_{k}": (0.05, 50.0) for k in kinds})
    bounds.update({f"n_{k}": (-10.0, 10.0) for k in kinds})
    return Law(
        name="precision",
        params=params,
        columns=("N", "D") + tuple(f"P_{k}" for k in kinds),
        predict=precision_loss,
        start_grid=grid,
        positive=frozenset({"A", "B", "E"} | {f"gamma_{k}" for k in kinds}),
        bounds=bounds,
        tied={"beta": "alpha"} if tie else {},
    )


def fit_precision(
    N: Sequence[float],
    D: Sequence[float],
    loss: Sequence[float],
    precisions: Mapping[str, Sequence[float]],
    *,
    tie: bool = True,
    groups: Sequence | None = None,
    n_boot: int = 0,
    seed: int = 0,
) -> FitResult:
    """Fit the quantized-training law; precisions = {kind: bits per point} for the kinds that were quantized."""
    law = precision_law(tuple(k for k in KINDS if k in precisions), tie)
    cols = {"N": N, "D": D, **{f"P_{k}": v for k, v in precisions.items()}}
    return fit_law(law, cols, loss, groups=groups, n_boot=n_boot, seed=seed, n_starts=12)


def ptq_degradation(params: Mapping[str, object], columns: Mapping[str, np.ndarray]) -> np.ndarray:
    """delta_PTQ = C_T exp(-P_post/gamma_post) D^gamma_D / N^gamma_N; columns N, D, P_post (bits)."""
    p = params
    return p["C_T"] * np.exp(
        -columns["P_post"] / p["gamma_post"] + p["gamma_D"] * np.log(columns["D"]) - p["gamma_N"] * np.log(columns["N"])
    )


def ptq_law() -> Law:
    """The PTQ degradation law (its 'loss' is delta_PTQ > 0). Start grid: log C_T -8..4 step 2, gamma_post in
    {0.25, 0.5, 1, 2, 4} (log grid), gamma_D and gamma_N 0..1.5 step 0.25."""
    return Law(
        name="ptq",
        params=("C_T", "gamma_post", "gamma_D", "gamma_N"),
        columns=("N", "D", "P_post"),
        predict=ptq_degradation,
        start_grid={
            "C_T": np.arange(-8.0, 4.1, 2.0),
            "gamma_post": np.log([0.25, 0.5, 1.0, 2.0, 4.0]),
            "gamma_D": np.arange(0.0, 1.51, 0.25),
            "gamma_N": np.arange(0.0, 1.51, 0.25),
        },
        positive=frozenset({"C_T", "gamma_post"}),
        bounds={"gamma_post": (0.01, 100.0)},
    )


def fit_ptq(
    N: Sequence[float],
    D: Sequence[float],
    P_post: Sequence[float],
    delta: Sequence[float],
    *,
    groups: Sequence | None = None,
    n_boot: int = 0,
    seed: int = 0,
) -> FitResult:
    """Fit the PTQ law to points (N, D, P_post bits, delta = loss after PTQ - loss before, must be > 0)."""
    return fit_law(ptq_law(), {"N": N, "D": D, "P_post": P_post}, delta, groups=groups, n_boot=n_boot, seed=seed)


def _loss_at_budget(
    params: Mapping[str, float], kinds: Sequence[str], C: float, P: np.ndarray, ln_n: np.ndarray
) -> np.ndarray:
    """L with every kind in `kinds` at P bits, N = e^ln_n and D = C / ((6/16) N P); NaN where invalid."""
    n = np.exp(ln_n)
    cols = {"N": n, "D": C / (FLOPS_PER_PARAM_TOKEN_BIT * n * P)}
    cols.update({f"P_{k}": P + 0 * n for k in kinds})
    return precision_loss(params, cols)


def compute_optimal_precision(
    params: Mapping[str, float],
    C: float,
    kinds: Sequence[str] | None = None,
    p_range: tuple[float, float] = (3.0, 16.0),
    p_step: float = 0.05,
    n_range: tuple[float, float] = (1e3, 1e16),
) -> dict[str, float]:
    """Minimise the fitted L over (N, P) at budget C FLOPs with D = C / ((6/16) N P); all `kinds` (default: every
    kind with a gamma in params) trained at the same P, the others at high precision. P is continuous in p_range.

    Method: a vectorised (P, ln N) grid (P step p_step, 1,200 ln N points in n_range with D >= 1 token), then a
    nested bounded scalar refinement (P within one step, ln N within one grid cell) around the best cell.
    Returns {"P", "N", "D", "L"}."""
    kinds = tuple(k for k in KINDS if f"gamma_{k}" in params) if kinds is None else tuple(kinds)
    Ps = np.arange(p_range[0], p_range[1] + 1e-9, p_step)
    ln_ns = np.linspace(np.log(n_range[0]), np.log(n_range[1]), 1200)
    P_grid, ln_grid = np.meshgrid(Ps, ln_ns, indexing="ij")
    L = _loss_at_budget(params, kinds, C, P_grid, ln_grid)
    L = np.where(C / (FLOPS_PER_PARAM_TOKEN_BIT * np.exp(ln_grid) * P_grid) >= 1.0, L, np.nan)
    if not np.any(np.isfinite(L)):
        raise ValueError("the law has no valid value in p_range x n_range at this budget")
    i, j = np.unravel_index(np.nanargmin(L), L.shape)
    cell = ln_ns[1] - ln_ns[0]

    def best_n(P: float) -> tuple[float, float]:
        def f(x: float) -> float:
            v = float(_loss_at_budget(params, kinds, C, np.float64(P), np.float64(x)))
            return v if np.isfinite(v) else 1e300

        r = minimize_scalar(
            f, bounds=(ln_ns[j] - 2 * cell, ln_ns[j] + 2 * cell), method="bounded", options={"xatol": 1e-10}
        )
        return float(r.x), float(r.fun)

    p_lo, p_hi = max(p_range[0], Ps[i] - p_step), min(p_range[1], Ps[i] + p_step)
    r = minimize_scalar(lambda P: best_n(P)[1], bounds=(p_lo, p_hi), method="bounded", options={"xatol": 1e-6})
    P_star = float(r.x)
    ln_n, L_star = best_n(P_star)
    if L_star > L[i, j]:  # refinement wandered into an invalid region: keep the grid cell
        P_star, ln_n, L_star = float(Ps[i]), float(ln_ns[j]), float(L[i, j])
    N_star = float(np.exp(ln_n))
    return {"P": P_star, "N": N_star, "D": C / (FLOPS_PER_PARAM_TOKEN_BIT * N_star * P_star), "L": L_star}


def critical_data_size(
    base: Mapping[str, float], ptq: Mapping[str, float], N: float | np.ndarray, P_post: float | np.ndarray
) -> np.ndarray:
    """Critical data size for PTQ, in tokens: the D beyond which more pretraining data makes the model WORSE after
    post-training quantization to P_post bits.

    Loss after PTQ of a high-precision model: L_post(D) = E + A N^-alpha + B D^-beta + K D^gamma_D with
    K = C_T exp(-P_post/gamma_post) N^-gamma_N. d L_post / dD = 0 gives the closed form
        D_crit = (beta B / (gamma_D K))^(1 / (beta + gamma_D)),
    the minimum of L_post over D (for gamma_D > 0). base: B, beta of the precision/Chinchilla law; ptq: C_T,
    gamma_post, gamma_D, gamma_N. Vectorised in N and P_post."""
    K = ptq["C_T"] * np.exp(-np.asarray(P_post, float) / ptq["gamma_post"]) * np.asarray(N, float) ** -ptq["gamma_N"]
    return (base["beta"] * base["B"] / (ptq["gamma_D"] * K)) ** (1.0 / (base["beta"] + ptq["gamma_D"]))
