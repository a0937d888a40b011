"""Model: variants run, parameters carry their metadata, scan keeps compile time flat in depth."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from maxscale.model import transformer


@pytest.mark.parametrize(
    "over",
    [
        {},
        {"model.mlp": "gelu", "model.norm": "layernorm"},
        {"model.tie_embeddings": True, "model.qk_norm": True},
        {"model.num_kv_heads": 2},
        {"model.dtype": "bfloat16"},
        {"model.remat": True},
    ],
)
def test_variants_give_finite_logits(over):
    cfg = tiny_config(**over)
    model = transformer.ModelDef(cfg)
    params = model.init(0)
    logits = jax.jit(model.apply)(params, jnp.zeros((2, 16), jnp.int32))
    assert logits.shape == (2, 16, cfg.model.vocab_size) and logits.dtype == jnp.float32
    assert bool(jnp.isfinite(logits).all())


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
