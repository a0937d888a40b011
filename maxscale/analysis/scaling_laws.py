"""Chinchilla scaling laws: Approach 3 (parametric fit) and Approach 2 (IsoFLOP parabolas), Hoffmann et al. 2022.

Units: N parameters, D tokens, C FLOPs with C = 6 N D, L loss in nats per token. Imports no jax.

Approach 3: L(N, D) = E + A N^-alpha + B D^-beta, fitted by `laws.fit_law` (Huber on log L, delta 1e-3) from the
start grid of precision.md: alpha, beta in 0..2 step 0.5; log E in -1..1 step 0.5; log A, log B in 0..25 step 5
(4,500 points free, 900 tied; the whole grid is scored in one vectorised pass, L-BFGS-B runs from its 10 best).
Compute-optimal allocation under C = 6 N D:
    N*(C) = G (C/6)^a,  D*(C) = G^-1 (C/6)^b,  a = beta/(alpha+beta),  b = alpha/(alpha+beta),
    G = (alpha A / (beta B))^(1/(alpha+beta)).

Approach 2: per compute budget, a parabola of L against ln N through that budget's runs; its vertex is N*(C) and
D*(C) = C / (6 N*); then ln N* = ln k_N + a ln C and ln D* = ln k_D + b ln C by least squares.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from maxscale.analysis.laws import FitResult, Law, fit_law
from maxscale.errors import ConfigError

CHINCHILLA_GRID = {
    "alpha": np.arange(0.0, 2.01, 0.5),
    "beta": np.arange(0.0, 2.01, 0.5),
    "E": np.arange(-1.0, 1.01, 0.5),  # log E
    "A": np.arange(0.0, 25.1, 5.0),  # log A
    "B": np.arange(0.0, 25.1, 5.0),  # log B
}


def chinchilla_loss(params: Mapping[str, object], columns: Mapping[str, np.ndarray]) -> np.ndarray:
    """E + A N^-alpha + B D^-beta; columns N (parameters) and D (tokens), vectorised as laws.Law.predict."""
    p = params
    return (
        p["E"]
        + p["A"] * np.exp(-p["alpha"] * np.log(columns["N"]))
        + p["B"] * np.exp(-p["beta"] * np.log(columns["D"]))
    )


def chinchilla_law(tie: bool = False) -> Law:
    """Approach 3 law; tie=True fits beta = alpha (as Kumar et al. do)."""
    return Law(
        name="chinchilla",
        params=("A", "B", "E", "alpha", "beta"),
        columns=("N", "D"),
        predict=chinchilla_loss,
        start_grid=CHINCHILLA_GRID,
        positive=frozenset({"A", "B", "E"}),
        bounds={"alpha": (0.0, 5.0), "beta": (0.0, 5.0)},
        tied={"beta": "alpha"} if tie else {},
    )


def fit_chinchilla(
    N: Sequence[float],
    D: Sequence[float],
    loss: Sequence[float],
    *,
    tie: bool = False,
    groups: Sequence | None = None,
    n_boot: int = 0,
    seed: int = 0,
) -> FitResult:
    """Approach 3 fit of runs (N[i], D[i], loss[i]); see laws.fit_law for groups / n_boot."""
    return fit_law(chinchilla_law(tie), {"N": N, "D": D}, loss, groups=groups, n_boot=n_boot, seed=seed)


def allocation(params: Mapping[str, float]) -> dict[str, float]:
    """Compute-optimal allocation of a Chinchilla law: exponents a (N*), b (D*) and prefactor G (see module doc)."""
    alpha, beta, A, B = params["alpha"], params["beta"], params["A"], params["B"]
    s = alpha + beta
    return {"a": beta / s, "b": alpha / s, "G": (alpha * A / (beta * B)) ** (1.0 / s)}


def compute_optimal(params: Mapping[str, float], C: float | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N*(C), D*(C)) for budget(s) C in FLOPs under C = 6 N D, from the closed form."""
    al = allocation(params)
    c6 = np.asarray(C, float) / 6.0
    return al["G"] * c6 ** al["a"], c6 ** al["b"] / al["G"]


@dataclass
class BudgetMinimum:
    """One IsoFLOP budget: the parabola L = c0 + c1 ln N + c2 (ln N)^2 and its vertex. flags: curvature<=0 (no
    minimum: budget dropped from the power-law fit), vertex-outside (N* outside the sampled sizes: extrapolated),
    off-centre (vertex in the outer fifth of the sampled ln N range: the parabola is biased there)."""

    C: float
    N_opt: float
    D_opt: float
    L_min: float
    coeffs: tuple[float, float, float]  # c0, c1, c2 of L vs ln N
    n_sizes: int
    N_range: tuple[float, float]
    flags: list[str] = field(default_factory=list)


@dataclass
class IsoFlopResult:
    """Approach 2: N* = k_N C^a, D* = k_D C^b (C in FLOPs); per-budget minima for plotting.
    ci: {"a": (lo, hi), "b": (lo, hi)} 10th-90th percentile bootstrap (runs resampled within budgets), if asked."""

    a: float
    b: float
    k_N: float
    k_D: float
    budgets: list[BudgetMinimum]
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)

    def N_opt(self, C: float | np.ndarray) -> np.ndarray:
        return self.k_N * np.asarray(C, float) ** self.a

    def D_opt(self, C: float | np.ndarray) -> np.ndarray:
        return self.k_D * np.asarray(C, float) ** self.b


BUDGET_RTOL = 0.02  # budgets within 2% are one: a sweep rounds train.steps, so its 6 N D misses the budget a little


def _budget_keys(C: np.ndarray) -> np.ndarray:
    """One key per budget: sorted values within BUDGET_RTOL of the smallest of their group are one budget, keyed by
    their geometric mean to 6 significant digits (C columns computed from N and rounded D carry rounding)."""
    C = np.asarray(C, float)
    order, keys, start = np.argsort(C), np.empty(len(C)), 0
    for i in range(1, len(C) + 1):
        if i == len(C) or C[order[i]] > C[order[start]] * (1 + BUDGET_RTOL):
            idx = order[start:i]
            keys[idx] = float(f"{np.exp(np.log(C[idx]).mean()):.6g}")
            start = i
    return keys


def _budget_minimum(C: float, N: np.ndarray, L: np.ndarray) -> BudgetMinimum:
    x = np.log(N)
    c2, c1, c0 = np.polyfit(x, L, 2)
    lo, hi = float(x.min()), float(x.max())
    flags = []
    if c2 <= 0:
        flags.append("curvature<=0")
        x_opt = x[np.argmin(L)]
    else:
        x_opt = -c1 / (2 * c2)
        if not lo <= x_opt <= hi:
            flags.append("vertex-outside")
        elif min(x_opt - lo, hi - x_opt) < 0.2 * (hi - lo):
            flags.append("off-centre")
    n_opt = float(np.exp(x_opt))
    return BudgetMinimum(
        C=C,
        N_opt=n_opt,
        D_opt=C / (6 * n_opt),
        L_min=float(c0 + c1 * x_opt + c2 * x_opt**2),
        coeffs=(float(c0), float(c1), float(c2)),
        n_sizes=len(np.unique(N)),
        N_range=(float(N.min()), float(N.max())),
        flags=flags,
    )


def _power_fit(budgets: list[BudgetMinimum]) -> tuple[float, float, float, float]:
    good = [m for m in budgets if "curvature<=0" not in m.flags]
    if len(good) < 2:
        raise ConfigError(
            f"only {len(good)} budget(s) with a minimum (positive curvature); the power-law fit needs "
            "at least 2: add budgets or sizes around each optimum"
        )
    lc = np.log([m.C for m in good])
    a, ln_kn = np.polyfit(lc, np.log([m.N_opt for m in good]), 1)
    b, ln_kd = np.polyfit(lc, np.log([m.D_opt for m in good]), 1)
    return float(a), float(b), float(np.exp(ln_kn)), float(np.exp(ln_kd))


def isoflop_fit(
    N: Sequence[float], D: Sequence[float], loss: Sequence[float], C: Sequence[float], *, n_boot: int = 0, seed: int = 0
) -> IsoFlopResult:
    """Approach 2 on runs (N[i] parameters, D[i] tokens, loss[i]) grouped by budget C[i] (FLOPs).

    D is only checked for shape (D* is C / (6 N*) by definition). Raises ConfigError for a budget with fewer than
    3 distinct sizes (a parabola needs 3)."""
    N, D, L, C = (np.asarray(v, float) for v in (N, D, loss, C))
    if not (N.shape == D.shape == L.shape == C.shape) or N.ndim != 1:
        raise ConfigError("N, D, loss and C must be columns of one length")
    keys = _budget_keys(C)
    groups = [(c, np.flatnonzero(keys == c)) for c in np.unique(keys)]
    for c, idx in groups:
        if len(np.unique(N[idx])) < 3:
            raise ConfigError(
                f"budget C={c:.4g} has {len(np.unique(N[idx]))} model size(s); a parabola needs at "
                "least 3: add sizes to that budget or drop it"
            )
    budgets = [_budget_minimum(c, N[idx], L[idx]) for c, idx in groups]
    result = IsoFlopResult(*_power_fit(budgets), budgets=budgets)
    if n_boot > 0:
        rng = np.random.default_rng(seed)
        draws = []
        for _ in range(n_boot):
            resampled = []
            for c, idx in groups:
                pick = rng.choice(idx, size=len(idx), replace=True)
                if len(np.unique(N[pick])) < 3:  # a degenerate resample has no parabola; keep the budget as is
                    pick = idx
                resampled.append(_budget_minimum(c, N[pick], L[pick]))
            try:
                draws.append(_power_fit(resampled)[:2])
            except ConfigError:
                continue
        if draws:
            arr = np.array(draws)
            result.ci = {
                name: (float(np.percentile(arr[:, i], 10)), float(np.percentile(arr[:, i], 90)))
                for i, name in enumerate(("a", "b"))
            }
    return result
