"""tools/import_hf.py: a tiny random transformers Llama (GQA, tied embeddings, bfloat16 shards, and the Qwen3 layout)
imports with the same logits (rtol 1e-4); a muP run trained 2 steps, exported and imported back computes the run's
logits; the imported workdir trains on with the trainer from step 0; what maxscale cannot run is refused in one line
with nothing written. The model checks need torch and transformers (the `hf` extra) and are skipped without them."""

from __future__ import annotations

import io
import json
import os
from contextlib import redirect_stderr, redirect_stdout

import jax
import numpy as np
import pytest
from conftest import one_device_mesh, tiny_config

from maxscale import config as config_lib
from maxscale.model import transformer
from maxscale.tools import export_hf, import_hf, ptq
from maxscale.train import checkpoint as ckpt_lib
from maxscale.train import loop
from maxscale.train import step as step_lib

pytest.importorskip("safetensors")

SMALL = [("data.seq_len", "32"), ("train.batch_size", "2"), ("data.max_bytes", "60000")]
LLAMAS = {  # transformers config kwargs; "dtype"/"shard": how it is saved
    "llama-gqa-untied": {"num_key_value_heads": 2, "rope_theta": 500.0, "rms_norm_eps": 1e-5},
    "llama-tied-mqa-bf16-sharded": {"num_key_value_heads": 1, "tie_word_embeddings": True, "dtype": "bf16"},
    "qwen3-qknorm-gqa": {"num_key_value_heads": 2, "head_dim": 16, "rope_theta": 1e6, "model_type": "qwen3"},
}


def _save_llama(directory, model_type="llama", dtype="f32", **kw):
    """A tiny random model with every weight (norm gains included) moved away from its init, saved; returns it."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config_class = transformers.Qwen3Config if model_type == "qwen3" else transformers.LlamaConfig
    sizes = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config_class(**sizes, **kw)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + 0.3 * torch.randn_like(p)).add_(0.02 * torch.randn_like(p))
    if dtype == "bf16":
        model = model.to(torch.bfloat16)
    model.save_pretrained(str(directory), max_shard_size="40KB" if dtype == "bf16" else "1GB")
    return model.float()


def _imported_logits(workdir, tokens):
    cfg = config_lib.from_json(open(os.path.join(workdir, "config.json")).read())
    setup = step_lib.Setup.build(cfg, ptq.one_device_mesh(cfg))
    step, state = ckpt_lib.load_state(os.path.join(workdir, "checkpoints"), setup.abstract_state())
    assert step == 0 and int(state["step"]) == 0
    return np.asarray(setup.model.apply(state["params"], tokens))


def _torch_logits(model, tokens):
    import torch

    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize("case", sorted(LLAMAS))
def test_imported_logits_equal_transformers(case, tmp_path):
    model = _save_llama(tmp_path / "hf", **LLAMAS[case])
    if "sharded" in case:
        assert len([n for n in os.listdir(tmp_path / "hf") if n.endswith(".safetensors")]) > 1
    info = import_hf.import_hf(str(tmp_path / "hf"), str(tmp_path / "run"), overrides=SMALL)
    cfg = info["config"]
    assert cfg.parameterization.name == "sp" and cfg.model.qk_norm == case.startswith("qwen3")
    assert cfg.model.tie_embeddings == ("tied" in case and "untied" not in case)
    tokens = np.random.default_rng(1).integers(0, 256, (2, 32)).astype(np.int32)
    ours, theirs = _imported_logits(tmp_path / "run", tokens), _torch_logits(model, tokens)
    scale = np.abs(theirs).max()
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * scale)
    print(f"{case}: import {info['seconds']:.2f} s, max |diff| {np.abs(ours - theirs).max():.2e} of {scale:.2e}")


def test_round_trip_and_training_on(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("tokenizers")
    run = {
        **{"model.width": 32, "model.num_heads": 2, "model.num_kv_heads": 1, "model.ffn_size": 64},
        **{"parameterization.name": "mup", "parameterization.base_width": 16, "parameterization.output_mult": 4.0},
        **{"data.seq_len": 32, "data.max_bytes": 60_000, "train.steps": 2, "train.eval_steps": 0},
        **{"train.sample_tokens": 0, "train.peak_flops": 1e11, "checkpoint.every": 2, "checkpoint.async_save": False},
    }
    cfg = tiny_config(**run)
    with redirect_stdout(io.StringIO()):
        trained = loop.Trainer(cfg, str(tmp_path / "mup"), mesh=one_device_mesh(cfg)).run()
        assert export_hf.main([f"--run={tmp_path}/mup", f"--out={tmp_path}/hf"]) == 0
        overrides = ["--config.train.eval_steps=0", "--config.train.sample_tokens=0", "--config.checkpoint.every=2"]
        overrides += [f"--config.{k}={v}" for k, v in SMALL] + ["--config.train.peak_flops=1e11"]
        assert import_hf.main([f"--hf={tmp_path}/hf", f"--out={tmp_path}/imported", *overrides]) == 0
    # the export -> import round trip computes the trained muP model's logits, as SP with multipliers 1
    tokens = np.random.default_rng(2).integers(0, 256, (2, 32)).astype(np.int32)
    params = jax.tree.map(np.asarray, trained["state"]["params"])
    ours = np.asarray(transformer.ModelDef(cfg).apply(params, tokens))
    back = _imported_logits(tmp_path / "imported", tokens)
    np.testing.assert_allclose(back, ours, rtol=1e-4, atol=1e-4 * np.abs(ours).max())
    # the workdir's config.py is the trainer's --config; train.steps may change; training goes on from step 0
    imported = config_lib.resolve(config_lib.load(f"{tmp_path}/imported/config.py"))
    assert imported.parameterization.name == "sp" and imported.data.tokenizer.startswith("hf:")
    imported.train.steps = 2
    loop.check_workdir(str(tmp_path / "imported"), imported)
    out = io.StringIO()
    with redirect_stdout(out), redirect_stderr(out):
        result = loop.Trainer(imported, str(tmp_path / "imported"), mesh=one_device_mesh(imported)).run()
    assert "at step 0" in out.getvalue() and np.isfinite(result["train/loss"])
    logged = [json.loads(line) for line in open(tmp_path / "imported" / "metrics.jsonl")]
    assert [r["step"] for r in logged if "train/loss" in r] == [1, 2]
    assert ckpt_lib.committed_steps(tmp_path / "imported" / "checkpoints") == [0, 2]


def _llama_config(**changes) -> dict:
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 256,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "hidden_act": "silu",
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    }
    return {**config, **changes}


@pytest.mark.parametrize(
    "changes,words",
    [
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling="),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "rope_type='llama3'"),
        ({"model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"]}, "model_type='gemma2'"),
        ({"hidden_act": "gelu_pytorch_tanh"}, "hidden_act="),
        ({"attention_bias": True}, "attention_bias"),
        ({"model_type": "qwen3", "use_sliding_window": True, "sliding_window": 128}, "sliding_window=128"),
        ({}, "no model.safetensors"),
    ],
)
def test_what_maxscale_cannot_run_is_refused_in_one_line(tmp_path, changes, words):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(_llama_config(**changes)))
    err = io.StringIO()
    with redirect_stderr(err):
        assert import_hf.main([f"--hf={hf}", f"--out={tmp_path}/run"]) == 2
    assert words in err.getvalue() and len(err.getvalue().strip().splitlines()) == 1, err.getvalue()
    assert sorted(os.listdir(tmp_path)) == ["hf"]  # nothing written, no temporary directory left


def test_a_model_field_override_against_the_checkpoint_is_refused(tmp_path):
    _save_llama(tmp_path / "hf")
    with pytest.raises(import_hf.ConfigError, match=r"model.width=64 differs from the checkpoint's 32"):
        import_hf.import_hf(str(tmp_path / "hf"), str(tmp_path / "run"), overrides=[("model.width", "64")])
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    with pytest.raises(import_hf.ConfigError, match="exists and is not empty"):
        import_hf.import_hf(str(tmp_path / "hf"), str(tmp_path / "taken"))
    assert sorted(os.listdir(tmp_path)) == ["hf", "taken"]
    # tensors that config.json does not account for (here biases, with attention_bias edited away) are refused
    _save_llama(tmp_path / "biased", attention_bias=True)
    config = json.loads((tmp_path / "biased" / "config.json").read_text())
    (tmp_path / "biased" / "config.json").write_text(json.dumps({**config, "attention_bias": False}))
    with pytest.raises(import_hf.ConfigError, match=r"tensor model.layers.0.self_attn.k_proj.bias has no place"):
        import_hf.import_hf(str(tmp_path / "biased"), str(tmp_path / "run"))
    assert sorted(os.listdir(tmp_path)) == ["biased", "hf", "taken"]
