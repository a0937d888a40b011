"""Post-training quantization of a trained run: 8-bit RTN is harmless, 3-bit RTN is not, GPTQ beats RTN at 3 bits
on the same checkpoint, ptq.json is written and merged, and bad input is one line with exit 2.

The model is the tiny one made narrower (width 32, 2 heads, ffn 64) and trained for 400 steps: the width-64 tiny
model at 200 steps (2 tokens per parameter) shrugs off 3-bit weights (RTN +0.003 nats, inside the +-0.003 spread
that any perturbation of its weights gives), so GPTQ and RTN cannot be told apart on it. Sensitivity to PTQ grows
with tokens per parameter (Kumar et al.); at 400 steps x 512 tokens on 45k parameters. Measured over 8 trained models
(seeds 0-3, each compiled at XLA backend optimization levels 0 and 2, whose ulp-level differences make 400 steps end at
different weights), min..max:
  RTN  int3 +0.011..+0.061, int4 -0.002..+0.033, int8 -0.0004..+0.0005
  GPTQ int3 -0.007..+0.020, int4 -0.0004..+0.005; RTN int3 - GPTQ int3 +0.0085..+0.058
At 4 bits GPTQ beat RTN by more than 0.005 in 6 of the 8 (by -0.006..+0.032): that is no claim to test on a model this
small, so the test asserts the 3-bit ranking and bounds 4-bit GPTQ.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import ROOT, one_device_mesh, tiny_config

from maxscale.model import transformer
from maxscale.quant import ptq as ptq_math
from maxscale.quant import qat
from maxscale.tools import ptq
from maxscale.train import loop

STEPS = 400
MODEL = {"model.width": 32, "model.num_heads": 2, "model.ffn_size": 64}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_corpus):
    """(run dir, trainer result, loaded Run) of the narrow tiny model trained STEPS steps with a final checkpoint."""
    cfg = tiny_config(
        **MODEL,
        **{
            "train.steps": STEPS,
            "train.eval_every": STEPS,
            "train.eval_steps": 4,
            "train.sample_tokens": 0,
            "train.peak_flops": 1e11,  # nominal: skips the start-up matmul measurement
            "checkpoint.every": STEPS,
            "checkpoint.async_save": False,
        },
    )
    run_dir = str(tmp_path_factory.mktemp("ptq_run"))
    result = loop.Trainer(cfg, run_dir, mesh=one_device_mesh(cfg), corpus=tiny_corpus).run()
    return run_dir, result, ptq.load_run(run_dir, mesh=one_device_mesh(cfg), corpus=tiny_corpus)


@pytest.fixture(scope="module")
def deltas(trained):
    """{(method, bits): ptq.json entry} for RTN at 3, 4, 8 bits and GPTQ at 3, 4 bits (8 calibration batches)."""
    _, _, run = trained
    specs = [ptq.Spec(b, "rtn") for b in (3, 4, 8)] + [ptq.Spec(b, "gptq") for b in (3, 4)]
    return {(e["method"], e["bits"]): e for e in ptq.evaluate(run, specs)}


def test_unquantized_eval_loss_is_the_trainers(trained, deltas):
    _, result, _ = trained
    for entry in deltas.values():
        assert entry["step"] == STEPS
        assert entry["eval_loss_unquantized"] == pytest.approx(result["eval/loss"], rel=1e-6)
        assert entry["delta"] == pytest.approx(entry["eval_loss"] - entry["eval_loss_unquantized"])


def test_rtn_at_8_bits_is_harmless_and_at_3_bits_is_not(deltas):
    base = deltas[("rtn", 8)]["eval_loss_unquantized"]
    assert abs(deltas[("rtn", 8)]["delta"]) < 0.01 * base  # measured: |delta| 0.0004 nats, 0.02%
    assert deltas[("rtn", 3)]["delta"] > 0.008  # measured over 8 models: +0.011..+0.061 nats
    assert deltas[("rtn", 3)]["delta"] > 10 * abs(deltas[("rtn", 8)]["delta"])


def test_gptq_beats_rtn_at_3_bits(deltas):
    gptq, rtn = deltas[("gptq", 3)]["delta"], deltas[("rtn", 3)]["delta"]
    assert gptq < rtn - 0.005, (gptq, rtn)  # measured margins over 8 models: 0.0085..0.058
    assert abs(deltas[("gptq", 4)]["delta"]) < 0.01  # measured: -0.0004..+0.005


def test_cli_writes_and_merges_ptq_json(trained, capsys):
    run_dir = trained[0]
    path = os.path.join(run_dir, ptq.RESULT_FILE)
    assert ptq.main([f"--run={run_dir}", "--bits=8", "--method=rtn"]) == 0
    first = json.load(open(path))
    assert [(e["method"], e["bits"]) for e in first] == [("rtn", 8)]
    assert ptq.main([f"--run={run_dir}", "--bits=4,8", "--method=rtn", f"--step={STEPS}"]) == 0
    merged = json.load(open(path))
    assert sorted((e["method"], e["bits"]) for e in merged) == [("rtn", 4), ("rtn", 8)]  # 8 replaced, 4 added
    keys = {"bits", "method", "format", "granularity", "step", "eval_loss", "eval_loss_unquantized", "delta"}
    assert all(keys <= set(e) for e in merged)
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--run={missing}"], "no such run directory"),
        (["--run={empty}"], "no config.json"),
        (["--run={no_ckpt}"], "no committed checkpoint"),
        (["--run={moe}"], "no committed checkpoint"),  # an MoE run is covered (tests/test_moe_tools.py)
        (["--run={run}", "--bits=3", "--method=awq"], "argument --method: invalid choice: 'awq'"),
        (["--run={run}", "--bits=17"], "integer formats have 2..16 bits"),
        (["--run={run}", "--bits=9", "--format=float"], "no 9-bit format"),
        (["--run={run}", "--step=7"], "no checkpoint at that step"),
        (["--run={run}", "--bogus=1"], "unknown flag '--bogus'"),
        (["--bits=3"], "the following arguments are required: --run"),
        (["--run={run}", "--bits=3,x"], "--bits: invalid comma-separated bit widths >= 2 value: '3,x'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(trained, tmp_path, capsys, args, message):
    run_dir = trained[0]
    (tmp_path / "empty").mkdir()
    (tmp_path / "no_ckpt").mkdir()
    (tmp_path / "no_ckpt" / "config.json").write_text(open(os.path.join(run_dir, "config.json")).read())
    (tmp_path / "moe").mkdir()
    moe_cfg = json.load(open(os.path.join(run_dir, "config.json")))
    moe_cfg["model"]["moe"]["num_experts"] = 4
    (tmp_path / "moe" / "config.json").write_text(json.dumps(moe_cfg))
    dirs = {d: tmp_path / d for d in ("missing", "empty", "no_ckpt", "moe")}
    before = sorted(os.listdir(run_dir))
    assert ptq.main([a.format(run=run_dir, **dirs) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ptq: error: ") and message in err, err
    assert sorted(os.listdir(run_dir)) == before and not os.path.exists(tmp_path / "no_ckpt" / ptq.RESULT_FILE)


def test_tool_help_and_usage_error(capsys):
    assert ptq.main(["--help"]) == 0 and "--method" in capsys.readouterr().out
    tool = os.path.join(ROOT, "tools", "ptq.py")
    out = subprocess.run([sys.executable, tool, "--run"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert out.stderr.startswith("ptq: error: --run needs a value"), out.stderr


EQUATIONS = {
    "wq": "btd,dhk->bthk",
    "wk": "btd,dgk->btgk",
    "wv": "btd,dgk->btgk",
    "wo": "bthk,hkd->btd",
    "w_up": "btd,df->btf",
    "w_gate": "btd,df->btf",
    "w_down": "btf,fd->btd",
}


def test_rtn_matches_the_training_quantizer_in_every_layout():
    cfg = tiny_config(**MODEL, **{"quant.weights": "int4"})  # the fixture's shapes: RTN is already compiled
    model = transformer.ModelDef(cfg)
    blocks = model.init(0)["blocks"]
    training = qat.make_quantizer(cfg)
    for name, eq in EQUATIONS.items():  # as the model's matmuls use them: wo [H, K, D] contracted over (H, K), ...
        w, spec = blocks[name][0], model.specs[f"blocks/{name}"]
        expected = jax.jit(lambda w: training.weights(w, eq, "hidden"))(w)  # noqa: B023 - called right here
        np.testing.assert_allclose(ptq_math._quantize(w, spec, ptq.Spec(4, "rtn")), expected, atol=1e-6)
