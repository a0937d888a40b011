"""The paper's MoE in every tool. Expert moments: each routed expert's X^T X over the rows routed to it, equal under
tiled, ragged_dot and (nothing dropped) capacity dispatch, and summing over experts to k times the MoE input's.
Export: the shipped MoE configs and the MoE layouts that map (sigmoid + routing bias + shared experts + first_dense as
Glm4Moe, softmax with qk_norm in any layout as Qwen3-MoE, Mixtral) give transformers the same logits, and import
back to the same logits; what none expresses is refused in one line naming the field. PTQ of an MoE run (experts
included) lowers its eval-loss gap monotonically with bits; eval of an MoE run prints the per-expert load. The
transformers checks need torch (the `hf` extra) and are skipped without it."""

from __future__ import annotations

import io
import json
import os
import sys
from contextlib import redirect_stdout

import composition_cases
import jax
import numpy as np
import pytest
from conftest import one_device_mesh, tiny_config

from maxscale import config as config_lib
from maxscale.errors import ConfigError
from maxscale.model import transformer
from maxscale.tools import evaluate, export_hf, import_hf, ptq
from maxscale.train import checkpoint as ckpt_lib
from maxscale.train import loop
from maxscale.train import step as step_lib
from maxscale.train import tokenizers as tok_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOE = {"data.seq_len": 32, "model.width": 32, "model.num_heads": 2, "model.norm_eps": 1e-5, "model.depth": 3}
MOE |= {"model.moe.num_experts": 4, "model.moe.num_active": 2, "model.moe.expert_ffn_size": 24}
MOE |= {"model.moe.dispatch": "dropless"}
SOFTMAX = {"model.moe.score": "softmax", "model.moe.balance": "aux"}
CASES = {  # name: (overrides, transformers architecture)
    "glm4moe-mean_k-bias-shared-first_dense": (
        {"model.moe.num_shared": 1, "model.moe.shared_ffn_size": 20, "model.moe.first_dense": 1},
        "Glm4MoeForCausalLM",
    ),
    "glm4moe-renorm-qknorm-mup": (
        {"model.moe.combine": "renorm", "model.qk_norm": True, "parameterization.name": "mup"}
        | {"parameterization.base_width": 16, "model.num_kv_heads": 1},
        "Glm4MoeForCausalLM",
    ),
    "qwen3moe-mean_k-every2": (
        {**SOFTMAX, "model.qk_norm": True, "model.moe.every": 2, "model.depth": 4},
        "Qwen3MoeForCausalLM",
    ),
    "qwen3moe-renorm-first_dense": (
        {**SOFTMAX, "model.qk_norm": True, "model.moe.combine": "renorm", "model.moe.first_dense": 1},
        "Qwen3MoeForCausalLM",
    ),
    "mixtral": ({**SOFTMAX, "model.moe.combine": "renorm", "model.tie_embeddings": True}, "MixtralForCausalLM"),
}


def _shipped(name: str):
    """configs/<name>.py, dropless (transformers computes every pair: capacity equals it only when nothing drops)."""
    cfg = config_lib.load(os.path.join(ROOT, "configs", f"{name}.py"))
    cfg.mesh.update(data=1, fsdp=1, tensor=1, expert=1)
    cfg.model.moe.dispatch = "dropless"
    return config_lib.resolve(cfg)


def _perturbed(cfg, seed=0):
    """Initial params with every array multiplied by 1 + 0.3 N(0, 1), and a random routing bias [L_moe, E]."""
    rng = np.random.default_rng(seed)
    params = jax.tree.map(np.asarray, transformer.ModelDef(cfg).init(seed))
    params = jax.tree.map(lambda a: (a * (1 + 0.3 * rng.standard_normal(a.shape))).astype(a.dtype), params)
    shape = (transformer.stack_depths(cfg)["moe_blocks"], cfg.model.moe.num_experts)
    bias = (0.05 * rng.standard_normal(shape)).astype(np.float32) if cfg.model.moe.score == "sigmoid" else None
    return params, bias


def _hf_logits(out_dir, tokens):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return type(model).__name__, model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


def _imported_logits(workdir, tokens):
    cfg = config_lib.from_json(open(os.path.join(workdir, "config.json")).read())
    setup = step_lib.Setup.build(cfg, ptq.one_device_mesh(cfg))
    _, state = ckpt_lib.load_state(os.path.join(workdir, "checkpoints"), setup.abstract_state())
    return np.asarray(setup.model.apply(state["params"], tokens, moe_bias=state.get("moe_bias")))


def _round_trip(cfg, tmp_path, name):
    """Export random params, compare transformers' logits, import back and compare again; prints the diffs."""
    pytest.importorskip("torch")
    params, bias = _perturbed(cfg)
    tokens = np.random.default_rng(1).integers(0, 256, (2, cfg.data.seq_len)).astype(np.int32)
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    export_hf.save_safetensors(str(hf_dir / "model.safetensors"), export_hf.hf_weights(cfg, params, bias))
    (hf_dir / "config.json").write_text(json.dumps(export_hf.hf_config(cfg, tok_lib.get("byte"))))
    ours = np.asarray(transformer.ModelDef(cfg).apply(params, tokens, moe_bias=bias))
    arch, theirs = _hf_logits(hf_dir, tokens)
    scale = np.abs(ours).max()
    np.testing.assert_allclose(theirs, ours, rtol=1e-5, atol=1e-5 * scale)
    with redirect_stdout(io.StringIO()):
        import_hf.import_hf(str(hf_dir), str(tmp_path / "imported"), overrides=[("data.tokenizer", "byte")])
    back = _imported_logits(tmp_path / "imported", tokens)
    np.testing.assert_allclose(back, ours, rtol=1e-5, atol=1e-5 * scale)
    diffs = (np.abs(theirs - ours).max(), np.abs(back - ours).max())
    print(f"{name} as {arch}: max |diff| export {diffs[0]:.2e}, import {diffs[1]:.2e} of max |logit| {scale:.2e}")
    return arch


@pytest.mark.parametrize("case", sorted(CASES))
def test_moe_export_and_import_keep_the_logits(case, tmp_path):
    overrides, arch = CASES[case]
    assert _round_trip(tiny_config(**{**MOE, **overrides}), tmp_path, case) == arch


@pytest.mark.parametrize("name", ["moe_tiny", "moe"])
def test_shipped_moe_configs_export_as_glm4moe(name, tmp_path):
    assert _round_trip(_shipped(name), tmp_path, f"configs/{name}.py") == "Glm4MoeForCausalLM"


@pytest.mark.parametrize("model", [m for m in composition_cases.MODELS if m != "dense"])
def test_composition_moe_models_export_or_are_refused(model, tmp_path):
    """The composition suite's MoE models (tests/composition_cases.py), dropless: each round-trips or is refused."""
    cfg = tiny_config(
        **{**composition_cases.FIXED, **composition_cases.MODELS[model], "model.moe.dispatch": "dropless"}
    )
    if model == "moe_layout":  # sigmoid routing with every=2: Glm4Moe's MoE blocks are all those after the first k
        with pytest.raises(ConfigError, match="^this run cannot be exported to transformers: model.moe.every=2 "):
            export_hf.check_exportable(cfg)
        return
    arch = {"moe_router": "MixtralForCausalLM"}.get(model, "Glm4MoeForCausalLM")
    assert _round_trip(cfg, tmp_path, f"composition {model}") == arch


@pytest.mark.parametrize(
    "changes,field",
    [
        ({"model.moe.every": 2, "model.depth": 4}, "model.moe.every=2"),
        ({**SOFTMAX, "model.moe.num_shared": 1}, "model.moe.num_shared=1"),
        ({"model.moe.score": "softmax"}, "model.moe.balance=bias"),
        ({**SOFTMAX, "model.moe.combine": "mean_k"}, "model.moe.combine=mean_k"),
        ({**SOFTMAX, "model.moe.combine": "renorm", "model.moe.first_dense": 1}, "model.moe.first_dense=1"),
    ],
)
def test_what_no_transformers_moe_expresses_is_refused_in_one_line(changes, field):
    cfg = tiny_config(**{**MOE, **changes})
    with pytest.raises(ConfigError, match=f"^this run cannot be exported to transformers: {field} ") as e:
        export_hf.check_exportable(cfg)
    assert "\n" not in str(e.value)


def test_expert_moments_are_over_the_rows_routed_to_each_expert():
    base = {**MOE, "model.depth": 2, "model.moe.num_shared": 1}
    tokens = np.random.default_rng(1).integers(0, 256, (2, 32)).astype(np.int32)
    runs = {}
    for name, over in {
        "tiled": {"model.moe.grouped_impl": "tiled"},
        "ragged_dot": {"model.moe.grouped_impl": "ragged_dot"},
        "capacity": {"model.moe.dispatch": "capacity", "model.moe.capacity_factor": 4.0},
    }.items():
        md = transformer.ModelDef(tiny_config(**{**base, **over}))
        out = md.forward(md.init(0), tokens, capture=("moments",))
        assert not np.asarray(out.moe["moe_dropped_fraction"]).any()
        runs[name] = jax.tree.map(np.asarray, out.captured["moments"]["moe_blocks"])
    m = runs["tiled"]
    assert m["w_up_e"].shape == (2, 4, 32, 32) and m["w_down_e"].shape == (2, 4, 24, 24)
    # the shared expert sees every token once, the routed experts together every token K = 2 times
    np.testing.assert_allclose(m["w_up_e"].sum(1), 2 * m["w_up_s"], rtol=1e-5, atol=1e-5 * np.abs(m["w_up_s"]).max())
    load = np.trace(m["w_up_e"], axis1=-2, axis2=-1)
    assert (load > 0).all() and load.max() > 1.2 * load.min()  # uneven loads: not every token in every expert
    for other in ("ragged_dot", "capacity"):
        for k in ("w_up_e", "w_gate_e", "w_down_e"):
            np.testing.assert_allclose(runs[other][k], m[k], rtol=1e-5, atol=1e-5 * np.abs(m[k]).max())


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory, tiny_corpus):
    """(run dir, loaded Run) of the paper's MoE (sigmoid, mean_k, routing bias, a shared expert) trained 400 steps."""
    cfg = tiny_config(
        **{"model.width": 32, "model.num_heads": 2, "model.ffn_size": 64, "model.moe.num_experts": 4}
        | {"model.moe.num_active": 2, "model.moe.expert_ffn_size": 32, "model.moe.num_shared": 1}
        | {"train.steps": 400, "train.eval_every": 400, "train.eval_steps": 4, "train.sample_tokens": 0}
        | {"train.peak_flops": 1e11, "checkpoint.every": 400, "checkpoint.async_save": False}
    )
    run_dir = str(tmp_path_factory.mktemp("moe_run"))
    with redirect_stdout(io.StringIO()):
        loop.Trainer(cfg, run_dir, mesh=one_device_mesh(cfg), corpus=tiny_corpus).run()
    return run_dir, ptq.load_run(run_dir, mesh=one_device_mesh(cfg), corpus=tiny_corpus)


def test_ptq_of_an_moe_run_quantizes_experts_and_its_gap_falls_with_bits(moe_run):
    _, run = moe_run
    assert run.moe_bias is not None and np.any(run.moe_bias)
    q = ptq.quantize_params(run.setup.model, run.params, ptq.Spec(3, "rtn"), [])
    for name in ("w_up_e", "w_gate_e", "w_down_e", "w_up_s", "wq"):
        assert not np.allclose(q["moe_blocks"][name], run.params["moe_blocks"][name]), name
    assert np.array_equal(q["moe_blocks"]["router"], run.params["moe_blocks"]["router"])
    specs = [ptq.Spec(b, m, calib_batches=4) for m in ("rtn", "gptq") for b in (3, 4, 8)]
    entries = {(e["method"], e["bits"]): e["delta"] for e in ptq.evaluate(run, specs)}
    print("MoE PTQ deltas:", {f"{m}{b}": round(d, 5) for (m, b), d in entries.items()}, file=sys.stderr)
    # measured (2-core CPU): rtn +0.0345, +0.0034, -0.0003; gptq +0.0121, +0.0011, +0.00005 nats at 3, 4, 8 bits
    for m in ("rtn", "gptq"):
        assert entries[(m, 3)] > entries[(m, 4)] > entries[(m, 8)], m
        assert abs(entries[(m, 8)]) < 0.002 and entries[(m, 3)] > 0.005
    assert entries[("gptq", 3)] < entries[("rtn", 3)] - 0.01 and entries[("gptq", 4)] < entries[("rtn", 4)]


def test_eval_of_an_moe_run_prints_the_expert_load(moe_run, tmp_path):
    run_dir, _ = moe_run
    text = tmp_path / "text.txt"
    text.write_text(open(os.path.join(ROOT, "maxscale", "model", "moe.py")).read())
    out = io.StringIO()
    with redirect_stdout(out):
        assert evaluate.main([f"--run={run_dir}", f"--data={text}", "--json"]) == 0
    result = json.loads(out.getvalue())
    load = np.asarray(result["expert_load"])
    assert load.shape == (2, 4) and np.allclose(load.sum(-1), 1.0) and (load > 0).all()
    assert 1.0 < result["loss"] < 6.0 and result["bits_per_byte"] > 0
    with redirect_stdout(out := io.StringIO()):
        assert evaluate.main([f"--run={run_dir}", f"--data={text}"]) == 0
    lines = out.getvalue().splitlines()
    assert "nats/token" in lines[0] and "bits/byte" in lines[0] and lines[1].startswith("expert load")
    assert lines[2].startswith("  moe layer 0: ") and len(lines) == 4


def test_a_trained_moe_run_exports_with_its_routing_bias_and_imports_back(moe_run, tmp_path):
    pytest.importorskip("torch")
    run_dir, run = moe_run
    out = io.StringIO()
    with redirect_stdout(out):
        assert export_hf.main([f"--run={run_dir}", f"--out={tmp_path}/hf"]) == 0
        assert import_hf.main([f"--hf={tmp_path}/hf", f"--out={tmp_path}/back"]) == 0
    assert "Glm4MoeForCausalLM" in out.getvalue()
    tokens = np.asarray(tok_lib.get("byte").encode("def moe(x):\n    return x + 1\n"), np.int32)[None]
    ours = np.asarray(run.setup.model.apply(run.params, tokens, moe_bias=run.moe_bias))
    _, theirs = _hf_logits(tmp_path / "hf", tokens)
    scale = np.abs(ours).max()
    np.testing.assert_allclose(theirs, ours, rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_allclose(_imported_logits(tmp_path / "back", tokens), ours, rtol=1e-5, atol=1e-5 * scale)
    back = config_lib.from_json(open(tmp_path / "back" / "config.json").read()).model.moe
    assert (back.score, back.combine, back.num_shared, back.balance) == ("sigmoid", "mean_k", 1, "bias")


HF_MOES = {  # transformers config class, kwargs: what transformers itself saves (fused experts, its own defaults)
    "glm4moe-scaled-renorm-shared": ("Glm4MoeConfig", {"n_routed_experts": 4, "n_shared_experts": 1}
                                     | {"routed_scaling_factor": 2.5, "first_k_dense_replace": 1}
                                     | {"partial_rotary_factor": 1.0, "use_qk_norm": True}),
    "qwen3moe-unnormalised-mlp_only": ("Qwen3MoeConfig", {"num_experts": 4, "norm_topk_prob": False}
                                       | {"mlp_only_layers": [0]}),
    "mixtral": ("MixtralConfig", {"num_local_experts": 4}),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(HF_MOES))
def test_moe_checkpoints_saved_by_transformers_import_with_their_logits(case, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    name, kw = HF_MOES[case]
    sizes = dict(vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4)
    sizes |= dict(num_key_value_heads=2, head_dim=8, num_experts_per_tok=2)
    if name != "MixtralConfig":
        sizes["moe_intermediate_size"] = 24
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, name)(**sizes, **kw)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + 0.3 * torch.randn_like(p)).add_(0.02 * torch.randn_like(p))
        for buf_name, buf in model.named_buffers():
            if buf_name.endswith("e_score_correction_bias"):
                buf.copy_(0.05 * torch.randn_like(buf))
    model.save_pretrained(str(tmp_path / "hf"))
    with redirect_stdout(io.StringIO()):
        import_hf.import_hf(str(tmp_path / "hf"), str(tmp_path / "w"), overrides=[("data.tokenizer", "byte")])
    tokens = np.random.default_rng(1).integers(0, 256, (2, 24)).astype(np.int32)
    with torch.no_grad():
        theirs = model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    ours = _imported_logits(tmp_path / "w", tokens)
    scale = np.abs(theirs).max()
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5 * scale)
    print(f"{case}: max |diff| {np.abs(theirs - ours).max():.2e} of max |logit| {scale:.2e}")


GLM = {"model_type": "glm4_moe", "hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2}
GLM |= {"intermediate_size": 48, "vocab_size": 256, "moe_intermediate_size": 24, "n_routed_experts": 4}
GLM |= {"num_experts_per_tok": 2, "partial_rotary_factor": 1.0}


@pytest.mark.parametrize(
    "changes,words",
    [
        ({"partial_rotary_factor": None}, "partial_rotary_factor"),  # Glm4Moe's default rotates half of each head
        ({"n_group": 2, "topk_group": 1}, "topk_group=1 < n_group=2"),
        ({"model_type": "qwen3_moe", "num_experts": 4, "mlp_only_layers": [1]}, "MoE layers ([0, 2])"),
        ({"n_routed_experts": None}, "no positive integer experts"),
    ],
)
def test_moe_checkpoints_maxscale_cannot_run_are_refused_in_one_line(changes, words):
    hf = {k: v for k, v in {**GLM, **changes}.items() if v is not None}
    with pytest.raises(ConfigError, match=None) as e:
        import_hf.build_config(hf, None, [])
    assert words in str(e.value) and "\n" not in str(e.value), str(e.value)
