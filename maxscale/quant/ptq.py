"""Post-training weight quantization of a trained run (RTN or GPTQ) and its eval loss, and `python tools/ptq.py`.

  python tools/ptq.py --run=DIR [--step=S] --bits=3,4,5,6,8 --method=rtn|gptq [--granularity=per_channel]
                      [--format=int|float] [--calib_batches=8] [--group_size=128] [--embeddings]

Reads the run's resolved config.json and a checkpoint (the newest, or --step), quantizes the weights of every hidden
matrix of every block (wq wk wv wo w_up w_gate w_down; norms stay), with --embeddings also the embedding table (RTN,
one scale per token row: a lookup has no input to calibrate) and the readout, then evaluates the eval loss exactly
as the trainer does (`Setup.eval_step` over `data.eval_batches`) and merges one entry per bit width into
<run>/ptq.json: {bits, method, format, quant_format (e.g. int4, e3m0), granularity, group_size, embeddings,
calib_batches, step, eval_loss, eval_loss_unquantized, delta}; an entry replaces one with the same settings.

GPTQ (maxscale/quant/gptq.py) runs layer by layer as in Frantar et al.: layer l's Hessians H = 2 X^T X / n come
from the inputs of its matrices (X of wo is the attention output [heads*head_dim], of w_down the MLP hidden),
computed on the run's first --calib_batches training batches passed through the already-quantized layers < l.

  option          values                                    default
  --method        rtn | gptq                                gptq
  --format        int (int<b>) | float (FLOAT_FORMATS[b])   int
  --granularity   per_channel | per_tensor | per_block      per_channel (one scale per output feature)
  --group_size    rows per scale with per_block             128
  --calib_batches training batches for the Hessians (gptq)  8
  --embeddings    also the embedding table and the readout  off
Float formats by bits: 3 e2m0, 4 e3m0, 5 e3m1, 6 e3m2, 7 e4m2, 8 e5m2, 12 e5m6 (one sign bit, scaled per group).

Errors (bad flag, missing run dir, config or checkpoint): one line on stderr, exit 2, nothing written.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from maxscale import config as config_lib
from maxscale import paths
from maxscale.errors import EXIT_USAGE, ConfigError, HelpRequested
from maxscale.parallel import sharding
from maxscale.quant import calibrate, gptq
from maxscale.quant.formats import Format, float_format, int_format
from maxscale.train import checkpoint as ckpt_lib
from maxscale.train import data as data_lib
from maxscale.train import step as step_lib

METHODS = ("rtn", "gptq")
GRANULARITIES = ("per_channel", "per_tensor", "per_block")
# Bits -> ExMy with one sign bit: Kumar et al.'s float formats where their bit count adds up (E2M0, E3M0, E3M2,
# E4M2, E5M2, E5M6); their 5-bit "E4M1" has 6 bits, so 5 bits is E3M1 here.
FLOAT_FORMATS = {3: (2, 0), 4: (3, 0), 5: (3, 1), 6: (3, 2), 7: (4, 2), 8: (5, 2), 12: (5, 6)}
RESULT_FILE = "ptq.json"
ENTRY_KEY = ("bits", "method", "format", "granularity", "group_size", "step", "embeddings", "calib_batches")


@dataclasses.dataclass(frozen=True)
class Spec:
    """One post-training quantization: `bits` of `format` ("int" | "float") with `method` ("rtn" | "gptq")."""

    bits: int
    method: str = "gptq"
    format: str = "int"
    granularity: str = "per_channel"
    group_size: int = 128
    embeddings: bool = False
    calib_batches: int = 8
    damp: float = 0.01
    block_size: int = 128

    @property
    def fmt(self) -> Format:
        if self.format == "int":
            if not 2 <= self.bits <= 16:
                raise ConfigError(f"--bits={self.bits}: integer formats have 2..16 bits")
            return int_format(self.bits)
        if self.bits not in FLOAT_FORMATS:
            raise ConfigError(f"--format=float has no {self.bits}-bit format; use bits in {sorted(FLOAT_FORMATS)}")
        return float_format(*FLOAT_FORMATS[self.bits])


# ------------------------------------------------------------------------------------------------- quantizing


def _quantize(w, eq: str, spec: Spec, h_II=None):
    """One weight in its einsum layout, RTN (h_II None) or GPTQ against h_II; same shape and dtype."""
    w_IO = calibrate.weight_to_IO(jnp.asarray(w), eq)
    if h_II is None:
        q_IO = gptq.rtn_quantize(w_IO, spec.fmt, spec.granularity, spec.group_size)
    else:
        q_IO = gptq.gptq_quantize(
            w_IO, h_II, spec.fmt, spec.granularity, spec.block_size, spec.damp, group_size=spec.group_size
        )
    return calibrate.weight_from_IO(q_IO, eq, w.shape).astype(w.dtype)


def _set_layer(blocks: dict, layer: int, p_layer: dict) -> dict:
    return {k: (v.at[layer].set(p_layer[k]) if k in p_layer else v) for k, v in blocks.items()}


def quantize_params(cfg: ml_collections.ConfigDict, params: dict, spec: Spec, calib_BT1: Sequence) -> dict:
    """A copy of `params` with every hidden block matrix (and with spec.embeddings the table and readout)
    quantized. calib_BT1: training batches int32 [B, T+1] (GPTQ only; the last token of each row is dropped)."""
    cal = calibrate.Calibrator(cfg)
    eqs = cal.equations()
    params = jax.tree.map(jnp.asarray, params)
    blocks = dict(params["blocks"])
    xs = [cal.embed(params, jnp.asarray(t)[:, :-1]) for t in calib_BT1] if spec.method == "gptq" else []
    for layer in range(cfg.model.depth):
        p_layer = {k: v[layer] for k, v in blocks.items()}
        hessians = _hessians(cal, p_layer, xs)
        p_layer = {k: (_quantize(v, eqs[k], spec, hessians.get(k)) if k in eqs else v) for k, v in p_layer.items()}
        blocks = _set_layer(blocks, layer, p_layer)
        xs = [cal.forward(p_layer, x) for x in xs]  # inputs of the next layer, through this quantized one
    params = {**params, "blocks": blocks}
    if spec.embeddings:
        params = _quantize_embeddings(cfg, params, spec, cal, xs)
    return params


def _hessians(cal: calibrate.Calibrator, p_layer: dict, xs: list) -> dict:
    """{name: H = 2 X^T X / n} over all calibration batches ({} without batches: RTN)."""
    if not xs:
        return {}
    total, rows = None, 0
    for x in xs:
        m = cal.moments(p_layer, x)
        total = m if total is None else jax.tree.map(jnp.add, total, m)
        rows += x.shape[0] * x.shape[1]
    return {k: 2.0 * v / rows for k, v in total.items()}


def _quantize_embeddings(cfg, params: dict, spec: Spec, cal: calibrate.Calibrator, xs: list) -> dict:
    """The table per token row (RTN); an untied readout with GPTQ on the final hidden state when calibrating."""
    out = dict(params)
    out["embed"] = _quantize(params["embed"], "bd,vd->bv", spec)  # [V, D] contracted over D: one scale per token
    if not cfg.model.tie_embeddings:
        h_DD = None
        if xs:
            h_DD = 2.0 * sum(cal.head_moments(params, x) for x in xs) / sum(x.shape[0] * x.shape[1] for x in xs)
        out["unembed"] = _quantize(params["unembed"], "btd,dv->btv", spec, h_DD)
    return out


# ------------------------------------------------------------------------------------------------- runs


@dataclasses.dataclass
class Run:
    """A trained run loaded for PTQ: resolved config, step, params (numpy), and what evaluating needs."""

    cfg: ml_collections.ConfigDict
    step: int
    params: dict
    setup: object
    eval_batches: list
    corpus: object


def one_device_mesh(cfg: ml_collections.ConfigDict):
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cfg.mesh.update(data=1, fsdp=1, tensor=1, expert=1)
    return sharding.make_mesh(cfg, jax.devices()[:1])


def dense_run_config(run_dir: str, what: str) -> ml_collections.ConfigDict:
    """The resolved config a run saved (config.json); ConfigError (one line) if there is none or the run is an MoE
    model, which `what` (a tool that reads dense blocks) does not cover."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"--run={run_dir}: no config.json; pass a run directory written by the trainer")
    cfg = config_lib.from_json(paths.read_text(path))
    if cfg.model.moe.num_experts:
        raise ConfigError(
            f"--run={run_dir}: {what} covers dense models; this run has "
            f"model.moe.num_experts={cfg.model.moe.num_experts}"
        )
    return cfg


def load_run(run_dir: str, step: int | None = None, mesh=None, corpus=None) -> Run:
    """Config, checkpoint (newest or `step`) and eval batches of a run; ConfigError (one line) if any is missing."""
    if not os.path.isdir(run_dir):
        raise ConfigError(f"--run={run_dir}: no such run directory; pass a run dir such as runs/<sweep>/<id>")
    cfg = dense_run_config(run_dir, "post-training quantization")
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    steps = ckpt_lib.committed_steps(ckpt_dir) if os.path.isdir(ckpt_dir) else []
    if not steps:
        raise ConfigError(
            f"--run={run_dir}: no committed checkpoint in {ckpt_dir}; train with checkpoints kept "
            f"(tools/sweep.py --keep_checkpoints)"
        )
    if step is not None and step not in steps:
        raise ConfigError(f"--step={step}: no checkpoint at that step in {ckpt_dir}; its steps are {steps}")
    setup = step_lib.Setup.build(cfg, mesh if mesh is not None else one_device_mesh(cfg))
    step, state = ckpt_lib.load_state(ckpt_dir, setup.abstract_state(), step)
    corpus = corpus if corpus is not None else data_lib.load_corpus(cfg)
    batches = [setup.global_batch(b["tokens"]) for b in data_lib.eval_batches(corpus, cfg)]
    return Run(cfg, step, state["params"], setup, batches, corpus)


def eval_loss(run: Run, params: dict) -> float:
    """The held-out loss as the trainer computes it: the mean of eval_step over the fixed eval batches."""
    return float(np.mean(jax.device_get([run.setup.eval_step(params, b) for b in run.eval_batches])))


def calibration_batches(run: Run, n: int) -> list[np.ndarray]:
    """The first n training batches of the run (int32 [B, T+1]): data the model saw at the start of training."""
    it = iter(data_lib.train_dataset(run.corpus, run.cfg))
    return [next(it)["tokens"] for _ in range(n)]


def evaluate(run: Run, specs: Sequence[Spec]) -> list[dict]:
    """One ptq.json entry per spec (quantize, evaluate); the unquantized loss is computed once."""
    base = eval_loss(run, run.params)
    n_calib = max((s.calib_batches for s in specs if s.method == "gptq"), default=0)
    calib = calibration_batches(run, n_calib) if n_calib else []
    out = []
    for spec in specs:
        q = quantize_params(run.cfg, run.params, spec, calib[: spec.calib_batches] if spec.method == "gptq" else [])
        loss = eval_loss(run, q)
        entry = {k: getattr(spec, k) for k in ENTRY_KEY if k != "step"}
        entry.update(quant_format=spec.fmt.name, step=run.step, eval_loss=loss, eval_loss_unquantized=base)
        entry["delta"] = loss - base
        out.append(entry)
    return out


def merge_results(run_dir: str, entries: list[dict]) -> list[dict]:
    """Merges entries into <run_dir>/ptq.json (an entry replaces one with the same ENTRY_KEY), written atomically."""
    path = os.path.join(run_dir, RESULT_FILE)
    try:
        old = json.loads(paths.read_text(path)) if os.path.exists(path) else []
    except (OSError, json.JSONDecodeError):
        old = []
    merged = {tuple(e.get(k) for k in ENTRY_KEY): e for e in old + entries}
    rows = sorted(merged.values(), key=lambda e: tuple(str(e.get(k)) for k in ENTRY_KEY))
    paths.write_text_atomic(path, json.dumps(rows, indent=1))
    return rows


# ------------------------------------------------------------------------------------------------- command line

# flag -> (default, allowed values or None for a number); --run is required, --step optional.
FLAGS = {
    "run": (None, None),
    "step": (None, None),
    "bits": ("3,4,5,6,8", None),
    "method": ("gptq", METHODS),
    "format": ("int", ("int", "float")),
    "granularity": ("per_channel", GRANULARITIES),
    "group_size": ("128", None),
    "calib_batches": ("8", None),
}
BOOL_FLAGS = ("embeddings",)


def _int(flag: str, text: str, low: int = 0) -> int:
    if not text.strip().isdigit() or int(text) < low:
        raise ConfigError(f"--{flag}={text}: expected a whole number >= {low}")
    return int(text)


def parse_args(argv: Sequence[str]) -> tuple[str, int | None, list[Spec]]:
    """(run dir, step or None, specs); ConfigError (one line) on any bad flag."""
    flags: dict = {}
    for arg in argv:
        if arg in ("-h", "--help"):
            raise HelpRequested("usage: python tools/ptq.py --run=DIR --bits=3,4,8 --method=rtn|gptq ...")
        name, eq, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if name in BOOL_FLAGS and not eq:
            flags[name] = True
        elif name in FLAGS and eq and value:
            flags[name] = value
        else:
            known = " ".join(f"--{f}=" for f in FLAGS) + " " + " ".join(f"--{f}" for f in BOOL_FLAGS)
            raise ConfigError(f"bad argument {arg!r}; flags are --name=value: {known}")
    if "run" not in flags:
        raise ConfigError("--run=DIR is required (a run directory with config.json and checkpoints/)")
    value = {name: flags.get(name, default) for name, (default, _) in FLAGS.items()}
    for name, (_, options) in FLAGS.items():
        if options is not None and value[name] not in options:
            raise ConfigError(f"--{name}={value[name]} is not supported; choose one of {', '.join(options)}")
    specs = [
        Spec(
            bits=_int("bits", b, 2),
            method=value["method"],
            format=value["format"],
            granularity=value["granularity"],
            group_size=_int("group_size", value["group_size"], 1),
            embeddings=bool(flags.get("embeddings")),
            calib_batches=_int("calib_batches", value["calib_batches"], 1),
        )
        for b in value["bits"].split(",")
    ]
    for s in specs:
        _ = s.fmt  # a bit width the format cannot express is a usage error now, not after loading the run
    step = _int("step", value["step"]) if value["step"] is not None else None
    return value["run"], step, specs


def main(argv: Sequence[str]) -> int:
    try:
        run_dir, step, specs = parse_args(argv)
        run = load_run(run_dir, step)
    except HelpRequested:
        print(__doc__)
        return 0
    except ConfigError as e:
        print(f"ptq: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    entries = evaluate(run, specs)
    merge_results(run_dir, entries)
    for e in entries:
        print(
            f"{e['method']} {e['quant_format']} {e['granularity']} step {e['step']}: eval_loss "
            f"{e['eval_loss']:.4f} (unquantized {e['eval_loss_unquantized']:.4f}, delta {e['delta']:+.4f})"
        )
    print(f"wrote {os.path.join(run_dir, RESULT_FILE)}")
    return 0
