"""Sweeps: expand a sweep file into runs named by the hash of their resolved config, run them, or script them.

A sweep file (configs/sweeps/*.py) defines `get_sweep()` (or `get_sweep(arg)`, called for `FILE.py:arg`) returning
a dict:
  config   a config spec ("configs/tiny.py[:arg]") or a ConfigDict: the base of every run
  fixed    {field: value} applied to every run (optional)
  grid     {axis: [values]}: the cartesian product, first axis outermost (optional). An axis named by a config
           field sets that field; a value that is a dict sets several fields at once (e.g. every width dimension,
           from `parameterization.scale_shapes`), whatever the axis is called
  points   [{field: value}, ...]: each grid point is crossed with each of these (optional)
  name     the sweep's name (default: the file's stem); runs land in <root>/<name>/<run-id>/

The run id is a hash of the resolved config, leaving out the fields that do not change the result (logging, mesh,
checkpointing) and the fields at their default value (so adding a config field with a default keeps old ids): the
same point always gets the same directory. Finished runs (with result.json) are skipped, interrupted ones resume
from their latest checkpoint, and a run stopped for a non-finite loss is recorded as diverged.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import importlib.metadata
import itertools
import json
import math
import os
import subprocess
import sys
import time
from typing import Any

import ml_collections

from maxscale import cli, paths
from maxscale import config as config_lib
from maxscale import defaults as schema
from maxscale.configdiff import diff_fields
from maxscale.errors import ConfigError
from maxscale.tools.sweep_slurm import slurm_script

# Fields that do not change what a run computes: left out of the run id. Derived from the config schema (fields
# without the `id` kind in maxscale/defaults.py); tests/test_schema.py pins the list, which run ids depend on.
NOT_HASHED = schema.UNHASHED_FIELDS
RESULT_FILE = "result.json"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tools/sweep.py lives there
RUN_FILE = "sweep_run.json"
RUNS = "runs.txt"  # the run directories, one a line (the --slurm array's tasks)


def load_sweep(spec: str) -> dict:
    """Imports a sweep file `path[:arg]` (calling `get_sweep()` or `get_sweep(arg)`, e.g. a corpus) and checks its
    shape (ConfigError with one line on any problem)."""
    path, _, arg = spec.partition(":")
    get_sweep = config_lib.import_entry(path, "get_sweep", "sweep file", "configs/sweeps/width.py")
    try:
        sweep = get_sweep(arg) if arg else get_sweep()
    except TypeError as e:
        raise ConfigError(f"sweep file {path}: get_sweep() rejected the argument {arg!r} ({e})") from None
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"sweep file {path}: get_sweep() failed ({type(e).__name__}: {e})") from None
    if not isinstance(sweep, dict) or "config" not in sweep:
        raise ConfigError(f"sweep file {path}: get_sweep() must return a dict with at least a 'config' entry")
    unknown = set(sweep) - {"config", "fixed", "grid", "points", "name"}
    if unknown:
        raise ConfigError(f"sweep file {path}: unknown keys {sorted(unknown)}; use config, fixed, grid, points, name")
    sweep.setdefault("name", os.path.splitext(os.path.basename(path))[0])
    return sweep


def _as_overrides(axis: str, value: Any) -> dict:
    return dict(value) if isinstance(value, dict) else {axis: value}


def points(sweep: dict) -> list[dict]:
    """The override dicts of every run, in order: fixed | grid point | point."""
    grid = sweep.get("grid") or {}
    for axis, values in grid.items():
        if not isinstance(values, (list, tuple)) or not values:
            raise ConfigError(f"sweep {sweep['name']}: grid axis {axis!r} must be a non-empty list")
    combos = itertools.product(*[[_as_overrides(a, v) for v in vs] for a, vs in grid.items()])
    extra = sweep.get("points") or [{}]
    out = []
    for combo in combos:
        for pt in extra:
            merged = dict(sweep.get("fixed") or {})
            for part in combo:
                merged.update(part)
            merged.update(pt)
            out.append(merged)
    return out


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
    """A copy of `cfg` with `{field: value}` applied through the same checks as `--config.field=value`."""
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    for key, value in overrides.items():
        text = value if isinstance(value, str) else repr(value)
        config_lib.override(cfg, key, text)
    return cfg


def _strip(d: dict, default: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        field = f"{prefix}{k}"
        if any(field == f or field.startswith(f + ".") for f in NOT_HASHED):
            continue
        if isinstance(v, dict):
            out[k] = _strip(v, default.get(k) or {}, field + ".")
        elif k not in default or json.dumps(default[k]) != json.dumps(v):
            out[k] = v
    return {k: v for k, v in out.items() if v != {}}  # a section at its defaults (or added since) adds nothing


def run_id(cfg: ml_collections.ConfigDict) -> str:
    """10 hex digits of the sha256 of the resolved config (NOT_HASHED fields and fields at their default left out)."""
    default = json.loads(config_lib.to_json(config_lib.defaults()))
    text = json.dumps(_strip(json.loads(config_lib.to_json(cfg)), default), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def base_config(sweep: dict) -> ml_collections.ConfigDict:
    base = sweep["config"]
    if isinstance(base, str):
        base = config_lib.load(base)
    if not isinstance(base, ml_collections.ConfigDict):
        raise ConfigError(f"sweep {sweep['name']}: 'config' must be a config path or a ConfigDict")
    config_lib.check_known_fields(base)
    return base


def expand(sweep: dict, root: str = "runs", sets: dict | None = None) -> list[dict]:
    """[{id, dir, overrides, config (resolved)}] for every run; ConfigError names the first bad point. `sets`
    ({field: value}, the command line's --set) is applied to every point last, so it wins over the sweep file."""
    base = base_config(sweep)
    runs, seen = [], {}
    for i, overrides in enumerate({**pt, **(sets or {})} for pt in points(sweep)):
        try:
            cfg = config_lib.resolve(apply_overrides(base, overrides))
        except ConfigError as e:
            raise ConfigError(f"sweep {sweep['name']} point {i} {overrides}: {e}") from None
        rid = run_id(cfg)
        if rid in seen:
            raise ConfigError(
                f"sweep {sweep['name']}: points {seen[rid]} and {i} resolve to the same config "
                f"({overrides}); remove the duplicate"
            )
        seen[rid] = i
        run_dir = os.fspath(paths.join(root, sweep["name"], rid))
        runs.append({"id": rid, "dir": run_dir, "overrides": overrides, "config": cfg})
    from maxscale.train import data as data_lib

    for source in sorted({r["config"].data.source for r in runs}):  # a missing corpus fails now, not in every run
        data_lib.check_source(source)
    return runs


def status(run_dir: str) -> str:
    """'done' (result.json), 'started' (config.json but no result: will resume) or 'new'."""
    if paths.join(run_dir, RESULT_FILE).exists():
        return "done"
    if paths.join(run_dir, "config.json").exists():
        return "started"
    return "new"


def stale_result(run: dict) -> str | None:
    """Why the finished result of `run` cannot stand for its point, or None: it must carry the full resolved config
    it was computed with (run ids leave out fields at their defaults, so a changed default keeps the id)."""
    try:
        result = json.loads(paths.read_text(paths.join(run["dir"], RESULT_FILE)))
    except (OSError, ValueError):
        return "is unreadable"
    saved = result.get("config") if isinstance(result, dict) else None
    if not isinstance(saved, dict):
        return "does not record the config it was computed with (written before results carried it)"
    defaults = json.loads(config_lib.to_json(config_lib.defaults()))
    diff = diff_fields(saved, json.loads(config_lib.to_json(run["config"])), NOT_HASHED, defaults=defaults)
    return f"was computed with another config ({'; '.join(diff[:3])})" if diff else None


def _move_aside(run_dir: str) -> str:
    """Renames the run aside (`<dir>.stale[N]`) and starts its directory afresh from the plan (sweep_run.json)."""
    n, target = 1, paths.as_path(run_dir + ".stale")
    while target.exists():
        n += 1
        target = paths.as_path(f"{run_dir}.stale{n}")
    paths.as_path(run_dir).rename(target)
    paths.as_path(run_dir).mkdir(parents=True)
    paths.write_text_atomic(paths.join(run_dir, RUN_FILE), (target / RUN_FILE).read_text())
    return os.fspath(target)


def write_plan(sweep: dict, runs: list[dict], root: str) -> str:
    """Writes <root>/<name>/sweep.json (the index) and each run's sweep_run.json; returns the sweep directory."""
    sweep_dir = paths.join(root, sweep["name"])
    sweep_dir.mkdir(parents=True, exist_ok=True)
    index = [{"id": r["id"], "overrides": r["overrides"]} for r in runs]
    paths.write_text_atomic(sweep_dir / "sweep.json", json.dumps({"name": sweep["name"], "runs": index}, indent=1))
    paths.write_text_atomic(sweep_dir / RUNS, "".join(r["dir"] + "\n" for r in runs))
    for r in runs:
        paths.as_path(r["dir"]).mkdir(parents=True, exist_ok=True)
        paths.write_text_atomic(
            paths.join(r["dir"], RUN_FILE),
            json.dumps(
                {"id": r["id"], "sweep": sweep["name"], "overrides": r["overrides"], "config": r["config"].to_dict()},
                indent=1,
                sort_keys=True,
            ),
        )
    return os.fspath(sweep_dir)


# ----------------------------------------------------------------------------------------------------------------
# Running


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def run_one(run_dir: str, keep_checkpoints: bool = False, corpus=None, mesh=None) -> dict:
    """Trains the run in `run_dir` (resuming if started) in this process and writes result.json. `mesh` defaults
    to one over every device (as `python -m maxscale.train`)."""
    from maxscale.train import faults, loop

    cfg = ml_collections.ConfigDict(json.loads(paths.read_text(paths.join(run_dir, RUN_FILE)))["config"])
    loop.check_workdir(run_dir, cfg)
    t0 = time.perf_counter()
    try:
        out = loop.Trainer(cfg, run_dir, mesh=mesh, corpus=corpus).run()
    except faults.NonFiniteError as e:  # train.nan_policy=stop: a diverged run, recorded as such
        out = {"train/loss": float("nan"), "eval/loss": float("nan"), "stopped": str(e)}
    return _write_result(run_dir, cfg, out, time.perf_counter() - t0, keep_checkpoints)


def _write_result(run_dir: str, cfg, out: dict, wall_s: float, keep_checkpoints: bool, **extra) -> dict:
    loss, eval_loss = out.get("train/loss"), out.get("eval/loss")
    # Worse than a uniform guess over the vocabulary counts as diverged (the analysis marks it, never drops it).
    ok = _finite(loss) and _finite(eval_loss) and eval_loss < math.log(cfg.model.vocab_size)
    result = {
        "status": "done" if ok else "diverged",
        "train_loss": loss,
        "eval_loss": eval_loss,
        "steps": cfg.train.steps,
        "wall_s": round(wall_s, 2),
        "version": _version(),
        "config": json.loads(config_lib.to_json(cfg)),  # what this result is of: checked before reuse
        **extra,
    }
    if "stopped" in out:
        result["stopped"] = out["stopped"]
    if not keep_checkpoints:
        checkpoints = paths.join(run_dir, "checkpoints")
        if checkpoints.exists():
            checkpoints.rmtree()
    paths.write_text_atomic(paths.join(run_dir, RESULT_FILE), json.dumps(result, indent=1))
    return result


def run_pack(run_dirs: list[str], keep_checkpoints: bool = False, corpus=None, mesh=None, log=print) -> list[dict]:
    """Trains `run_dirs` as one vectorized program (train/loop.run_pack; one: run_one); writes result.json."""
    if len(run_dirs) == 1:
        return [run_one(run_dirs[0], keep_checkpoints, corpus=corpus, mesh=mesh)]
    from maxscale.train import loop

    cfgs = [ml_collections.ConfigDict(json.loads(paths.read_text(paths.join(d, RUN_FILE)))["config"]) for d in run_dirs]
    return loop.run_pack(cfgs, run_dirs, _write_result, keep_checkpoints, corpus=corpus, mesh=mesh, log=log)


def run_local(
    runs: list[dict], jobs: int = 1, keep_checkpoints: bool = False, log=print, mesh=None, vectorize: int = 1
) -> dict:
    """Runs every unfinished run. jobs=1: one after another in this process (one JAX start-up, corpus read once);
    jobs>1: that many `python tools/sweep.py --run_dir=...` subprocesses at a time. vectorize=K > 1: runs that
    differ only in vectorizable fields go K at a time into one vectorized program (run_pack). Returns {id: status}."""
    for r in runs:  # a result of another config (a default changed since) is rerun, never reused
        problem = stale_result(r) if status(r["dir"]) == "done" else None
        if problem:
            moved = _move_aside(r["dir"])
            log(f"sweep: {r['id']} reruns: its result.json {problem}; the old run is kept in {moved}")
    todo, vary = [r for r in runs if status(r["dir"]) != "done"], varying_fields(runs)
    outcome = {r["id"]: "done" for r in runs if status(r["dir"]) == "done"}
    log(f"sweep: {len(runs)} runs, {len(runs) - len(todo)} finished, {len(todo)} to run, {jobs} at a time")
    t0 = time.perf_counter()
    units = [[r] for r in todo]
    if vectorize > 1:
        from maxscale.train import vectorized

        units = vectorized.packs(todo, vectorize, log)
    if jobs == 1:
        from maxscale.train import data as data_lib

        corpora = {}
        for i, unit in enumerate(units):
            key = json.dumps(unit[0]["config"].data.to_dict(), sort_keys=True)
            if key not in corpora:
                corpora = {key: data_lib.load_corpus(unit[0]["config"])}
            names = "; ".join(f"{r['id']} {_short(r['overrides'], vary)} ({status(r['dir'])})" for r in unit)
            log(f"sweep: [{i + 1}/{len(units)}] {names}")
            try:
                results = run_pack([r["dir"] for r in unit], keep_checkpoints, corpora[key], mesh, log)
                for r, res in zip(unit, results):
                    outcome[r["id"]] = res["status"]
                    log(f"sweep: {r['id']} {res['status']} eval_loss={res['eval_loss']} in {res['wall_s']:.0f}s")
            except Exception as e:  # one failed run must not stop the sweep
                for r in unit:
                    outcome[r["id"]] = "failed"
                    log(f"sweep: {r['id']} failed: {type(e).__name__}: {e}")
    else:
        tool = os.path.join(REPO, "tools", "sweep.py")

        def launch(unit):
            dirs = ",".join(r["dir"] for r in unit)
            cmd = [sys.executable, tool, f"--run_dir={dirs}"] + (["--keep_checkpoints"] if keep_checkpoints else [])
            with open(os.path.join(unit[0]["dir"], "log.txt"), "a") as fh:
                rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, env=job_env())
            return unit, rc

        with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
            for unit, rc in pool.map(launch, units):
                for r in unit:
                    outcome[r["id"]] = _read_result(r["dir"]).get("status", "failed") if rc == 0 else "failed"
                    log(f"sweep: {r['id']} {outcome[r['id']]} (log {os.path.join(unit[0]['dir'], 'log.txt')})")
    counts = {s: list(outcome.values()).count(s) for s in sorted(set(outcome.values()))}
    log(f"sweep: finished in {(time.perf_counter() - t0) / 60:.1f} min: {counts}")
    return outcome


def job_env(environ=None) -> dict:
    """The environment of a --jobs=N subprocess: on a GPU, N processes share the device, so JAX's default of taking
    75% of its memory at start-up is turned off (XLA_PYTHON_CLIENT_PREALLOCATE=false) unless the user set it."""
    return {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", **(os.environ if environ is None else environ)}


def _read_result(run_dir: str) -> dict:
    try:
        return json.loads(paths.read_text(paths.join(run_dir, RESULT_FILE)))
    except (OSError, json.JSONDecodeError):
        return {}


def _version() -> str:
    try:
        return importlib.metadata.version("maxscale")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def varying_fields(runs: list[dict]) -> list[str]:
    """The override fields whose value differs between `runs` (a run's log line shows only these)."""
    keys = dict.fromkeys(k for r in runs for k in r["overrides"])
    return [k for k in keys if len({repr(r["overrides"].get(k)) for r in runs}) > 1]


def _short(overrides: dict, fields: list[str] | None = None) -> str:
    """`field=value` of `fields` (default: all) by the field's last name, or its whole name where two share one."""
    shown = {k: v for k, v in overrides.items() if fields is None or k in fields}
    last = [k.split(".")[-1] for k in shown]
    return " ".join(f"{k if last.count(k.split('.')[-1]) > 1 else k.split('.')[-1]}={v}" for k, v in shown.items())


def parse_sets(texts: list[str], base: ml_collections.ConfigDict) -> dict:
    """{field: value text} of the --set FIELD=VALUE flags, each checked against the sweep's base config."""
    sets = {}
    for text in texts:
        field, eq, value = text.partition("=")
        if not eq or not field:
            raise ConfigError(f"--set {text}: expected FIELD=VALUE, e.g. --set train.steps=50")
        sets[field.removeprefix("config.")] = value
    apply_overrides(base, sets)  # an unknown field or bad value: one line naming it, before anything is expanded
    return sets


# ----------------------------------------------------------------------------------------------------------------
# Command line

USAGE = (
    "usage: python tools/sweep.py SWEEP_FILE[:ARG] [--jobs=N] [--root=runs] [--slurm [--partition=P] [--time=T]] "
    "[--dry_run] [--limit=N] [--set FIELD=VALUE ...] [--keep_checkpoints] [--vectorize=K]\n"
    "       python tools/sweep.py --run_dir=DIR[,DIR...]   (one run, or runs as one vectorized program)"
)


def _parser() -> cli.Parser:
    p = cli.Parser("sweep", USAGE)
    p.add_argument("sweep_file", nargs="?", default=None, help="a sweep file, SWEEP_FILE[:ARG]")
    p.add_argument("--jobs", default="1", help="runs at a time (local) or array tasks at a time (--slurm)")
    p.add_argument("--vectorize", default="1", help="K runs of equal shape trained as one program (K >= 1)")
    p.add_argument("--root", default="runs", help="the sweep directory goes under it")
    cli.bool_flag(p, "slurm", "write an sbatch array script instead of running")
    p.add_argument("--partition", default="", help="--slurm: the partition")
    p.add_argument("--time", default="", help="--slurm: the time limit, e.g. 24:00:00")
    dry = {"type": cli.flag_bool, "nargs": "?", "const": True, "default": False, "help": "list the runs; run nothing"}
    p.add_argument("--dry_run", "--dry-run", dest="dry_run", **dry)
    cli.bool_flag(p, "keep_checkpoints", "keep every run's checkpoints after it finishes")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="set on every point (repeat)")
    p.add_argument("--limit", default=None, help="N: only the first N points of the sweep")
    p.add_argument("--run_dir", default=None, help="DIR[,DIR...]: run one expanded run, or runs as one program")
    return p


def _positive(name: str, value: str) -> int:
    if not str(value).strip().isdigit() or int(value) < 1:
        raise ConfigError(f"--{name}={value}: expected a positive integer")
    return int(value)


@cli.command("sweep")
def main(argv: list[str]) -> int:
    args = _parser().parse(argv)
    if args.run_dir is not None:
        dirs = args.run_dir.split(",")
        if not all(os.path.isfile(os.path.join(d, RUN_FILE)) for d in dirs):
            raise ConfigError(f"--run_dir={args.run_dir}: no {RUN_FILE} there; expand the sweep first")
        keep = args.keep_checkpoints
        print(json.dumps(run_one(args.run_dir, keep) if len(dirs) == 1 else run_pack(dirs, keep)))
        return 0
    if not args.sweep_file:
        raise ConfigError("expected one sweep file, e.g. python tools/sweep.py configs/sweeps/width.py")
    jobs, vectorize = _positive("jobs", args.jobs), _positive("vectorize", args.vectorize)
    if not args.root:
        raise ConfigError("--root needs a directory, e.g. --root=runs")
    sweep = load_sweep(args.sweep_file)
    sets = parse_sets(args.set, base_config(sweep))
    runs = expand(sweep, args.root, sets)
    total, runs = len(runs), runs[: _positive("limit", args.limit)] if args.limit is not None else runs
    if args.dry_run:
        vary = varying_fields(runs)
        for r in runs:
            print(f"{r['id']}  {status(r['dir']):<8} {_short(r['overrides'], vary)}")
        fixed = f"; on every run: {_short(sets)}" if sets else ""
        print(f"{len(runs)} of {total} runs in {os.path.join(args.root, sweep['name'])}{fixed} (dry run: nothing ran)")
        return 0
    sweep_dir = write_plan(sweep, runs, args.root)
    if args.slurm:
        path, tasks, listing = os.path.join(sweep_dir, "sweep.sbatch"), len(runs), RUNS
        if vectorize > 1:  # one array task per vectorized pack (its directories on one line of packs.txt)
            from maxscale.train import vectorized

            tasks, listing = vectorized.write_pack_list(runs, vectorize, sweep_dir), vectorized.PACK_LIST
        opts = {"partition": args.partition, "time_limit": args.time, "listing": listing}
        paths.write_text_atomic(path, slurm_script(sweep_dir, tasks, jobs, **opts))
        print(f"wrote {path} ({tasks} array tasks, {jobs} at a time); submit with: sbatch {path}")
        return 0
    outcome = run_local(runs, jobs=jobs, keep_checkpoints=args.keep_checkpoints, vectorize=vectorize)
    return 0 if all(s in ("done", "diverged") for s in outcome.values()) else 1
