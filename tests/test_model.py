"""Model: variants run, parameters carry their metadata, scan keeps compile time flat in depth."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from maxscale.model import layers, mlp, transformer

TOKENS = (jnp.arange(32).reshape(2, 16) * 7) % 200  # tokens_BT of two rows


def _logits(over, params=None, tokens=TOKENS):
    model = transformer.ModelDef(tiny_config(**over))
    params = model.init(0) if params is None else params
    logits = jax.jit(model.apply)(params, tokens)
    assert logits.shape == (*tokens.shape, model.cfg.model.vocab_size) and logits.dtype == jnp.float32
    assert bool(jnp.isfinite(logits).all())
    return model, params, logits


def _ce_and_grads(model, params, tokens=TOKENS):
    return jax.jit(jax.value_and_grad(lambda p: model.loss(p, tokens, jnp.roll(tokens, -1, axis=1))[0]["ce"]))(params)


def test_gelu_layernorm_branch_equals_a_hand_written_reference():
    """The MLP half of a gelu+layernorm block against numpy: LN(x) = (x - mean) / sqrt(var + eps) * g + b, then
    gelu(h W_up) W_down (tanh form, jax.nn.gelu's default). The whole model then ignores a constant added to every
    embedding entry (each LayerNorm subtracts it), which an RMSNorm model does not."""
    over = {"model.mlp": "gelu", "model.norm": "layernorm"}
    model, params, logits = _logits(over)
    blk = {k: np.asarray(v[0], np.float64) for k, v in params["blocks"].items()}  # layer 0
    assert "w_gate" not in blk and "mlp_norm_bias" in blk
    rng = np.random.default_rng(0)
    blk["mlp_norm"] = blk["mlp_norm"] + rng.normal(size=blk["mlp_norm"].shape)  # gains and biases that matter
    blk["mlp_norm_bias"] = rng.normal(size=blk["mlp_norm_bias"].shape)
    x = rng.normal(size=(2, 5, blk["w_up"].shape[0])) * 3 + 1
    eps = model.cfg.model.norm_eps
    h_ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps) * blk["mlp_norm"]
    h_ref += blk["mlp_norm_bias"]
    u = h_ref @ blk["w_up"]
    ref = 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u**3))) @ blk["w_down"]
    f32 = {k: jnp.asarray(v, jnp.float32) for k, v in blk.items()}
    h = layers.norm(jnp.asarray(x, jnp.float32), f32["mlp_norm"], f32["mlp_norm_bias"], "layernorm", eps)
    np.testing.assert_allclose(h, h_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(mlp.apply(f32, h, model.cfg, layers.Matmul()), ref, rtol=1e-3, atol=1e-5)
    for norm, invariant in (("layernorm", True), ("rmsnorm", False)):
        model, params, logits = _logits({**over, "model.norm": norm})
        shifted = {**params, "embed": params["embed"] + 0.5}
        moved = float(jnp.abs(jax.jit(model.apply)(shifted, TOKENS) - logits).max())
        assert (moved < 1e-4) if invariant else (moved > 1e-2), (norm, moved)


def test_tied_embeddings_share_one_matrix_and_its_gradient():
    """Tied: no readout matrix, and the table's gradient has the readout's part (nonzero rows for tokens that never
    occur in the input); untied, those rows get no gradient at all."""
    absent = np.setdiff1d(np.arange(256), np.asarray(TOKENS))
    for tied in (True, False):
        model, params, _ = _logits({"model.tie_embeddings": tied})
        assert ("unembed" in params) is not tied
        _, grads = _ce_and_grads(model, params)
        g_absent = float(jnp.abs(grads["embed"][absent]).max())
        assert (g_absent > 1e-6) if tied else (g_absent == 0.0), (tied, g_absent)


def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys():
    for qk_norm in (True, False):
        model, params, logits = _logits({"model.qk_norm": qk_norm})
        big = {**params, "blocks": {**params["blocks"]}}
        big["blocks"]["wq"] = params["blocks"]["wq"] * 8
        big["blocks"]["wk"] = params["blocks"]["wk"] * 8
        moved = float(jnp.abs(jax.jit(model.apply)(big, TOKENS) - logits).max())
        assert (moved < 1e-3) if qk_norm else (moved > 1e-3), (qk_norm, moved)


@pytest.mark.parametrize("impl", ["xla", "explicit", "chunked"])
def test_grouped_query_attention_equals_repeated_kv_heads(impl):
    """num_kv_heads=2: query head h reads kv head h // (H/G); the same model with every kv head repeated H/G times
    as a full multi-head model gives the same logits (each kernel groups the heads its own way)."""
    gqa, params, logits = _logits({"model.num_kv_heads": 2, "model.attention_impl": impl})
    heads = gqa.cfg.model.num_heads
    assert heads > 2 and params["blocks"]["wk"].shape[2] == 2
    full = {**params, "blocks": {**params["blocks"]}}
    for name in ("wk", "wv"):
        full["blocks"][name] = jnp.repeat(params["blocks"][name], heads // 2, axis=2)  # [L, D, G, K] -> [L, D, H, K]
    _, _, want = _logits({"model.num_kv_heads": heads, "model.attention_impl": "xla"}, full)
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_is_close_to_float32_but_not_equal():
    model, params, f32 = _logits({})
    _, _, bf16 = _logits({"model.dtype": "bfloat16"}, params)
    err = float(jnp.abs(bf16 - f32).max() / jnp.abs(f32).max())
    assert 0 < err < 0.05, err


def test_remat_gives_the_same_values_and_gradients():
    model, params, logits = _logits({})
    remat, _, logits_r = _logits({"model.remat": True}, params)
    np.testing.assert_allclose(logits_r, logits, rtol=1e-6, atol=1e-6)
    (ce, g), (ce_r, g_r) = _ce_and_grads(model, params), _ce_and_grads(remat, params)
    assert float(ce_r) == pytest.approx(float(ce), rel=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g_r, g)
    grad_fn = lambda m: jax.grad(lambda p: m.loss(p, TOKENS, TOKENS)[0]["ce"])  # noqa: E731
    assert "remat" in str(jax.make_jaxpr(grad_fn(remat))(params)) and "remat" not in str(
        jax.make_jaxpr(grad_fn(model))(params)
    )


def test_causal_future_tokens_do_not_change_past_logits():
    cfg = tiny_config()
    model = transformer.ModelDef(cfg)
    params = model.init(0)
    a = jnp.arange(16)[None] % 200
    b = a.at[0, 10:].set(7)
    la, lb = model.apply(params, a), model.apply(params, b)
    np.testing.assert_allclose(la[0, :10], lb[0, :10], rtol=1e-5, atol=1e-5)
    assert not np.allclose(la[0, 10:], lb[0, 10:])


def test_every_param_has_role_axes_and_fan_in():
    cfg = tiny_config()
    model = transformer.ModelDef(cfg)
    assert set(model.specs) >= {"embed", "unembed", "final_norm", "blocks/wq", "blocks/w_down"}
    for path, spec in model.specs.items():
        assert spec.role in ("embedding", "hidden", "readout", "norm", "bias")
        if path.startswith("blocks/"):
            assert spec.axes[0] == "layers"
    assert model.specs["blocks/wo"].fan_in == ("heads", "head_dim")


def test_flops_per_token_counts_matmuls():
    cfg = tiny_config()
    m = cfg.model
    dense = m.depth * (4 * m.width * m.width + 3 * m.width * m.ffn_size) + m.width * m.vocab_size
    assert transformer.flops_per_token(cfg) == 6 * dense + 12 * m.depth * cfg.data.seq_len * m.width
