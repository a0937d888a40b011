"""Reading finished (or running) runs back: config, metrics, result, checkpointed params, and the model's logits.

A run directory is what the trainer and the sweep tool write (maxscale/tools/sweep.py): config.json (or the sweep's
plan, sweep_run.json), metrics.jsonl, result.json once a sweep run finished, and checkpoints/<step>/ orbax steps.

    runs = list_runs("runs/width")             every started run of a sweep directory (as transfer.load_runs)
    run = Run.open("runs/width/3f2a9c01de")
    run.config                                 the resolved ConfigDict the run trained with
    run.metrics()                              records of metrics.jsonl
    run.final_eval()                           final eval loss: result.json, else the last eval record
    run.steps()                                committed checkpoint steps
    run.params(step)                           params (numpy) at a kept step, restored on one CPU device whatever
                                               mesh the run trained on; step 0 is rebuilt from train.seed if not kept
    run.logits(params, tokens_BT)              float32 logits [B, T, V] (numpy); run.predictor(step) binds a step
    run.eval_tokens()                          the run's fixed held-out batches [N, seq_len + 1]

Checkpoints are restored onto a one-device mesh of the host's CPU (whatever accelerators the machine has): a copy
of the config with every mesh axis set to 1 builds the abstract train state (`Setup.build`), and orbax reshards
onto it (`checkpoint.load_state`). Logits and the initial params are computed there too.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from maxscale import cli, paths
from maxscale import config as config_lib
from maxscale.analysis import plotstyle, transfer
from maxscale.errors import ConfigError
from maxscale.parallel import sharding
from maxscale.tools import sweep as sweep_lib
from maxscale.train import checkpoint as ckpt_lib
from maxscale.train import data as data_lib
from maxscale.train import metrics as metrics_lib
from maxscale.train import step as step_lib

MESH_AXES = ("data", "fsdp", "tensor", "expert")
_CORPORA: dict[str, data_lib.Corpus] = {}  # one corpus per data config, read once per process
# Setups and their compiled functions, shared by every Run of one config up to train.seed (the model, its apply
# and its init take the seed as an argument): reopening a run, or another seed, compiles nothing again.
_COMPILED: dict[str, dict] = {}
_COMPILED_MAX = 8


def cpu() -> jax.Device:
    """The device the readers restore and compute on: the host's first CPU device."""
    return jax.devices("cpu")[0]


def _saved_config(run_dir: str) -> dict | None:
    """config.json (written by the trainer), else the sweep's plan, else the newest checkpoint's config."""
    cfg = transfer.read_json(os.path.join(run_dir, "config.json"))
    if not isinstance(cfg, dict):
        plan = transfer.read_json(os.path.join(run_dir, sweep_lib.RUN_FILE))
        cfg = plan.get("config") if isinstance(plan, dict) else None
    if not isinstance(cfg, dict):
        saved = ckpt_lib.read_saved_config(os.path.join(run_dir, "checkpoints"))
        cfg = saved[1] if saved else None
    return cfg


def resolve_saved(saved: dict) -> ml_collections.ConfigDict:
    """A saved config laid over today's defaults (fields added since keep their defaults), then resolved."""
    cfg = config_lib.defaults()
    try:
        cfg.update(saved)
    except (TypeError, KeyError, ValueError):  # a field whose type changed since: take the saved one as it is
        cfg = ml_collections.ConfigDict(saved)
    return config_lib.resolve(cfg)


def one_device_config(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`cfg` with a mesh of one device (every axis 1): what the readers build the model and its state on."""
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    for axis in MESH_AXES:
        cfg.mesh[axis] = 1
        cfg.mesh[f"dcn_{axis}"] = 1
    return cfg


class Run:
    """One run directory. Cheap to open: the model, state and corpus are built on first use."""

    def __init__(self, run_dir: str, config: ml_collections.ConfigDict):
        self.dir = os.fspath(run_dir)
        self.config = config
        self._state: tuple[int, dict] | None = None  # the last state loaded (one kept: params can be large)
        self._init: dict | None = None  # W_0, rebuilt once

    @classmethod
    def open(cls, run_dir: str | os.PathLike) -> "Run":
        run_dir = os.fspath(run_dir)
        if not os.path.isdir(run_dir):
            raise ConfigError(f"{run_dir!r} is not a directory; pass a run directory such as runs/width/<run-id>")
        saved = _saved_config(run_dir)
        if saved is None:
            raise ConfigError(f"{run_dir}: no config.json, {sweep_lib.RUN_FILE} or checkpoint config; not a run")
        try:
            return cls(run_dir, resolve_saved(saved))
        except ConfigError as e:
            raise ConfigError(f"{run_dir}: its config does not resolve ({e})") from None

    def __repr__(self) -> str:
        return f"Run({self.dir!r})"

    @property
    def id(self) -> str:
        return os.path.basename(os.path.normpath(self.dir))

    def flat_config(self) -> dict:
        """{"model.width": 64, ...}: the config as one flat dict (as transfer.load_runs has it)."""
        return transfer.flat(self.config.to_dict())

    # -- logs ----------------------------------------------------------------------------------------------------
    def metrics(self) -> list[dict]:
        return metrics_lib.read_metrics(self.dir)

    def curve(self, metric: str = "eval/loss") -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of one logged metric, in logged order."""
        rows = [(r["step"], r[metric]) for r in self.metrics() if metric in r and "step" in r]
        steps, values = zip(*rows) if rows else ((), ())
        return np.asarray(steps, np.int64), np.asarray(values, np.float64)

    def result(self) -> dict:
        """result.json of a finished sweep run ({} if none)."""
        result = transfer.read_json(os.path.join(self.dir, sweep_lib.RESULT_FILE))
        return result if isinstance(result, dict) else {}

    def final_eval(self) -> float | None:
        """The final eval loss: result.json's eval_loss, else the last eval/loss record (None if neither)."""
        value = self.result().get("eval_loss")
        if isinstance(value, (int, float)):
            return float(value)
        _, values = self.curve("eval/loss")
        return float(values[-1]) if len(values) else None

    # -- checkpoints ---------------------------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> str:
        return os.path.join(self.dir, "checkpoints")

    def steps(self) -> list[int]:
        """Committed checkpoint steps, ascending."""
        return ckpt_lib.committed_steps(self.checkpoint_dir)

    def _compiled(self) -> dict:
        """{"setup": Setup on a one-device mesh, "apply": jitted logits, "init": jitted params init}, shared by the
        runs of this config with any train.seed (the seed is an argument of each)."""
        cfg = one_device_config(self.config)
        cfg.train.seed = 0
        key = config_lib.to_json(cfg)
        if key not in _COMPILED:
            if len(_COMPILED) >= _COMPILED_MAX:
                _COMPILED.pop(next(iter(_COMPILED)))
            setup = step_lib.Setup.build(cfg, sharding.make_mesh(cfg, [cpu()]))
            _COMPILED[key] = {
                "setup": setup,
                "apply": jax.jit(lambda p, t, b: setup.model.apply(p, t, moe_bias=b)),
                "init": jax.jit(setup.model.init),
            }
        return _COMPILED[key]

    @property
    def setup(self):
        """The run's `Setup` on a one-device mesh (model, abstract state). Its `cfg` has train.seed 0: build the
        initial state with `init_params`, not `setup.init_state`."""
        return self._compiled()["setup"]

    def state(self, step: int | None = None) -> dict:
        """The train state (params, opt_state, step, ...) as numpy arrays at a kept step (default: the newest)."""
        if step is None:
            steps = self.steps()
            if not steps:
                raise ConfigError(f"{self.dir}: no committed checkpoint (was it run with keep_checkpoints?)")
            step = steps[-1]
        if self._state is None or self._state[0] != step:
            if step not in self.steps():
                raise ConfigError(f"{self.dir}: no checkpoint at step {step}; kept steps: {self.steps()}")
            self._state = ckpt_lib.load_state(self.checkpoint_dir, self.setup.abstract_state(), step)
        return self._state[1]

    def params(self, step: int | None = None) -> dict:
        """The params pytree (numpy) at `step` (default: the newest kept). Step 0 without a checkpoint is
        rebuilt from train.seed exactly as the trainer initialises it (`init_params`)."""
        if step == 0 and 0 not in self.steps():
            return self.init_params()
        return self.state(step)["params"]

    def init_params(self) -> dict:
        """W_0: the trainer's initial params, rebuilt from train.seed (the same numbers on any mesh)."""
        if self._init is None:
            with jax.default_device(cpu()):
                params = self._compiled()["init"](np.int32(self.config.train.seed))
            self._init = jax.tree.map(np.asarray, jax.device_get(params))
        return self._init

    def moe_bias(self, step: int | None = None) -> np.ndarray | None:
        """The MoE routing bias at `step` (None for a dense model; zeros at an unkept step 0)."""
        if self.setup.moe_bias_shape is None:
            return None
        if step == 0 and 0 not in self.steps():
            return np.zeros(self.setup.moe_bias_shape, np.float32)
        return self.state(step)["moe_bias"]

    # -- the model -----------------------------------------------------------------------------------------------
    def model(self):
        """The run's `transformer.ModelDef` (apply(params, tokens) -> logits)."""
        return self.setup.model

    def logits(self, params: Any, tokens_BT: np.ndarray, moe_bias: Any = None, batch: int = 0) -> np.ndarray:
        """float32 logits [B, T, V] of `params` on `tokens_BT`, `batch` rows at a time (default train.batch_size)."""
        apply = self._compiled()["apply"]
        tokens_BT = np.asarray(tokens_BT, np.int32)
        batch = batch or self.config.train.batch_size
        out = []
        with jax.default_device(cpu()):
            for i in range(0, len(tokens_BT), batch):
                rows = tokens_BT[i : i + batch]
                padded = np.pad(rows, ((0, batch - len(rows)), (0, 0)))  # one shape: one compile
                out.append(np.asarray(jax.device_get(apply(params, padded, moe_bias)), np.float32)[: len(rows)])
        return np.concatenate(out)

    def predictor(self, step: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
        """tokens_BT -> logits of the model at `step` (params loaded now, once)."""
        params, bias = self.params(step), self.moe_bias(step)
        return lambda tokens_BT: self.logits(params, tokens_BT, bias)

    def eval_tokens(self, batches: int = 0) -> np.ndarray:
        """The fixed held-out windows the trainer evaluates on, [batches x batch_size, seq_len + 1] int32
        (`batches` default: train.eval_steps)."""
        cfg = ml_collections.ConfigDict(self.config.to_dict())
        if batches:
            cfg.train.eval_steps = batches
        key = json.dumps(cfg.data.to_dict(), sort_keys=True)
        if key not in _CORPORA:
            _CORPORA.clear()
            _CORPORA[key] = data_lib.load_corpus(cfg)
        return np.concatenate([b["tokens"] for b in data_lib.eval_batches(_CORPORA[key], cfg)])


def list_runs(sweep_dir: str | os.PathLike, include_unstarted: bool = False) -> list[Run]:
    """Every run of a sweep directory, in transfer.load_runs' order (runs never started left out unless asked)."""
    rows = transfer.load_runs(os.fspath(sweep_dir))
    return [
        Run.open(os.path.join(os.fspath(sweep_dir), r["id"]))
        for r in rows
        if include_unstarted or r["status"] != "not run"
    ]


def open_runs(path: str | os.PathLike) -> list[Run]:
    """[the run] for a run directory, every started run for a sweep directory (what the CLIs accept)."""
    path = os.fspath(path)
    is_run = any(os.path.exists(os.path.join(path, f)) for f in ("config.json", sweep_lib.RUN_FILE, "checkpoints"))
    return [Run.open(path)] if is_run else list_runs(path)


def group(runs: list[Run], field: str) -> dict[Any, list[Run]]:
    """{value of the dotted config `field`: runs}, keys sorted."""
    out: dict[Any, list[Run]] = {}
    for r in runs:
        out.setdefault(r.flat_config().get(field), []).append(r)
    numeric = all(isinstance(k, (int, float)) for k in out)
    return dict(sorted(out.items(), key=lambda kv: kv[0] if numeric else repr(kv[0])))


def write_outputs(out_dir: str, stem: str, table: dict, markdown: str) -> None:
    """<out_dir>/<stem>.json and <stem>.md (the analyses' common output)."""
    os.makedirs(out_dir, exist_ok=True)
    paths.write_text_atomic(os.path.join(out_dir, f"{stem}.json"), json.dumps(table, indent=1, default=_plain))
    paths.write_text_atomic(os.path.join(out_dir, f"{stem}.md"), markdown)


class WidthStyle:
    """Line colours by width (plotstyle palette) and line styles by seed, shared by the analyses' plots."""

    def __init__(self, plt, widths, seeds):
        self.widths, self.seeds = sorted(set(widths)), sorted(set(seeds))
        self.cmap = plotstyle.colour

    def __call__(self, width, seed) -> dict:
        return {"color": self.cmap(self.widths.index(width)), "ls": ("-", "--", ":", "-.")[self.seeds.index(seed) % 4]}


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def parser(prog: str, doc: str) -> cli.Parser:
    """The analyses' argument parser (maxscale/cli.py): --help exits 0, a bad flag is one line on stderr and exit 2."""
    return cli.Parser(prog.split(".")[-1], doc.strip().split("\n")[0])


def cli_main(parser: cli.Parser, argv: list[str], body: Callable[[argparse.Namespace], None]) -> int:
    """Parses `argv` and runs `body(args)` under cli.run: a ConfigError is one line on stderr and exit 2."""
    return cli.run(parser.prog, lambda a: body(parser.parse(a)), argv)


def _plain(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    return str(x)


def step_list(text: str) -> list[int]:
    """argparse type of --steps=0,50,100."""
    try:
        steps = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        steps = []
    if not steps or steps[0] < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of steps >= 0")
    return steps
