"""tools/eval.py: loss over non-overlapping windows equals the trainer's eval loss on the same windows, bits per
byte = loss / ln 2 for the byte model, and a text source and its token file give the same numbers. tools/export_hf.py:
the transformers model computes maxscale's logits (rtol 1e-4) under SP, muP and CompleteP, GQA, tied and untied
embeddings and qk-norm (Qwen3 layout), with every forward multiplier away from 1; a run exports end to end with a
byte-level tokenizer.json; what Llama cannot express is refused in one line. MoE runs export as Mixtral (softmax top-k
renormalised routing, every block MoE) with the same logits under dropless and capacity dispatch (nothing dropped),
and what Mixtral cannot express goes to Glm4Moe (sigmoid routing) or Qwen3-MoE (qk-norm), or is refused in one
line naming the field (tests/test_moe_tools.py: the paper's MoE). The export checks need torch and
transformers (the `hf` extra) and are skipped without them."""

from __future__ import annotations

import glob
import importlib.util
import io
import json
import math
import os
from contextlib import redirect_stdout

import jax
import numpy as np
import pytest
from conftest import one_device_mesh, tiny_config

from maxscale.errors import ConfigError
from maxscale.model import transformer
from maxscale.parameterization import Parameterization
from maxscale.tools import evaluate, export_hf, prepare
from maxscale.train import loop
from maxscale.train import tokenizers as tok_lib

RUN = {
    "model.width": 32,
    "model.num_heads": 2,
    "model.ffn_size": 64,
    "data.seq_len": 32,
    "data.max_bytes": 150_000,
    "train.steps": 6,
    "train.eval_every": 6,
    "train.eval_steps": 2,
    "train.sample_tokens": 0,
    "train.peak_flops": 1e11,
    "checkpoint.every": 6,
    "checkpoint.async_save": False,
}


HAS_WANDB = importlib.util.find_spec("wandb") is not None


@pytest.fixture(scope="module")
def byte_run(tmp_path_factory):
    """(run dir, trainer result) of a byte-level tiny model with a final checkpoint; it also logs to Weights & Biases
    (offline) when wandb is installed."""
    base = tmp_path_factory.mktemp("byte_run")
    cfg = tiny_config(**RUN, **({"metrics.wandb_project": "maxscale-test"} if HAS_WANDB else {}))
    with redirect_stdout(io.StringIO()):
        result = loop.Trainer(cfg, str(base / "run"), mesh=one_device_mesh(cfg)).run()
    return str(base / "run"), result


def test_eval_loss_and_bits_per_byte(byte_run, tmp_path):
    run_dir, result = byte_run
    run = evaluate.load(run_dir, None)
    cfg = run.cfg
    # the trainer's eval batches are the first B * eval_steps windows of the eval split
    tokens = evaluate.read_tokens(cfg, "stdlib", "eval", cfg.data.max_bytes)
    n = cfg.train.batch_size * cfg.train.eval_steps * cfg.data.seq_len
    first = evaluate.evaluate(run, tokens, batch_size=3, max_tokens=n)  # batch size does not matter
    assert first["tokens"] == n and first["loss"] == pytest.approx(result["eval/loss"], rel=1e-5)
    whole = evaluate.evaluate(run, tokens)
    assert whole["tokens"] == whole["bytes"] == (len(tokens) - 1) // 32 * 32  # byte model: a token is a byte
    assert whole["bits_per_byte"] == pytest.approx(whole["loss"] / math.log(2), rel=1e-12)
    # the same text through a token file gives the same numbers; the CLI prints them as JSON
    prepare.prepare("stdlib", str(tmp_path / "tok"), "byte", cfg.data.eval_fraction, cfg.data.max_bytes)
    out = io.StringIO()
    with redirect_stdout(out):
        assert evaluate.main([f"--run={run_dir}", f"--data={tmp_path}/tok.json", "--json"]) == 0
    printed = json.loads(out.getvalue())
    assert printed["step"] == 6 and printed["tokens"] == whole["tokens"]
    assert printed["loss"] == pytest.approx(whole["loss"], rel=1e-6)


@pytest.mark.skipif(not HAS_WANDB, reason="wandb is not installed (the `wandb` extra)")
def test_wandb_offline_run_beside_jsonl_and_tensorboard(byte_run):
    run_dir, _ = byte_run
    run_id = open(os.path.join(run_dir, "wandb_run_id")).read().strip()
    runs = glob.glob(os.path.join(run_dir, "wandb", f"offline-run-*-{run_id}"))
    assert len(runs) == 1 and glob.glob(os.path.join(runs[0], "*.wandb"))
    assert os.path.getsize(glob.glob(os.path.join(runs[0], "*.wandb"))[0]) > 1000
    assert os.path.exists(os.path.join(run_dir, "metrics.jsonl"))


def test_bits_per_byte_counts_the_text_a_bpe_model_reads(tmp_path):
    pytest.importorskip("tokenizers")
    text = "the quick brown fox jumps over the lazy dog. " * 200
    spec = tok_lib.train("bpe", iter([text]), 300, str(tmp_path / "bpe"))
    tok = tok_lib.get(spec)
    ids = np.concatenate([tok.encode(text), [tok.eos_id], tok.encode("héllo")])
    assert tok_lib.num_bytes(tok, ids) == len(text.encode()) + 1 + len("héllo".encode())
    assert len(ids) < tok_lib.num_bytes(tok, ids) / 3  # so bits/byte < bits/token for this tokenizer


def _perturbed(cfg, seed=0):
    """Initial params with every array (norm gains included) multiplied by 1 + 0.3 N(0, 1): no gain stays 1."""
    rng = np.random.default_rng(seed)
    params = jax.tree.map(np.asarray, transformer.ModelDef(cfg).init(seed))
    return jax.tree.map(lambda a: (a * (1 + 0.3 * rng.standard_normal(a.shape))).astype(a.dtype), params)


def _hf_logits(out_dir, tokens):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


MUP = {"parameterization.name": "mup", "parameterization.base_width": 32}
CASES = {
    "sp-untied": {},
    "sp-tied-mults": {
        "model.tie_embeddings": True,
        "parameterization.input_mult": 3.0,
        "parameterization.output_mult": 0.5,
    },
    "mup-gqa": {**MUP, "model.num_kv_heads": 2, "parameterization.attn_mult": 2.0, "parameterization.output_mult": 4.0},
    "completep-tied": {
        "parameterization.name": "completep",
        "parameterization.base_width": 32,
        "parameterization.base_depth": 1,
        "model.depth": 3,
        "model.tie_embeddings": True,
        "parameterization.input_mult": 2.0,
    },
    "mup-mqa-qknorm": {**MUP, "model.qk_norm": True, "model.num_kv_heads": 1, "model.rope_theta": 500.0},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_exported_logits_equal_maxscale(case, tmp_path):
    pytest.importorskip("torch")
    cfg = tiny_config(**{"data.seq_len": 32, "model.norm_eps": 1e-5, **CASES[case]})
    mults = Parameterization(cfg).multipliers()
    assert case == "sp-untied" or any(v != 1.0 for k, v in mults.items() if k != "attn_scale")
    params = _perturbed(cfg)
    tokens = np.random.default_rng(1).integers(0, 256, (2, 32)).astype(np.int32)
    export_hf.save_safetensors(str(tmp_path / "model.safetensors"), export_hf.hf_weights(cfg, params))
    (tmp_path / "config.json").write_text(json.dumps(export_hf.hf_config(cfg, tok_lib.get("byte"))))
    ours = np.asarray(transformer.ModelDef(cfg).apply(params, tokens))
    theirs = _hf_logits(tmp_path, tokens)
    scale = np.abs(ours).max()
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4 * scale)
    print(f"{case}: max |diff| {np.abs(theirs - ours).max():.2e} of max |logit| {scale:.2e}")


def test_export_of_a_run_with_its_tokenizer(byte_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    run_dir, _ = byte_run
    out = io.StringIO()
    with redirect_stdout(out):
        assert export_hf.main([f"--run={run_dir}", f"--out={tmp_path}/hf"]) == 0
    assert "LlamaForCausalLM" in out.getvalue() and "byte level" in out.getvalue()
    run = evaluate.load(run_dir, None)
    text = "def héllo():\n    return 1\n"
    tokens = np.asarray(tok_lib.get("byte").encode(text), np.int32)[None]
    ours = np.asarray(run.setup.model.apply(run.params, tokens))
    np.testing.assert_allclose(_hf_logits(tmp_path / "hf", tokens), ours, rtol=1e-4, atol=1e-4 * np.abs(ours).max())
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tokens[0].tolist()
    assert hf_tok.decode(tokens[0]) == text and hf_tok.eos_token_id == 0
    # bfloat16 weights: the same model to bf16 precision
    with redirect_stdout(io.StringIO()):
        assert export_hf.main([f"--run={run_dir}", f"--out={tmp_path}/bf16", "--dtype=bfloat16"]) == 0
    np.testing.assert_allclose(_hf_logits(tmp_path / "bf16", tokens), ours, rtol=0.05, atol=0.05 * np.abs(ours).max())


@pytest.mark.parametrize(
    "field,value,words",
    [
        ("model.mlp", "gelu", "SwiGLU"),
        ("model.norm", "layernorm", "RMSNorm"),
    ],
)
def test_what_llama_cannot_express_is_refused_in_one_line(field, value, words):
    cfg = tiny_config()
    section, *rest = field.split(".")
    node = cfg[section]
    for part in rest[:-1]:
        node = node[part]
    node[rest[-1]] = value
    with pytest.raises(ConfigError, match=words) as e:
        export_hf.check_exportable(cfg)
    assert "\n" not in str(e.value)


MOE = {
    "data.seq_len": 32,
    "model.width": 32,
    "model.num_heads": 2,
    "model.norm_eps": 1e-5,
    "model.moe.num_experts": 4,
    "model.moe.num_active": 2,
    "model.moe.expert_ffn_size": 24,
    "model.moe.score": "softmax",
    "model.moe.combine": "renorm",
    "model.moe.balance": "aux",
}
MOE_CASES = {
    "dropless-mup-gqa": {**MUP, "parameterization.base_width": 16, "parameterization.output_mult": 4.0}
    | {"model.num_kv_heads": 1, "model.moe.dispatch": "dropless"},
    "capacity-sp-tied": {"model.tie_embeddings": True, "parameterization.input_mult": 2.0}
    | {"model.moe.capacity_factor": 2.0},
}


@pytest.mark.parametrize("case", sorted(MOE_CASES))
def test_exported_mixtral_logits_equal_maxscale(case, tmp_path):
    pytest.importorskip("torch")
    cfg = tiny_config(**{**MOE, "model.moe.dispatch": "capacity", **MOE_CASES[case]})
    export_hf.check_exportable(cfg)
    params = _perturbed(cfg)
    tokens = np.random.default_rng(1).integers(0, 256, (2, 32)).astype(np.int32)
    export_hf.save_safetensors(str(tmp_path / "model.safetensors"), export_hf.hf_weights(cfg, params))
    (tmp_path / "config.json").write_text(json.dumps(export_hf.hf_config(cfg, tok_lib.get("byte"))))
    out = transformer.ModelDef(cfg).forward(params, tokens)
    logits = out.logits
    assert not np.asarray(out.moe["moe_dropped_fraction"]).any()  # capacity: no pair dropped at this factor
    ours = np.asarray(logits)
    theirs = _hf_logits(tmp_path, tokens)
    scale = np.abs(ours).max()
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4 * scale)
    print(f"{case}: max |diff| {np.abs(theirs - ours).max():.2e} of max |logit| {scale:.2e}")


def test_export_of_an_moe_run(tmp_path):
    pytest.importorskip("torch")
    cfg = tiny_config(**{**RUN, **MOE, "model.moe.dispatch": "capacity", "model.moe.capacity_factor": 2.0})
    cfg.train.update(steps=2, eval_steps=0)
    cfg.checkpoint.every = 2
    with redirect_stdout(io.StringIO()):
        loop.Trainer(cfg, str(tmp_path / "run"), mesh=one_device_mesh(cfg)).run()
        assert export_hf.main([f"--run={tmp_path}/run", f"--out={tmp_path}/hf"]) == 0
    _, step, params, bias = export_hf.load_run(str(tmp_path / "run"), None)
    assert step == 2 and not np.any(bias)
    tokens = np.asarray(tok_lib.get("byte").encode("def moe(x):\n    return x\n"), np.int32)[None]
    ours = np.asarray(transformer.ModelDef(cfg).apply(params, tokens))
    np.testing.assert_allclose(_hf_logits(tmp_path / "hf", tokens), ours, rtol=1e-4, atol=1e-4 * np.abs(ours).max())
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]


@pytest.mark.parametrize(
    "field,value,arch",
    [
        ("score", "sigmoid", "glm4_moe"),  # sigmoid routing with its selection-only bias: Glm4Moe
        ("qk_norm", True, "qwen3_moe"),  # softmax with qk-norm: Qwen3-MoE, any combine and layout
        ("combine", "mean_k", None),
        ("num_shared", 1, None),
        ("first_dense", 1, None),
        ("every", 2, None),
        ("balance", "bias", None),
    ],
)
def test_what_mixtral_cannot_express_goes_elsewhere_or_is_refused_in_one_line(field, value, arch):
    cfg = tiny_config(**MOE)
    (cfg.model if field == "qk_norm" else cfg.model.moe)[field] = value
    if arch is not None:
        assert export_hf.architecture(cfg) == arch
        return
    prefix = "this run cannot be exported to transformers: model."
    with pytest.raises(ConfigError, match=f"^{prefix}{'' if field == 'qk_norm' else 'moe.'}{field}=") as e:
        export_hf.check_exportable(cfg)
    assert "\n" not in str(e.value)
