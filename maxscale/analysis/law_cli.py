"""Fit a loss law to the runs of a CSV file (header row; one run per row) and print its constants with 95% CIs.

  python tools/fit_law.py --csv=runs.csv --law=chinchilla --n=N --d=D --loss=loss [--tie] [--group=COL]
  python tools/fit_law.py --csv=runs.csv --law=precision --n=N --d=D --loss=loss --pw=P_w [--pa=P_a] [--pkv=P_kv]
  python tools/fit_law.py --csv=runs.csv --law=ptq --n=N --d=D --ppost=P_post --delta=delta
  python tools/fit_law.py --csv=runs.csv --law=isoflop --n=N --d=D --loss=loss --c=C
  python tools/fit_law.py --runs=runs/<sweep> --law=chinchilla|precision|ptq|isoflop
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

--runs=DIR reads a sweep directory (runs/<sweep>/<id>/, tools/sweep.py) instead of a CSV, as columns N (non-embedding
parameters of the run's resolved config), D (train.steps x batch_size x seq_len tokens), loss (final eval loss of
result.json, else the last eval/loss of metrics.jsonl), P_w, P_a, P_kv (bits of quant.weights / activations / kv;
none = inf, high precision), C = 6 N D, and for --law=ptq one row per ptq.json entry of a high-precision run
(P_post = bits, delta; GPTQ integer per-channel entries, or RTN if a run has no GPTQ entry; delta <= 0 is left out,
the fit is in log). --law=chinchilla and isoflop use the high-precision runs only; --law=precision fits every kind
that varies unless --pw/--pa/--pkv name columns. Diverged and unfinished runs are skipped and counted (stderr).
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from typing import Sequence

import ml_collections
import numpy as np

from maxscale import cli
from maxscale.analysis.transfer import read_json
from maxscale.errors import ConfigError

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
    """--name=value and bare boolean flags -> {name: value} of the flags given (maxscale/cli.py parses them)."""
    p = cli.Parser("fit_law", __doc__)
    for f in VALUE_FLAGS:
        p.add_argument(f"--{f}", default=None, help="one of " + "|".join(LAWS) if f == "law" else None)
    for f in BOOL_FLAGS:
        p.add_argument(f"--{f}", action="store_true")
    args = p.parse(argv)
    for f in VALUE_FLAGS:
        if getattr(args, f) == "":
            raise ConfigError(f"--{f} needs a value: --{f}=...")
    return {k: v for k, v in vars(args).items() if v not in (None, False)}


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
    if "csv" in flags and "runs" in flags:
        raise ConfigError("--csv=FILE and --runs=DIR are two sources of runs; pass one of them")
    if "csv" not in flags and "runs" not in flags:
        raise ConfigError("--csv=FILE is required: a CSV with a header row and one row per run (or --runs=DIR)")
    law = flags.get("law")
    if law not in LAWS:
        raise ConfigError(f"--law={law or ''} is not a law; use --law={'|'.join(LAWS)}")
    allowed = set(LAW_COLUMNS[law]) | {"csv", "runs", "law", "boot", "seed", "json", "group"}
    allowed |= {"tie"} if law == "chinchilla" else set()
    allowed |= (set(PRECISION_FLAGS) | {"untie"}) if law == "precision" else set()
    if law == "isoflop":
        allowed.discard("group")
    extra = sorted(f for f in flags if f not in allowed)
    if extra:
        raise ConfigError(f"--{extra[0]} is not used by --law={law}; drop it (see --help)")
    if law == "precision" and "csv" in flags and not any(f in flags for f in PRECISION_FLAGS):
        raise ConfigError("--law=precision needs at least one precision column: --pw=COL, --pa=COL or --pkv=COL")
    for name in ("boot", "seed"):
        if name in flags and not str(flags[name]).isdigit():
            raise ConfigError(f"--{name}={flags[name]} must be a whole number >= 0, e.g. --{name}=100")
    return law


def _json_number(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def run(flags: dict) -> dict:
    """Fit what the flags ask for; returns the JSON-ready report (constants, ci, r2_heldout, derived)."""
    law = _check_flags(flags)
    if "csv" in flags:
        return _fit(flags, law, flags["csv"], *read_csv(flags["csv"]))
    header, rows, skipped = sweep_table(flags["runs"], law)
    if law == "precision" and not any(f in flags for f in PRECISION_FLAGS):
        flags = {**flags, **varying_precisions(rows)}
    return {**_fit(flags, law, flags["runs"], header, rows), "skipped": skipped}


def _fit(flags: dict, law: str, path: str, header: list[str], rows: list[dict[str, str]]) -> dict:
    """The fit of `run` on a table of rows (from a CSV or a sweep directory)."""
    from maxscale.analysis import precision_laws, scaling_laws  # numpy/scipy only

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


# ----------------------------------------------------------------------------------------------------------------
# --runs=DIR: a sweep directory as a table

SWEEP_COLUMNS = ("id", "N", "D", "loss", "P_w", "P_a", "P_kv", "C", "P_post", "delta", "method")
QUANT_FIELDS = {"P_w": "weights", "P_a": "activations", "P_kv": "kv"}


def _last_eval_loss(run_dir: str) -> float | None:
    loss = None
    try:
        with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
            for line in fh:
                try:
                    loss = json.loads(line).get("eval/loss", loss)
                except ValueError:
                    continue
    except OSError:
        return None
    return loss


def format_bits(fmt: str) -> float:
    """Bits of a quant format string: int<b> -> b, e<x>m<y> -> 1 + x + y, none -> inf (high precision)."""
    from maxscale.quant.formats import parse_format

    parsed = parse_format(fmt)
    return math.inf if parsed is None else float(parsed.bits)


def read_sweep(sweep_dir: str) -> tuple[list[dict], list[dict], dict[str, int]]:
    """(runs, ptq points, skipped counts) of a sweep directory. A run: {id, N, D, loss, P_w, P_a, P_kv, C, config};
    a PTQ point: {id, N, D, P_post, delta, method, ...the ptq.json entry}; skipped: {"diverged": n, "unfinished": n}."""
    from maxscale.model import transformer  # jax: only this path needs it

    if not os.path.isdir(sweep_dir):
        raise ConfigError(f"--runs={sweep_dir} is not a directory; pass a sweep directory such as runs/precision")
    runs, points, skipped, sizes = [], [], {"diverged": 0, "unfinished": 0}, {}
    for rid in sorted(os.listdir(sweep_dir)):
        d = os.path.join(sweep_dir, rid)
        plan = read_json(os.path.join(d, "sweep_run.json")) or {}
        cfg = plan.get("config") or read_json(os.path.join(d, "config.json"))
        if not os.path.isdir(d) or not isinstance(cfg, dict):
            continue
        result = read_json(os.path.join(d, "result.json"))
        if result is None:
            skipped["unfinished"] += 1
            continue
        loss = result.get("eval_loss")
        loss = loss if isinstance(loss, (int, float)) else _last_eval_loss(d)
        if result.get("status") == "diverged" or loss is None or not 0 < loss < math.inf:
            skipped["diverged"] += 1
            continue
        model_key = json.dumps(cfg["model"], sort_keys=True)
        if model_key not in sizes:  # one abstract model per size, not per run
            sizes[model_key] = transformer.count_params(ml_collections.ConfigDict(cfg))["non_embedding"]
        n, t = sizes[model_key], cfg["train"]
        row = {"id": rid, "N": float(n), "D": float(t["steps"] * t["batch_size"] * cfg["data"]["seq_len"])}
        row.update(loss=float(loss), C=6.0 * row["N"] * row["D"], config=cfg)
        row.update({col: format_bits(cfg["quant"][field]) for col, field in QUANT_FIELDS.items()})
        runs.append(row)
        if all(math.isinf(row[c]) for c in QUANT_FIELDS):
            points += _ptq_points(d, row)
    if not runs:
        raise ConfigError(f"--runs={sweep_dir}: no finished runs (skipped {_skipped_text(skipped)}); run the sweep")
    return runs, points, skipped


def _ptq_points(run_dir: str, row: dict) -> list[dict]:
    """The run's integer per-channel ptq.json entries of one method (GPTQ when present, else RTN)."""
    entries = [
        e
        for e in read_json(os.path.join(run_dir, "ptq.json")) or []
        if e.get("format") == "int" and e.get("granularity") == "per_channel" and not e.get("embeddings")
    ]
    methods = {e.get("method") for e in entries}
    method = "gptq" if "gptq" in methods else "rtn"
    return [
        {**e, "id": row["id"], "N": row["N"], "D": row["D"], "P_post": float(e["bits"])}
        for e in entries
        if e.get("method") == method
    ]


def _skipped_text(skipped: dict[str, int]) -> str:
    return ", ".join(f"{n} {what}" for what, n in skipped.items())


def sweep_table(sweep_dir: str, law: str) -> tuple[list[str], list[dict[str, str]], dict[str, int]]:
    """(header, rows as text, skipped counts) for `law` from a sweep directory."""
    runs, points, skipped = read_sweep(sweep_dir)
    if law == "ptq":
        rows = [p for p in points if p["delta"] > 0]
        skipped = {**skipped, "PTQ points with delta <= 0": len(points) - len(rows)}
        if not rows:
            raise ConfigError(f"--runs={sweep_dir}: no ptq.json points with delta > 0; run tools/ptq.py on its runs")
    elif law in ("chinchilla", "isoflop"):
        rows = [r for r in runs if all(math.isinf(r[c]) for c in QUANT_FIELDS)]
        skipped = {**skipped, "quantized (not high-precision)": len(runs) - len(rows)}
    else:
        rows = runs
    _check_varies(sweep_dir, law, rows)
    text = [{c: str(r.get(c, "")) for c in SWEEP_COLUMNS} for r in rows]
    return list(SWEEP_COLUMNS), text, skipped


def _check_varies(sweep_dir: str, law: str, rows: list[dict]) -> None:
    """Every law has an N and a D term: one value of either cannot fit its exponent (the fit would sit at a bound
    with a meaningless R^2). ConfigError (one line) naming what to vary, as report.py's scaling-law section."""
    fix = {"N": "a model size (model.width, depth, ...)", "D": "train.steps, train.batch_size or data.seq_len"}
    for col in ("N", "D"):
        values = {r[col] for r in rows}
        if len(values) < 2:
            raise ConfigError(
                f"--runs={sweep_dir}: every run has the same {col} ({next(iter(values)):.4g}); --law={law} fits "
                f"{'an' if col == 'N' else 'a'} {col} exponent, so the sweep must vary {fix[col]}"
            )


def varying_precisions(rows: list[dict[str, str]]) -> dict[str, str]:
    """{--pw/--pa/--pkv flag: column} for the kinds some row quantizes (at least P_w, so the law has a kind)."""
    out = {f: f"P_{k}" for f, k in PRECISION_FLAGS.items() if any(r[f"P_{k}"] != "inf" for r in rows)}
    return out or {"pw": "P_w"}


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
    skip = {"law", "n_points", "ci", "r2", "r2_heldout", "huber_loss", "tied", "a", "b", "G", "P_star", "skipped"}
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
    if report.get("skipped"):
        lines.append(f"  skipped: {_skipped_text(report['skipped'])}")
    return "\n".join(lines) + "\n"


@cli.command("fit_law")
def main(argv: Sequence[str]) -> int:
    flags = parse_flags(argv)
    report = run(flags)
    if "skipped" in report:  # after the fit, so that an error stays the only line
        print(
            f"fit_law: {report['n_points']} rows from {flags['runs']}; skipped {_skipped_text(report['skipped'])}",
            file=sys.stderr,
        )
    if flags.get("json"):
        print(json.dumps(report))
    else:
        print(table(report), end="")
    return 0
