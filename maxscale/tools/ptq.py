"""Post-training quantization of a trained run and its eval loss: `python tools/ptq.py` (the math: quant/ptq.py).

  python tools/ptq.py --run=DIR [--step=S] --bits=3,4,5,6,8 --method=rtn|gptq [--granularity=per_channel]
                      [--format=int|float] [--calib_batches=8] [--group_size=128] [--embeddings]

Reads the run's resolved config.json and a checkpoint (the newest, or --step) of a dense or MoE run, quantizes the
weights of every hidden matrix of every block (wq wk wv wo w_up w_gate w_down, shared experts; norms and routers
stay) and of every routed expert, expert by expert (w_up_e w_gate_e w_down_e: per-expert scales, GPTQ calibrated on
the rows routed to that expert), with --embeddings also the embedding table (RTN, one scale per token row: a lookup
has no input to calibrate) and the readout, then evaluates the eval loss exactly as the trainer does
(`Setup.eval_step` over `data.eval_batches`, with an MoE run's routing bias) and merges one entry per bit width into
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
from typing import Sequence

import jax
import ml_collections
import numpy as np

from maxscale import cli, paths
from maxscale import config as config_lib
from maxscale.errors import ConfigError
from maxscale.parallel import sharding
from maxscale.quant.ptq import ENTRY_KEY, GRANULARITIES, METHODS, RESULT_FILE, Spec, quantize_params
from maxscale.train import checkpoint as ckpt_lib
from maxscale.train import data as data_lib
from maxscale.train import step as step_lib

__all__ = ["ENTRY_KEY", "GRANULARITIES", "METHODS", "RESULT_FILE", "Spec", "quantize_params"]  # re-exported

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
    moe_bias: object = None  # [L_moe, E] routing bias of an MoE run (state["moe_bias"]), None for a dense one


def one_device_mesh(cfg: ml_collections.ConfigDict):
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cfg.mesh.update(data=1, fsdp=1, tensor=1, expert=1)
    return sharding.make_mesh(cfg, jax.devices()[:1])


def run_config(run_dir: str) -> ml_collections.ConfigDict:
    """The resolved config a run saved (config.json); ConfigError (one line) if there is no such run or file."""
    if not paths.as_path(run_dir).is_dir():  # a gs:// run too
        raise ConfigError(f"--run={run_dir}: no such run directory; pass a run dir such as runs/<sweep>/<id>")
    path = os.path.join(run_dir, "config.json")
    if not paths.as_path(path).is_file():
        raise ConfigError(f"--run={run_dir}: no config.json; pass a run directory written by the trainer")
    return config_lib.from_json(paths.read_text(path))


def checkpoint_state(run_dir: str, cfg, step: int | None = None, mesh=None):
    """(Setup on `mesh` (default: one device), step, state) of the run's newest committed checkpoint or `step`;
    ConfigError (one line) when there is none."""
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    steps = ckpt_lib.committed_steps(ckpt_dir)  # [] when there is no such directory
    if not steps:
        raise ConfigError(
            f"--run={run_dir}: no committed checkpoint in {ckpt_dir}; train with checkpoints kept "
            f"(tools/sweep.py --keep_checkpoints)"
        )
    if step is not None and step not in steps:
        raise ConfigError(f"--step={step}: no checkpoint at that step in {ckpt_dir}; its steps are {steps}")
    setup = step_lib.Setup.build(cfg, mesh if mesh is not None else one_device_mesh(cfg))
    step, state = ckpt_lib.load_state(ckpt_dir, setup.abstract_state(), step)
    return setup, step, state


def load_run(run_dir: str, step: int | None = None, mesh=None, corpus=None) -> Run:
    """Config, checkpoint (newest or `step`), eval batches and (MoE) routing bias of a dense or MoE run; ConfigError
    (one line) if any is missing."""
    cfg = run_config(run_dir)
    setup, step, state = checkpoint_state(run_dir, cfg, step, mesh)
    corpus = corpus if corpus is not None else data_lib.load_corpus(cfg)
    batches = [setup.global_batch(b["tokens"]) for b in data_lib.eval_batches(corpus, cfg)]
    return Run(cfg, step, state["params"], setup, batches, corpus, state.get("moe_bias"))


def eval_loss(run: Run, params: dict) -> float:
    """The held-out loss as the trainer computes it: the mean of eval_step over the fixed eval batches."""
    losses = [run.setup.eval_step(params, b, run.moe_bias) for b in run.eval_batches]
    return float(np.mean(jax.device_get(losses)))


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
        batches = calib[: spec.calib_batches] if spec.method == "gptq" else []
        q = quantize_params(run.setup.model, run.params, spec, batches, run.moe_bias)
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


def _bits(text: str) -> list[int]:
    """--bits=3,4,8 -> [3, 4, 8] (argparse type: a bad list is one line, exit 2)."""
    parts = text.split(",")
    if not all(p.strip().isdigit() and int(p) >= 2 for p in parts):
        raise ValueError(text)
    return [int(p) for p in parts]


_bits.__name__ = "comma-separated bit widths >= 2"  # argparse names the type in its error


def parse_args(argv: Sequence[str]) -> tuple[str, int | None, list[Spec]]:
    """(run dir, step or None, specs); exit 2 with one line on any bad flag."""
    parser = cli.Parser("ptq", __doc__)
    parser.add_argument("--run", required=True, help="a run directory with config.json and checkpoints/")
    parser.add_argument("--step", type=int, default=None, help="a kept checkpoint's step (default: the newest)")
    parser.add_argument("--bits", type=_bits, default=[3, 4, 5, 6, 8], help="bit widths, e.g. 3,4,8")
    parser.add_argument("--method", default="gptq", choices=METHODS)
    parser.add_argument("--format", default="int", choices=("int", "float"))
    parser.add_argument("--granularity", default="per_channel", choices=GRANULARITIES)
    parser.add_argument("--group_size", type=int, default=128, help="rows per scale with per_block")
    parser.add_argument("--calib_batches", type=int, default=8, help="training batches for the Hessians (gptq)")
    cli.bool_flag(parser, "embeddings", "also the embedding table and the readout")
    a = parser.parse(argv)
    for flag, value, low in (
        ("step", a.step, 0),
        ("group_size", a.group_size, 1),
        ("calib_batches", a.calib_batches, 1),
    ):
        if value is not None and value < low:
            raise ConfigError(f"--{flag}={value}: expected a whole number >= {low}")
    keep = {"method": a.method, "format": a.format, "granularity": a.granularity, "group_size": a.group_size}
    specs = [Spec(bits=b, embeddings=a.embeddings, calib_batches=a.calib_batches, **keep) for b in a.bits]
    for s in specs:
        _ = s.fmt  # a bit width the format cannot express is a usage error now, not after loading the run
    return a.run, a.step, specs


@cli.command("ptq")
def main(argv: list[str]) -> int:
    run_dir, step, specs = parse_args(argv)
    run = load_run(run_dir, step)
    entries = evaluate(run, specs)
    merge_results(run_dir, entries)
    for e in entries:
        print(
            f"{e['method']} {e['quant_format']} {e['granularity']} step {e['step']}: eval_loss "
            f"{e['eval_loss']:.4f} (unquantized {e['eval_loss_unquantized']:.4f}, delta {e['delta']:+.4f})"
        )
    print(f"wrote {os.path.join(run_dir, RESULT_FILE)}")
    return 0
