"""Fit a loss law to the runs of a CSV file (header row; one run per row) and print its constants with 95% CIs.

  python tools/fit_law.py --csv=runs.csv --law=chinchilla --n=N --d=D --loss=loss [--tie] [--group=COL]
  python tools/fit_law.py --csv=runs.csv --law=precision --n=N --d=D --loss=loss --pw=P_w [--pa=P_a] [--pkv=P_kv]
  python tools/fit_law.py --csv=runs.csv --law=ptq --n=N --d=D --ppost=P_post --delta=delta
  python tools/fit_law.py --csv=runs.csv --law=isoflop --n=N --d=D --loss=loss --c=C
  common: [--boot=100] [--seed=0] [--json] [--help]

Laws (maxscale/analysis/scaling_laws.py, precision_laws.py): chinchilla L = E + A N^-alpha + B D^-beta (--tie fits
beta = alpha); precision: N replaced by N_eff = N prod_x (1 - exp(-P_x/gamma_x + n_x)) for the kinds given
(--pw weights, --pa activations, --pkv attention), beta = alpha unless --untie; ptq: delta = loss after post-training
quantization minus loss before = C_T exp(-P_post/gamma_post) D^gamma_D / N^gamma_N; isoflop: Hoffmann Approach 2,
a parabola of L vs ln N per budget (column --c, FLOPs, >= 3 sizes each), then N* ~ C^a, D* ~ C^b.
Columns hold numbers; precision cells may also be inf, hp or empty (high precision). Flags are --name=value; --tie,
--untie, --json and --help take no value. Column flags default to N, D, loss, P_post, delta, C. Constants come
with percentile bootstrap CIs (--boot resamples); the held-out R^2 of log L leaves one --group value out at a time
(default: the --n column). --json prints one JSON object instead of the table. Errors: one line, exit code 2.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from typing import Sequence

import numpy as np

from maxscale.errors import EXIT_USAGE, ConfigError, HelpRequested

VALUE_FLAGS = (
    "csv",
    "runs",
    "law",
    "n",
    "d",
    "loss",
    "pw",
    "pa",
    "pkv",
    "ppost",
    "delta",
    "c",
    "group",
    "boot",
    "seed",
)
BOOL_FLAGS = ("tie", "untie", "json")
LAWS = ("chinchilla", "precision", "ptq", "isoflop")
DEFAULT_COLUMNS = {"n": "N", "d": "D", "loss": "loss", "ppost": "P_post", "delta": "delta", "c": "C"}
# column flags each law reads (precision additionally needs at least one of pw, pa, pkv)
LAW_COLUMNS = {
    "chinchilla": ("n", "d", "loss"),
    "precision": ("n", "d", "loss"),
    "ptq": ("n", "d", "ppost", "delta"),
    "isoflop": ("n", "d", "loss", "c"),
}
PRECISION_FLAGS = {"pw": "w", "pa": "a", "pkv": "kv"}
HIGH_PRECISION_CELLS = ("", "inf", "hp")
P_STAR_BUDGETS = (1e19, 1e21, 1e23)


def parse_flags(argv: Sequence[str]) -> dict[str, str | bool]:
    """--name=value and bare boolean flags -> {name: value}; ConfigError (one line) for anything else."""
    flags: dict[str, str | bool] = {}
    usage = "flags: " + " ".join(f"--{f}=" for f in VALUE_FLAGS) + " " + " ".join(f"--{f}" for f in BOOL_FLAGS)
    for arg in argv:
        if arg in ("--help", "-h"):
            raise HelpRequested("usage: python tools/fit_law.py --csv=FILE --law=" + "|".join(LAWS) + " ...")
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; every input is a flag, e.g. --csv={arg}")
        name, eq, value = arg[2:].partition("=")
        if name in BOOL_FLAGS:
            if eq:
                raise ConfigError(f"--{name} takes no value; write --{name}")
            flags[name] = True
        elif name in VALUE_FLAGS:
            if not eq or not value:
                raise ConfigError(f"--{name} needs a value: --{name}=...")
            flags[name] = value
        else:
            raise ConfigError(f"unknown flag {arg.split('=')[0]!r}; {usage}")
    return flags


def read_csv(path: str) -> tuple[list[str], list[dict[str, str]]]:
    """(header, rows) of a CSV file with a header row."""
    try:
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            header = list(reader.fieldnames or [])
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ConfigError(f"cannot read --csv={path}: {e}; pass a readable CSV file with a header row") from None
    if not header:
        raise ConfigError(f"--csv={path} is empty; it needs a header row and one row per run")
    return header, rows


def column(
    path: str, header: list[str], rows: list[dict[str, str]], flag: str, name: str, precision: bool = False
) -> np.ndarray:
    """One numeric column by name, as float64 (n,). Precision columns read inf/hp/empty as inf (high precision)."""
    if name not in header:
        raise ConfigError(
            f"column {name!r} (--{flag}) is not in {path}; its columns are {', '.join(header)}; pass --{flag}=COLUMN"
        )
    out = np.empty(len(rows))
    for i, row in enumerate(rows):
        cell = (row.get(name) or "").strip()
        if precision and cell.lower() in HIGH_PRECISION_CELLS:
            out[i] = math.inf
            continue
        try:
            out[i] = float(cell)
        except ValueError:
            raise ConfigError(
                f"{path} line {i + 2}: column {name!r} (--{flag}) holds {cell!r}, not a number; "
                "fix the cell or drop the row"
            ) from None
        if not math.isfinite(out[i]) or out[i] <= 0:
            raise ConfigError(
                f"{path} line {i + 2}: column {name!r} (--{flag}) holds {cell!r}; it must be a "
                "finite number > 0; fix the cell or drop the row"
            )
    return out


def group_labels(path: str, header: list[str], rows: list[dict[str, str]], name: str) -> np.ndarray:
    """The --group column as labels (any text): the held-out R^2 leaves out one label at a time."""
    if name not in header:
        raise ConfigError(
            f"column {name!r} (--group) is not in {path}; its columns are {', '.join(header)}; pass --group=COLUMN"
        )
    return np.array([(row.get(name) or "").strip() for row in rows])


def _check_flags(flags: dict) -> str:
    if "runs" in flags:  # placeholder: reading a sweep directory (runs/<sweep>/<run-id>/) is not implemented yet
        raise ConfigError(
            "--runs=DIR (reading a sweep directory) is not implemented yet; export the runs to a CSV "
            "and pass --csv=FILE"
        )
    if "csv" not in flags:
        raise ConfigError("--csv=FILE is required: a CSV with a header row and one row per run")
    law = flags.get("law")
    if law not in LAWS:
        raise ConfigError(f"--law={law or ''} is not a law; use --law={'|'.join(LAWS)}")
    allowed = set(LAW_COLUMNS[law]) | {"csv", "law", "boot", "seed", "json", "group"}
    allowed |= {"tie"} if law == "chinchilla" else set()
    allowed |= (set(PRECISION_FLAGS) | {"untie"}) if law == "precision" else set()
    if law == "isoflop":
        allowed.discard("group")
    extra = sorted(f for f in flags if f not in allowed)
    if extra:
        raise ConfigError(f"--{extra[0]} is not used by --law={law}; drop it (see --help)")
    if law == "precision" and not any(f in flags for f in PRECISION_FLAGS):
        raise ConfigError("--law=precision needs at least one precision column: --pw=COL, --pa=COL or --pkv=COL")
    for name in ("boot", "seed"):
        if name in flags and not str(flags[name]).isdigit():
            raise ConfigError(f"--{name}={flags[name]} must be a whole number >= 0, e.g. --{name}=100")
    return law


def _json_number(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def run(flags: dict) -> dict:
    """Fit what the flags ask for; returns the JSON-ready report (constants, ci, r2_heldout, derived)."""
    from maxscale.analysis import precision_laws, scaling_laws  # numpy/scipy only

    law = _check_flags(flags)
    path = flags["csv"]
    header, rows = read_csv(path)
    cols = {f: column(path, header, rows, f, flags.get(f, DEFAULT_COLUMNS[f])) for f in LAW_COLUMNS[law]}
    n_boot, seed = int(flags.get("boot", 100)), int(flags.get("seed", 0))
    if law == "isoflop":
        if len(rows) < 6:
            raise ConfigError(f"{path}: {len(rows)} rows; --law=isoflop needs >= 2 budgets x >= 3 sizes; add runs")
        res = scaling_laws.isoflop_fit(cols["n"], cols["d"], cols["loss"], cols["c"], n_boot=n_boot, seed=seed)
        return {
            "law": law,
            "n_points": len(rows),
            "a": res.a,
            "b": res.b,
            "k_N": res.k_N,
            "k_D": res.k_D,
            "ci": {k: list(v) for k, v in res.ci.items()},
            "budgets": [
                {"C": m.C, "N_opt": m.N_opt, "D_opt": m.D_opt, "L_min": m.L_min, "n_sizes": m.n_sizes, "flags": m.flags}
                for m in res.budgets
            ],
        }
    groups = group_labels(path, header, rows, flags["group"]) if "group" in flags else cols["n"]
    if law == "chinchilla":
        fit_law_ = scaling_laws.chinchilla_law(tie=bool(flags.get("tie")))
        data, target = {"N": cols["n"], "D": cols["d"]}, cols["loss"]
    elif law == "precision":
        kinds = {
            k: column(path, header, rows, f, flags[f], precision=True) for f, k in PRECISION_FLAGS.items() if f in flags
        }
        fit_law_ = precision_laws.precision_law(tuple(kinds), tie=not flags.get("untie"))
        data, target = {"N": cols["n"], "D": cols["d"], **{f"P_{k}": v for k, v in kinds.items()}}, cols["loss"]
    else:
        fit_law_ = precision_laws.ptq_law()
        data, target = {"N": cols["n"], "D": cols["d"], "P_post": cols["ppost"]}, cols["delta"]
    need = len(fit_law_.free) + 1
    if len(rows) < need:
        raise ConfigError(
            f"{path}: {len(rows)} rows; --law={law} has {len(fit_law_.free)} free constants and needs "
            f"at least {need} runs; add runs"
        )
    from maxscale.analysis.laws import fit_law

    res = fit_law(
        fit_law_, data, target, groups=groups, n_boot=n_boot, seed=seed, n_starts=12 if law == "precision" else 10
    )
    out = {
        "law": law,
        "n_points": res.n_points,
        **res.params,
        "ci": {k: [_json_number(lo), _json_number(hi)] for k, (lo, hi) in res.ci.items()},
        "r2": _json_number(res.r2),
        "r2_heldout": None if res.r2_heldout is None else _json_number(res.r2_heldout),
        "huber_loss": res.loss,
        "tied": dict(fit_law_.tied),
    }
    if law == "chinchilla":
        out.update(scaling_laws.allocation(res.params))
    elif law == "precision":
        out["P_star"] = []
        for budget in P_STAR_BUDGETS:
            try:
                out["P_star"].append({"C": budget, **precision_laws.compute_optimal_precision(res.params, budget)})
            except ValueError:  # the fitted law has no valid point at this budget
                continue
    return out


def table(report: dict) -> str:
    """The report as a small text table."""
    lines = [f"law {report['law']}: {report['n_points']} runs"]
    if report["law"] == "isoflop":
        ci = report["ci"]
        for k in ("a", "b"):
            lo, hi = ci.get(k, (float("nan"), float("nan")))
            lines.append(f"  {k}  {report[k]:.4f}   10-90% [{lo:.4f}, {hi:.4f}]")
        lines.append("  budget C      N_opt        D_opt        L_min    sizes  flags")
        for m in report["budgets"]:
            lines.append(
                f"  {m['C']:.3e}  {m['N_opt']:.4e}  {m['D_opt']:.4e}  {m['L_min']:.4f}  {m['n_sizes']:5d}  "
                f"{','.join(m['flags']) or '-'}"
            )
        return "\n".join(lines) + "\n"
    lines.append("  name         value         95% CI")
    skip = {"law", "n_points", "ci", "r2", "r2_heldout", "huber_loss", "tied", "a", "b", "G", "P_star"}
    for name, value in report.items():
        if name in skip:
            continue
        lo, hi = report["ci"].get(name, (None, None))
        ci = f"[{lo:.4g}, {hi:.4g}]" if lo is not None and hi is not None else "-"
        tie = f"  (= {report['tied'][name]})" if name in report["tied"] else ""
        lines.append(f"  {name:<11}  {value:<12.5g}  {ci}{tie}")
    r2h = report["r2_heldout"]
    lines.append(
        f"  Huber loss {report['huber_loss']:.4g}; R^2 of log L {report['r2']:.5f}; held-out R^2 "
        f"{'-' if r2h is None else f'{r2h:.5f}'}"
    )
    if "a" in report:
        lines.append(
            f"  compute-optimal (C = 6ND): N* = G (C/6)^a, D* = (C/6)^b / G; a = {report['a']:.4f}, "
            f"b = {report['b']:.4f}, G = {report['G']:.4g}"
        )
    for p in report.get("P_star", []):
        lines.append(
            f"  C = {p['C']:.0e} FLOPs (C = 6/16 N D P): P* = {p['P']:.2f} bits, N* = {p['N']:.3g}, D* = {p['D']:.3g}"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str]) -> int:
    try:
        flags = parse_flags(argv)
        report = run(flags)
    except HelpRequested:
        print(__doc__)
        return 0
    except ConfigError as e:
        print(f"fit_law: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if flags.get("json"):
        print(json.dumps(report))
    else:
        print(table(report), end="")
    return 0
