"""A general fitter for loss laws: Huber on log-loss, L-BFGS-B from a grid of starts, bootstrap CIs, held-out R^2.

A law is data (`Law`): a name, parameter names, the data columns it reads, which parameters are positive (fitted
through their natural logs), a grid of starting points, optional bounds and ties, and a vectorised numpy function
`predict(params, columns) -> L`. `fit_law` minimises

    sum_i Huber_delta(log L_pred_i - log L_obs_i),   delta = 1e-3 (Hoffmann et al. 2022, Approach 3)

The whole start grid is scored in one vectorised pass (capped at `max_grid` points by a seeded random subset); L-BFGS-B
then runs from the `n_starts` best grid points only and the best end point wins. Gradients are central finite
differences, computed in one batched `predict` call of 2p+1 parameter sets (p free parameters).

`predict` contract: every parameter value is either a float or an array of shape (K, 1) (K parameter sets), every
column an array of shape (n,); the result broadcasts to (K, n) or (n,). Use numpy broadcasting only (no loops, no
`float()`), so that one call scores K parameter sets at once. Imports no jax: numpy and scipy only.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
from scipy.optimize import minimize

Predict = Callable[[Mapping[str, object], Mapping[str, np.ndarray]], np.ndarray]

BAD_RESIDUAL = 10.0  # log-loss residual given to a non-positive or non-finite prediction (and the clip for others)


@dataclass(frozen=True)
class Law:
    """A loss law as data.

    params: all parameter names, in report order. columns: the data columns `predict` reads.
    positive: parameters fitted through their natural log (their start grid is in log units).
    start_grid: {param: values} in the fitted space (log for positive parameters); tied parameters need none.
    bounds: {param: (lo, hi)} in natural units, None for open; for positive parameters lo must be > 0 or None.
    tied: {param: other} fixes param = other (e.g. {"beta": "alpha"}); `other` must itself be free.
    """

    name: str
    params: tuple[str, ...]
    columns: tuple[str, ...]
    predict: Predict
    start_grid: Mapping[str, Sequence[float]]
    positive: frozenset[str] = frozenset()
    bounds: Mapping[str, tuple[float | None, float | None]] = field(default_factory=dict)
    tied: Mapping[str, str] = field(default_factory=dict)

    @property
    def free(self) -> tuple[str, ...]:
        """The parameters the optimiser moves: every parameter that is not tied to another."""
        return tuple(p for p in self.params if p not in self.tied)

    def with_ties(self, tied: Mapping[str, str]) -> Law:
        """The same law with `tied` ({param: other}) replacing its ties."""
        return dataclasses.replace(self, tied=dict(tied))

    def check(self) -> None:
        """ValueError for a tie to an unknown or tied parameter, or a free parameter without start values."""
        for p, other in self.tied.items():
            if p not in self.params or other not in self.params or other in self.tied:
                raise ValueError(f"law {self.name}: bad tie {p} = {other}")
        missing = [p for p in self.free if p not in self.start_grid or len(self.start_grid[p]) == 0]
        if missing:
            raise ValueError(f"law {self.name}: no start grid for {missing}")


def huber(r: np.ndarray, delta: float) -> np.ndarray:
    """Huber_delta(r) elementwise: r^2 / 2 inside |r| <= delta, linear with slope delta outside."""
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def r_squared(log_obs: np.ndarray, log_pred: np.ndarray) -> float:
    """1 - SS_res / SS_tot of log L (SS_tot around the mean of the observations)."""
    ss_tot = float(np.sum((log_obs - log_obs.mean()) ** 2))
    ss_res = float(np.sum((log_obs - log_pred) ** 2))
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")


def natural_params(law: Law, theta: np.ndarray) -> dict[str, np.ndarray]:
    """Fitted-space vectors (..., p_free) -> {param: natural value}, ties filled in. Shapes follow theta[..., i]."""
    out = {}
    for i, name in enumerate(law.free):
        v = theta[..., i]
        with np.errstate(over="ignore"):  # a line search may probe huge logs; inf predictions get BAD_RESIDUAL
            out[name] = np.exp(v) if name in law.positive else v
    for name, other in law.tied.items():
        out[name] = out[other]
    return out


class _Objective:
    """Scaled Huber objective on one data subset; value_and_grad is what L-BFGS-B calls."""

    def __init__(self, law: Law, columns: Mapping[str, np.ndarray], loss: np.ndarray, delta: float):
        self.law, self.columns, self.delta = law, columns, delta
        self.log_obs = np.log(loss)
        self.n = len(loss)

    def residuals(self, thetas: np.ndarray) -> np.ndarray:
        """(K, p) parameter sets -> (K, n) log-loss residuals, clipped to +-BAD_RESIDUAL."""
        params = {k: v[:, None] for k, v in natural_params(self.law, thetas).items()}
        with np.errstate(all="ignore"):
            pred = np.broadcast_to(np.asarray(self.law.predict(params, self.columns), float), (len(thetas), self.n))
            r = np.log(pred) - self.log_obs
        return np.clip(np.nan_to_num(r, nan=BAD_RESIDUAL), -BAD_RESIDUAL, BAD_RESIDUAL)

    def values(self, thetas: np.ndarray) -> np.ndarray:
        """(K, p) -> (K,) sum of Huber losses (unscaled)."""
        return huber(self.residuals(thetas), self.delta).sum(axis=1)

    def value_and_grad(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        # Scaled by 1/delta^2 so that L-BFGS-B's relative tolerances do not stop it early on a tiny objective
        # (the failure Besiroglu et al. 2024 found in Hoffmann et al.'s fit).
        p = len(theta)
        step = 1e-6 * np.maximum(1.0, np.abs(theta))
        batch = np.repeat(theta[None, :], 2 * p + 1, axis=0)
        batch[1 : p + 1] += np.diag(step)
        batch[p + 1 :] -= np.diag(step)
        r = self.residuals(batch)
        jac = (r[1 : p + 1] - r[p + 1 :]) / (2 * step[:, None])  # (p, n): d residual / d theta
        scale = 1.0 / self.delta**2
        value = float(huber(r[0], self.delta).sum()) * scale
        grad = jac @ np.clip(r[0], -self.delta, self.delta) * scale
        return value, grad


@dataclass
class FitResult:
    """A fitted law. params: natural units, ties filled in. loss: sum of Huber losses at the optimum (unscaled).
    ci: {param: (lo, hi)} percentile bootstrap interval at `level` (empty without bootstrap); boot: the bootstrap
    draws, {param: array (n_boot,)}. r2: in-sample R^2 of log L; r2_heldout: leave-one-group-out R^2 of log L
    (None without groups)."""

    law: Law
    params: dict[str, float]
    loss: float
    n_points: int
    r2: float
    r2_heldout: float | None = None
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    boot: dict[str, np.ndarray] = field(default_factory=dict)
    level: float = 0.95
    n_starts: int = 0
    theta: np.ndarray | None = None  # the optimum in fitted space (free parameters, logs for positive ones)

    def predict(self, columns: Mapping[str, np.ndarray]) -> np.ndarray:
        """L at the fitted constants for columns {name: array (n,)} -> array (n,)."""
        cols = {k: np.asarray(v, float) for k, v in columns.items()}
        return np.asarray(self.law.predict(self.params, cols), float)


@contextlib.contextmanager
def one_blas_thread():
    """Run the block with every loaded OpenBLAS (numpy's, scipy's) on one thread, then restore the thread counts.

    Why: scipy's L-BFGS-B calls BLAS on tiny vectors; with OpenBLAS's default thread pool on a busy 2-core machine each
    call costs ~2 ms of thread hand-off instead of ~10 us (measured: 11 s vs 0.05 s for one 12-start fit). This is the
    part of threadpoolctl we need (not a dependency); a library it cannot find is left alone."""
    restore = []
    try:
        with open("/proc/self/maps") as fh:
            paths = sorted({ln.split()[-1] for ln in fh if "openblas" in ln and ".so" in ln.split()[-1]})
    except OSError:
        paths = []
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for suffix in ("", "64_"):  # C entry points (int argument) of plain and 64-bit-integer builds
            get = getattr(lib, f"scipy_openblas_get_num_threads{suffix}", None) or getattr(
                lib, f"openblas_get_num_threads{suffix}", None
            )
            set_ = getattr(lib, f"scipy_openblas_set_num_threads{suffix}", None) or getattr(
                lib, f"openblas_set_num_threads{suffix}", None
            )
            if get is not None and set_ is not None:
                set_.argtypes = [ctypes.c_int]
                restore.append((set_, int(get())))
                set_(1)
                break
    try:
        yield
    finally:
        for set_, n in restore:
            set_(n)


def _fit_space_bounds(law: Law, bounds: Mapping[str, tuple]) -> list[tuple[float | None, float | None]]:
    out = []
    for name in law.free:
        lo, hi = bounds.get(name, (None, None))
        if name in law.positive:
            lo = None if lo is None or lo <= 0 else float(np.log(lo))
            hi = None if hi is None else float(np.log(hi))
        out.append((lo, hi))
    return out


def grid_starts(
    law: Law, obj: _Objective, n_starts: int, max_grid: int, seed: int, box: list[tuple[float | None, float | None]]
) -> np.ndarray:
    """The n_starts best points of the start grid, (n_starts, p), by one vectorised scoring pass.

    A grid larger than max_grid points is replaced by a seeded random subset of max_grid of its points."""
    axes = [np.asarray(law.start_grid[name], float) for name in law.free]
    sizes = [len(a) for a in axes]
    total = int(np.prod(sizes))
    if total <= max_grid:
        grid = np.array(list(itertools.product(*axes)), float).reshape(total, len(axes))
    else:
        flat = np.random.default_rng(seed).choice(total, size=max_grid, replace=False)
        idx = np.unravel_index(flat, sizes)
        grid = np.stack([a[i] for a, i in zip(axes, idx)], axis=1)
    lo = np.array([-np.inf if b[0] is None else b[0] for b in box])
    hi = np.array([np.inf if b[1] is None else b[1] for b in box])
    grid = np.clip(grid, lo, hi)
    chunk = max(1, 2_000_000 // max(obj.n, 1))  # keep each (K, n) block near 16 MB
    scores = np.concatenate([obj.values(grid[i : i + chunk]) for i in range(0, len(grid), chunk)])
    order = np.argsort(scores, kind="stable")[:n_starts]
    return grid[order]


def _minimise(obj: _Objective, theta0: np.ndarray, box, maxiter: int) -> tuple[np.ndarray, float]:
    res = minimize(
        obj.value_and_grad,
        theta0,
        jac=True,
        method="L-BFGS-B",
        bounds=box,
        options={"maxiter": maxiter, "ftol": 1e-13, "gtol": 1e-9, "maxcor": 30},
    )
    return np.asarray(res.x, float), float(res.fun) * obj.delta**2


def _subset(columns: Mapping[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[idx] for k, v in columns.items()}


def fit_law(
    law: Law,
    columns: Mapping[str, Sequence[float]],
    loss: Sequence[float],
    *,
    groups: Sequence | None = None,
    n_boot: int = 0,
    seed: int = 0,
    delta: float = 1e-3,
    bounds: Mapping[str, tuple[float | None, float | None]] | None = None,
    n_starts: int = 10,
    max_grid: int = 20_000,
    maxiter: int = 2000,
    level: float = 0.95,
) -> FitResult:
    """Fit `law` to points (columns[name][i], loss[i]); loss must be > 0 (it is fitted in log).

    groups: one label per point (e.g. model size); enables the leave-one-group-out R^2 (refit without each group
    from the full-data optimum, predict that group). n_boot: bootstrap resamples of the points (with replacement,
    seeded), each refit from the full-data optimum; CIs are percentile intervals at `level`. bounds: natural-unit
    bounds that override the law's."""
    with one_blas_thread():
        return _fit_law(law, columns, loss, groups, n_boot, seed, delta, bounds, n_starts, max_grid, maxiter, level)


def _fit_law(law, columns, loss, groups, n_boot, seed, delta, bounds, n_starts, max_grid, maxiter, level):
    """fit_law's body (arguments as there), run with one BLAS thread."""
    law.check()
    loss = np.asarray(loss, float)
    cols = {name: np.asarray(columns[name], float) for name in law.columns}
    if loss.ndim != 1 or any(c.shape != loss.shape for c in cols.values()):
        raise ValueError("every column and the loss must be 1-D arrays of one length")
    if not np.all(loss > 0) or not np.all(np.isfinite(loss)):
        raise ValueError("every loss value must be finite and > 0 (the fit is in log L)")
    box = _fit_space_bounds(law, {**law.bounds, **(bounds or {})})
    obj = _Objective(law, cols, loss, delta)

    best_theta, best_loss = None, np.inf
    starts = grid_starts(law, obj, n_starts, max_grid, seed, box)
    for theta0 in starts:
        theta, value = _minimise(obj, theta0, box, maxiter)
        if value < best_loss:
            best_theta, best_loss = theta, value
    params = {k: float(v) for k, v in natural_params(law, best_theta).items()}
    log_pred = obj.log_obs + obj.residuals(best_theta[None, :])[0]
    result = FitResult(
        law=law,
        params=params,
        loss=best_loss,
        n_points=len(loss),
        r2=r_squared(obj.log_obs, log_pred),
        level=level,
        n_starts=len(starts),
        theta=best_theta,
    )

    if groups is not None:
        result.r2_heldout = _heldout_r2(law, cols, loss, np.asarray(groups), best_theta, box, delta, maxiter)
    if n_boot > 0:
        rng = np.random.default_rng(seed)
        draws = []
        for _ in range(n_boot):
            idx = rng.integers(0, len(loss), len(loss))
            boot_obj = _Objective(law, _subset(cols, idx), loss[idx], delta)
            theta, _ = _minimise(boot_obj, best_theta, box, maxiter)
            draws.append(theta)
        nat = natural_params(law, np.array(draws))
        tail = 100 * (1 - level) / 2
        result.boot = {k: np.asarray(v, float) for k, v in nat.items()}
        result.ci = {k: (float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))) for k, v in nat.items()}
    return result


def _heldout_r2(
    law: Law,
    cols: Mapping[str, np.ndarray],
    loss: np.ndarray,
    groups: np.ndarray,
    theta0: np.ndarray,
    box,
    delta: float,
    maxiter: int,
) -> float | None:
    """Leave-one-group-out R^2 of log L; None with fewer than 3 groups (nothing left to both fit and test)."""
    labels = np.unique(groups)
    if len(groups) != len(loss):
        raise ValueError("groups needs one label per point")
    if len(labels) < 3:
        return None
    log_pred = np.empty(len(loss))
    for g in labels:
        test = groups == g
        train = np.flatnonzero(~test)
        theta, _ = _minimise(_Objective(law, _subset(cols, train), loss[train], delta), theta0, box, maxiter)
        held = _Objective(law, _subset(cols, np.flatnonzero(test)), loss[test], delta)
        log_pred[test] = held.log_obs + held.residuals(theta[None, :])[0]
    return r_squared(np.log(loss), log_pred)
