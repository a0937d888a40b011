"""Law fitters recover known constants from data their own laws generate (maxscale/analysis/laws.py and friends)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from maxscale.analysis import law_cli, laws
from maxscale.analysis import precision_laws as pl
from maxscale.analysis import scaling_laws as sl
from maxscale.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "fit_law.py")
CHINCHILLA = {"A": 400.0, "B": 1800.0, "E": 1.7, "alpha": 0.34, "beta": 0.28}
HOFFMANN = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}  # analysis.md section 6


def chinchilla_grid(n_sizes: int = 13, n_tokens: int = 17) -> tuple[np.ndarray, np.ndarray]:
    """N 1e6..1e9 x D 1e7..1e11, log-spaced, flattened."""
    N, D = np.meshgrid(np.logspace(6, 9, n_sizes), np.logspace(7, 11, n_tokens))
    return N.ravel(), D.ravel()


def noisy(L: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    """Multiplicative lognormal noise of relative size sigma."""
    return L * np.exp(sigma * np.random.default_rng(seed).standard_normal(L.shape))


def assert_within(fitted: dict, true: dict, rel: float) -> None:
    errors = {k: fitted[k] / v - 1 for k, v in true.items()}
    assert all(abs(e) < rel for e in errors.values()), errors


def huber_at(law: laws.Law, params: dict, columns: dict, loss: np.ndarray) -> float:
    pred = law.predict(params, {k: np.asarray(v, float) for k, v in columns.items()})
    return float(laws.huber(np.log(pred) - np.log(loss), 1e-3).sum())


@pytest.fixture(scope="module")
def chinchilla_fit():
    N, D = chinchilla_grid()
    L = noisy(sl.chinchilla_loss(CHINCHILLA, {"N": N, "D": D}), 0.003, seed=0)
    return sl.fit_chinchilla(N, D, L, groups=N, n_boot=40, seed=0), N, D, L


def test_chinchilla_free_recovers_five_constants(chinchilla_fit):
    fit, N, D, L = chinchilla_fit
    assert_within(fit.params, CHINCHILLA, 0.05)
    # the optimiser found at least as good a point as the truth (no early stop)
    assert fit.loss <= huber_at(fit.law, CHINCHILLA, {"N": N, "D": D}, L) * (1 + 1e-9)


def test_chinchilla_bootstrap_ci_contains_truth_and_heldout_r2(chinchilla_fit):
    fit, *_ = chinchilla_fit
    for name, value in CHINCHILLA.items():
        lo, hi = fit.ci[name]
        assert lo <= value <= hi, (name, lo, value, hi)
        assert hi / lo < 1.5  # an interval, not the whole line
    assert len(fit.boot["A"]) == 40
    assert fit.r2_heldout > 0.99


def test_chinchilla_tied_recovers_constants():
    true = dict(CHINCHILLA, beta=0.30, alpha=0.30)
    N, D = chinchilla_grid(9, 11)
    fit = sl.fit_chinchilla(N, D, noisy(sl.chinchilla_loss(true, {"N": N, "D": D}), 0.003, seed=1), tie=True)
    assert_within(fit.params, true, 0.05)
    assert fit.params["alpha"] == fit.params["beta"]
    assert fit.law.free == ("A", "B", "E", "alpha")


def test_heldout_r2_drops_for_a_wrong_functional_form():
    """Kaplan et al. 2020's L = ((N_c/N)^(a_N/a_D) + D_c/D)^a_D is not of Chinchilla's form."""
    N, D = chinchilla_grid(9, 11)
    kaplan = ((8.8e13 / N) ** (0.076 / 0.095) + 5.4e13 / D) ** 0.095
    clean = sl.fit_chinchilla(N, D, noisy(sl.chinchilla_loss(CHINCHILLA, {"N": N, "D": D}), 0.003, 2), groups=N)
    wrong = sl.fit_chinchilla(N, D, kaplan, groups=N)
    assert clean.r2_heldout > 0.99
    assert wrong.r2_heldout < 0.95 < clean.r2_heldout
    assert wrong.r2_heldout < wrong.r2  # extrapolating to a left-out size is harder than fitting it


def test_allocation_closed_form_matches_hoffmann_and_numeric_minimum():
    n_opt, d_opt = sl.compute_optimal(HOFFMANN, 5.76e23)  # analysis.md: rounded constants give 32B params
    assert 31e9 < n_opt < 33e9 and abs(6 * n_opt * d_opt / 5.76e23 - 1) < 1e-12
    al = sl.allocation(HOFFMANN)
    assert al["a"] == pytest.approx(0.28 / 0.62) and al["a"] + al["b"] == pytest.approx(1.0)
    C, ln_n = 1e21, np.linspace(np.log(1e7), np.log(1e12), 200001)
    L = sl.chinchilla_loss(HOFFMANN, {"N": np.exp(ln_n), "D": C / (6 * np.exp(ln_n))})
    assert np.exp(ln_n[np.argmin(L)]) == pytest.approx(float(sl.compute_optimal(HOFFMANN, C)[0]), rel=1e-3)


def isoflop_runs(span: float = 8.0, sizes: int = 16) -> tuple[np.ndarray, ...]:
    """Noise-free Chinchilla surface, `sizes` sizes within x/÷span of each budget's optimum, C = 1e18..1e22."""
    rows = []
    for C in np.logspace(18, 22, 5):
        n_opt = float(sl.compute_optimal(HOFFMANN, C)[0])
        rows += [(n, C / (6 * n), C) for n in n_opt * np.geomspace(1 / span, span, sizes)]
    N, D, C = np.array(rows).T
    return N, D, sl.chinchilla_loss(HOFFMANN, {"N": N, "D": D}), C


def test_isoflop_recovers_allocation_exponents():
    N, D, L, C = isoflop_runs()
    res = sl.isoflop_fit(N, D, L, C, n_boot=30)
    true_a = 0.28 / (0.34 + 0.28)
    assert res.a == pytest.approx(true_a, rel=0.05) and res.b == pytest.approx(1 - true_a, rel=0.05)
    assert res.a == pytest.approx(true_a, abs=1e-6)  # analysis.md: recovered exactly on this surface
    assert len(res.budgets) == 5 and not any(m.flags for m in res.budgets)
    ratio = res.budgets[0].N_opt / float(sl.compute_optimal(HOFFMANN, res.budgets[0].C)[0])
    assert 1.02 < ratio < 1.04  # analysis.md: the parabola vertex sits 3.0% above the true optimum at x/÷8
    assert res.ci["a"][0] <= res.a <= res.ci["a"][1]


def test_isoflop_refuses_a_budget_with_two_sizes():
    N, D, L, C = isoflop_runs(sizes=5)
    keep = ~((C == C.min()) & (N > np.sort(N[C == C.min()])[1]))  # the smallest budget keeps two sizes
    with pytest.raises(ConfigError, match="a parabola needs at least 3"):
        sl.isoflop_fit(N[keep], D[keep], L[keep], C[keep])


PRECISION_TRUE = {
    k: pl.PAPER_TABLE2[k] for k in ("A", "B", "E", "alpha", "gamma_w", "n_w", "gamma_a", "n_a", "gamma_kv", "n_kv")
}


def precision_runs() -> dict[str, np.ndarray]:
    """N 1e7..1e9 x D 1e8..1e11 x 23 (P_w, P_a, P_kv) settings: each kind alone, all three together, baseline."""
    inf = np.inf
    settings = (
        [(inf, inf, inf)]
        + [(p, inf, inf) for p in (3, 4, 5, 6, 7, 8, 10)]
        + [(inf, p, inf) for p in (4, 5, 6, 7, 8, 10)]
        + [(inf, inf, p) for p in (3, 4, 5, 6, 7, 8)]
        + [(p, p, p) for p in (4, 6, 8)]
    )
    rows = np.array([(n, d, *s) for n in np.logspace(7, 9, 5) for d in np.logspace(8, 11, 6) for s in settings])
    return dict(zip(("N", "D", "P_w", "P_a", "P_kv"), rows.T))


def test_precision_law_recovers_ten_constants():
    cols = precision_runs()
    true = dict(PRECISION_TRUE, beta=PRECISION_TRUE["alpha"])
    L = noisy(pl.precision_loss(true, cols), 0.001, seed=0)
    fit = pl.fit_precision(cols["N"], cols["D"], L, {k: cols[f"P_{k}"] for k in pl.KINDS})
    assert_within(fit.params, true, 0.05)
    assert fit.loss <= huber_at(fit.law, true, cols, L) * (1 + 1e-9)


def test_precision_factor_conventions():
    T = pl.PAPER_TABLE2
    assert pl.precision_factor(np.inf, 2.0, 1.0) == 1.0
    assert pl.precision_factor(4.0, T["gamma_w"], T["n_w"]) == pytest.approx(1 - np.exp(-4 / 2.6745 + 0.3037))
    assert np.isnan(pl.precision_factor(3.0, T["gamma_a"], T["n_a"]))  # f_a(3) < 0: the law has no value there
    cols = {"N": np.array([1e8]), "D": np.array([1e10])}
    assert pl.precision_loss(T, cols) == pytest.approx(sl.chinchilla_loss(T, cols))  # absent columns: high precision


def test_table2_constants_give_seven_bit_compute_optimal_precision():
    """precision.md: with the offsets n_x the paper's constants give P* ~ 7 bits, without them ~3.5 (this checks the
    sign convention of n_x), independent of the budget."""
    T = pl.PAPER_TABLE2
    p_star = [pl.compute_optimal_precision(T, C)["P"] for C in (1e19, 1e20, 1e21, 1e22, 1e23)]
    assert all(6.5 < p < 7.5 for p in p_star) and max(p_star) - min(p_star) < 0.05, p_star
    assert 3.2 < pl.compute_optimal_precision(dict(T, n_w=0, n_a=0, n_kv=0), 1e21)["P"] < 3.8
    flipped = dict(T, n_w=-T["n_w"], n_a=-T["n_a"], n_kv=-T["n_kv"])  # the other sign: P* hits the 3-bit floor
    assert pl.compute_optimal_precision(flipped, 1e21)["P"] < 3.05
    opt = pl.compute_optimal_precision(T, 1e21)
    assert opt["N"] * opt["D"] * opt["P"] * 6 / 16 == pytest.approx(1e21)


def test_ptq_law_recovers_constants():
    true = {k: pl.PAPER_TABLE2[k] for k in ("C_T", "gamma_post", "gamma_D", "gamma_N")}
    N, D, P = (a.ravel() for a in np.meshgrid(np.logspace(7.5, 9, 5), np.logspace(9, 11, 6), [3.0, 4, 5, 6, 8]))
    delta = noisy(pl.ptq_degradation(true, {"N": N, "D": D, "P_post": P}), 0.003, seed=3)
    fit = pl.fit_ptq(N, D, P, delta, groups=N)
    assert_within(fit.params, true, 0.05)
    assert fit.r2_heldout > 0.99


def test_critical_data_size_minimises_post_ptq_loss():
    T = pl.PAPER_TABLE2
    d_crit = float(pl.critical_data_size(T, T, 1e8, 4.0))
    D = np.geomspace(d_crit / 100, d_crit * 100, 400001)
    cols = {"N": np.full_like(D, 1e8), "D": D, "P_post": np.full_like(D, 4.0)}
    post = sl.chinchilla_loss(T, cols) + pl.ptq_degradation(T, cols)
    assert D[np.argmin(post)] == pytest.approx(d_crit, rel=1e-3)


def test_law_validation_and_predict():
    law = sl.chinchilla_law().with_ties({"alpha": "beta", "beta": "alpha"})
    with pytest.raises(ValueError, match="bad tie"):
        laws.fit_law(law, {"N": [1e6] * 6, "D": [1e9] * 6}, [3.0] * 6)
    with pytest.raises(ValueError, match="> 0"):
        sl.fit_chinchilla([1e6, 1e7], [1e9, 1e9], [3.0, -1.0])
    N, D = chinchilla_grid(5, 5)
    fit = sl.fit_chinchilla(N, D, sl.chinchilla_loss(CHINCHILLA, {"N": N, "D": D}))
    assert fit.predict({"N": [1e8], "D": [1e10]}) == pytest.approx(
        sl.chinchilla_loss(CHINCHILLA, {"N": np.array([1e8]), "D": np.array([1e10])}), rel=1e-6
    )


# ---- CLI -----------------------------------------------------------------------------------------------------------


def write_csv(path, header, rows) -> str:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def run_tool(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, timeout=120)


@pytest.fixture
def chinchilla_csv(tmp_path):
    N, D = chinchilla_grid(7, 9)
    L = noisy(sl.chinchilla_loss(CHINCHILLA, {"N": N, "D": D}), 0.003, seed=4)
    return write_csv(tmp_path / "runs.csv", ["params", "tokens", "eval_loss"], zip(N, D, L))


def test_cli_json_chinchilla(chinchilla_csv):
    out = run_tool(
        f"--csv={chinchilla_csv}",
        "--law=chinchilla",
        "--n=params",
        "--d=tokens",
        "--loss=eval_loss",
        "--boot=8",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert {"A", "B", "E", "alpha", "beta", "ci", "r2_heldout", "a", "b"} <= set(report)
    assert set(report["ci"]) == {"A", "B", "E", "alpha", "beta"} and len(report["ci"]["A"]) == 2
    assert report["alpha"] == pytest.approx(0.34, rel=0.05) and report["r2_heldout"] > 0.99
    assert report["a"] == pytest.approx(report["beta"] / (report["alpha"] + report["beta"]))


def test_cli_errors_are_one_line_exit_2(chinchilla_csv):
    missing = run_tool(f"--csv={chinchilla_csv}", "--law=chinchilla", "--n=N", "--d=tokens", "--loss=eval_loss")
    unknown = run_tool(f"--csv={chinchilla_csv}", "--law=chinchilla", "--frobnicate=3")
    for res, needle in ((missing, "column 'N' (--n)"), (unknown, "unknown flag '--frobnicate'")):
        assert res.returncode == 2 and res.stdout == ""
        assert res.stderr.count("\n") == 1 and res.stderr.startswith("fit_law: error: ") and needle in res.stderr
    help_ = run_tool("--help")
    assert help_.returncode == 0 and "--law=" in help_.stdout


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--law=chinchilla"], "--csv=FILE is required"),
        (["--csv=/nonexistent/runs.csv", "--law=chinchilla"], "cannot read --csv=/nonexistent/runs.csv"),
        (["--csv=CSV", "--law=kaplan"], "--law=kaplan is not a law"),
        (
            ["--csv=CSV", "--law=chinchilla", "--n=params", "--d=tokens", "--loss=eval_loss", "--pw=params"],
            "--pw is not used by --law=chinchilla",
        ),
        (["--csv=CSV", "--law=chinchilla", "--n", "--d=tokens"], "--n needs a value"),
        (
            ["--csv=BAD", "--law=chinchilla", "--n=params", "--d=tokens", "--loss=eval_loss"],
            "holds 'n/a', not a number",
        ),
        (["--csv=FEW", "--law=chinchilla", "--n=params", "--d=tokens", "--loss=eval_loss"], "needs at least 6 runs"),
        (["--csv=CSV", "--runs=runs/sweep"], "two sources"),
    ],
)
def test_cli_bad_input(args, needle, chinchilla_csv, tmp_path, capsys):
    bad = write_csv(tmp_path / "bad.csv", ["params", "tokens", "eval_loss"], [(1e6, 1e9, 3.0), (1e7, 1e9, "n/a")])
    few = write_csv(tmp_path / "few.csv", ["params", "tokens", "eval_loss"], [(1e6, 1e9, 3.0), (1e7, 1e9, 2.9)])
    files = {"CSV": chinchilla_csv, "BAD": bad, "FEW": few}
    args = ["--csv=" + files.get(a[6:], a[6:]) if a.startswith("--csv=") else a for a in args]
    assert law_cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err


def test_cli_ptq_and_isoflop_json(tmp_path, capsys):
    true = {k: pl.PAPER_TABLE2[k] for k in ("C_T", "gamma_post", "gamma_D", "gamma_N")}
    N, D, P = (a.ravel() for a in np.meshgrid(np.logspace(7.5, 9, 4), np.logspace(9, 11, 4), [3.0, 4, 6]))
    delta = pl.ptq_degradation(true, {"N": N, "D": D, "P_post": P})
    ptq_csv = write_csv(tmp_path / "ptq.csv", ["N", "D", "bits", "dloss"], zip(N, D, P, delta))
    assert law_cli.main([f"--csv={ptq_csv}", "--law=ptq", "--ppost=bits", "--delta=dloss", "--boot=3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert_within(report, true, 1e-3)
    N, D, L, C = isoflop_runs(sizes=7)
    iso_csv = write_csv(tmp_path / "iso.csv", ["N", "D", "loss", "C"], zip(N, D, L, C))
    assert law_cli.main([f"--csv={iso_csv}", "--law=isoflop", "--boot=0", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["a"] == pytest.approx(0.28 / 0.62, rel=0.05) and len(report["budgets"]) == 5


def test_modules_do_not_import_jax():
    code = (
        "import sys; from maxscale.analysis import laws, scaling_laws, precision_laws, law_cli; "
        "sys.exit(int('jax' in sys.modules))"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=60).returncode == 0
