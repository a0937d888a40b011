"""Generation with a KV cache through the model's one forward (maxscale/model/decode.py, `maxscale generate`).

Greedy decoding with the cache equals the argmax continuation of the training forward without it (dense, grouped-
query with QK-norm, quantized keys and values, MoE dropless in the interleaved layout, MoE capacity decoded
dropless), and transformers' greedy `generate` on the exported model; sampling is reproducible by seed and top_k=1
is greedy; the command line prints JSON and refuses bad input in one line."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stdout

import jax
import numpy as np
import pytest
from conftest import ROOT, one_device_mesh, tiny_config

from maxscale.model import decode, transformer
from maxscale.quant import qat
from maxscale.train import loop

MOE = {"model.moe.num_experts": 4, "model.moe.num_active": 2, "model.moe.expert_ffn_size": 16}
CASES = {
    "dense": {},
    "gqa-qk_norm": {"model.num_kv_heads": 2, "model.qk_norm": True},
    "int8-kv-int4-weights": {"quant.weights": "int4", "quant.kv": "int8"},
    "moe-dropless-interleaved": {
        **MOE,
        "model.moe.dispatch": "dropless",
        "model.depth": 5,
        "model.moe.first_dense": 1,
        "model.moe.every": 2,
    },
    "moe-capacity": {**MOE, "model.moe.dispatch": "capacity", "model.moe.capacity_factor": 1.0},
}


def _model(over):
    cfg = tiny_config(**over)
    model = transformer.ModelDef(cfg, qat.context(cfg))
    key = jax.random.key(5)  # perturbed: an initial model continues with one repeated id, which proves little
    params = jax.tree.map(lambda x: x + 0.02 * jax.random.normal(key, x.shape, x.dtype), model.init(0))
    return model, params


def _argmax_continuation(model, params, prompt, n, bias=None):
    """The training forward without a cache, re-run on the whole sequence for every new token. The sequence is
    held at its final length (the positions not generated yet are zeros, which a causal model's earlier logits
    cannot see: tests/test_model.py), so the forward compiles once, not once per length."""
    apply = jax.jit(
        lambda p, t, i: jax.lax.dynamic_index_in_dim(model.forward(p, t, moe_bias=bias).logits, i, 1, False)
    )
    p = prompt.shape[1]
    seq = np.concatenate([np.asarray(prompt), np.zeros((prompt.shape[0], n), np.int32)], 1)
    for t in range(p, p + n):
        seq[:, t] = np.argmax(np.asarray(apply(params, seq, t - 1)), -1)
    return seq[:, p:]


@pytest.mark.parametrize("case", CASES)
def test_greedy_with_the_cache_equals_the_training_forwards_argmax(case):
    model, params = _model(CASES[case])
    prompt = np.asarray(jax.random.randint(jax.random.key(3), (2, 5), 0, 256), np.int32)
    bias = None
    if transformer.is_moe(model.cfg):  # a routing bias that changes the choice of experts
        bias = jax.random.normal(jax.random.key(9), (transformer.stack_depths(model.cfg)["moe_blocks"], 4)) * 0.3
    got = np.asarray(decode.generate(model, params, prompt, 10, moe_bias=bias))
    reference = model if case != "moe-capacity" else decode.decoding_model(model)  # capacity decodes dropless
    want = _argmax_continuation(reference, params, prompt, 10, bias)
    np.testing.assert_array_equal(got, want)
    assert len(set(got[0].tolist())) > 1  # not one repeated id


def test_sampling_is_reproducible_and_top_k_1_is_greedy():
    model, params = _model({})
    prompt = np.asarray([[10, 20, 30]], np.int32)
    draw = lambda seed, **kw: np.asarray(decode.generate(model, params, prompt, 12, seed=seed, **kw))  # noqa: E731
    a, b, c = draw(1, temperature=1.0), draw(1, temperature=1.0), draw(2, temperature=1.0)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    np.testing.assert_array_equal(draw(7, temperature=1.0, top_k=1), draw(0))
    np.testing.assert_array_equal(draw(7, temperature=1.0, top_p=1e-6), draw(0))  # the nucleus keeps the top id
    assert (draw(0, vocab=40) < 40).all() and (draw(3, temperature=2.0, vocab=40) < 40).all()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    over = {"train.steps": 4, "train.eval_steps": 0, "train.sample_tokens": 0, "checkpoint.async_save": False}
    cfg = tiny_config(**over, **{"checkpoint.every": 4})
    run_dir = str(tmp_path_factory.mktemp("gen") / "run")
    with redirect_stdout(io.StringIO()):
        loop.Trainer(cfg, run_dir, mesh=one_device_mesh(cfg)).run()
    return run_dir


def _cli(*args):
    tool = os.path.join(ROOT, "tools", "generate.py")
    return subprocess.run([sys.executable, tool, *args], capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_command_line_json_and_bad_input(trained_run):
    out = _cli(f"--run={trained_run}", "--prompt=def f(", "--max_tokens=6", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["prompt"] == "def f(" and result["step"] == 4 and len(result["tokens"]) == 6
    assert result["text"] == bytes(result["tokens"]).decode("utf-8", errors="replace")  # the byte tokenizer
    for bad, message in (
        ([f"--run={trained_run}/nope", "--prompt=x"], "no such run directory"),
        ([f"--run={trained_run}", "--prompt=x", "--step=3"], "no checkpoint at that step"),
        ([f"--run={trained_run}", "--prompt=x", "--top_p=0"], "--top_p=0.0 is out of range"),
        ([f"--run={trained_run}"], "the following arguments are required: --prompt"),
    ):
        r = _cli(*bad)
        err = [line for line in r.stderr.splitlines() if not line.startswith("WARNING:absl")]
        assert r.returncode == 2 and len(err) == 1 and message in err[0], r.stderr


def test_greedy_equals_transformers_generate_on_the_export(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from maxscale.tools import export_hf
    from maxscale.train import tokenizers

    model, params = _model({})
    params = jax.tree.map(np.asarray, params)
    export_hf.save_safetensors(str(tmp_path / "model.safetensors"), export_hf.hf_weights(model.cfg, params))
    (tmp_path / "config.json").write_text(json.dumps(export_hf.hf_config(model.cfg, tokenizers.get("byte"))))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    prompt = np.asarray([[104, 101, 108, 108, 111]], np.int32)
    with torch.no_grad():
        theirs = hf.generate(torch.tensor(prompt, dtype=torch.long), max_new_tokens=10, do_sample=False)
    ours = np.asarray(decode.generate(model, params, prompt, 10))
    np.testing.assert_array_equal(ours[0], theirs[0, prompt.shape[1] :].numpy())
