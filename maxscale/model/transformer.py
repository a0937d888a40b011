"""Decoder-only transformer in Flax NNX, with stacked block parameters scanned over depth.

Shapes in names: B batch, T sequence, D width, H query heads, G key/value heads, K head dim, F ffn size, V vocab,
L layers. Every parameter is an `nnx.Param` whose metadata (`role`, `axes`, `fan_in`) is the single input of the
parameterization (init std, LR/WD/eps factors) and of the sharding rules; forward multipliers come from the same
`Parameterization` object. Block parameters carry a leading `layers` axis and the blocks run under `jax.lax.scan`,
so compile time does not grow with depth.
"""

from __future__ import annotations

from typing import Iterator

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from maxscale import sharding
from maxscale.parameterization import Parameterization, ParamSpec, spec_of

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _param(rngs: nnx.Rngs, par: Parameterization, name: str, spec: ParamSpec, dtype) -> nnx.Param:
    shape = tuple(par.sizes[a] for a in spec.axes)
    if spec.role == "norm":
        value = jnp.ones(shape, dtype)  # gains start at one
    else:
        std = par.init_std(spec, name)
        key = rngs.params()
        value = (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype) if std else jnp.zeros(shape, dtype)
    return nnx.Param(value, role=spec.role, axes=spec.axes, fan_in=spec.fan_in)


def block_specs(cfg: ml_collections.ConfigDict) -> dict[str, ParamSpec]:
    """The parameters of one block, each with a leading `layers` axis (stacked over depth)."""
    m = cfg.model
    L = ("layers",)
    specs = {
        "attn_norm": ParamSpec("norm", L + ("embed",), ()),
        "wq": ParamSpec("hidden", L + ("embed", "heads", "head_dim"), ("embed",)),
        "wk": ParamSpec("hidden", L + ("embed", "kv_heads", "head_dim"), ("embed",)),
        "wv": ParamSpec("hidden", L + ("embed", "kv_heads", "head_dim"), ("embed",)),
        "wo": ParamSpec("hidden", L + ("heads", "head_dim", "embed"), ("heads", "head_dim")),
        "mlp_norm": ParamSpec("norm", L + ("embed",), ()),
        "w_up": ParamSpec("hidden", L + ("embed", "mlp"), ("embed",)),
        "w_down": ParamSpec("hidden", L + ("mlp", "embed"), ("mlp",)),
    }
    if m.mlp == "swiglu":
        specs["w_gate"] = ParamSpec("hidden", L + ("embed", "mlp"), ("embed",))
    if m.qk_norm:
        specs["q_norm"] = ParamSpec("norm", L + ("head_dim",), ())
        specs["k_norm"] = ParamSpec("norm", L + ("head_dim",), ())
    if m.norm == "layernorm":
        specs["attn_norm_bias"] = ParamSpec("bias", L + ("embed",), ())
        specs["mlp_norm_bias"] = ParamSpec("bias", L + ("embed",), ())
    return specs


# ----------------------------------------------------------------------------------------------------------------
# Pure block math (arrays in, arrays out): what the scan runs.

def _norm(x_BTD, gain, bias, kind: str, eps: float):
    x = x_BTD.astype(jnp.float32)
    if kind == "layernorm":
        x = x - x.mean(-1, keepdims=True)
    x = x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + eps)
    x = x * gain.astype(jnp.float32)
    if bias is not None:
        x = x + bias.astype(jnp.float32)
    return x.astype(x_BTD.dtype)


def rope(x_BTHK, theta: float):
    """Rotary position embedding over the last axis (split halves)."""
    T, K = x_BTHK.shape[1], x_BTHK.shape[-1]
    freq_k = theta ** (-jnp.arange(0, K // 2, dtype=jnp.float32) * 2 / K)
    angle_TK = jnp.arange(T, dtype=jnp.float32)[:, None] * freq_k[None, :]
    sin, cos = jnp.sin(angle_TK)[None, :, None, :], jnp.cos(angle_TK)[None, :, None, :]
    x1, x2 = jnp.split(x_BTHK.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTHK.dtype)


def _mean_abs(x):
    return jnp.abs(x.astype(jnp.float32)).mean()


def block(p: dict, x_BTD, cfg: ml_collections.ConfigDict, mults: dict, capture: bool = False):
    """One pre-norm block: x + r * Attn(N(x)); then + r * MLP(N(.)). `p` holds this layer's arrays.

    With `capture`, returns (x, stats): mean |.| of the attention and MLP outputs (before the residual multiplier)
    and of the residual stream after the block, for the coordinate check."""
    m = cfg.model
    dt = DTYPES[m.dtype]
    w = {k: v.astype(dt) for k, v in p.items()}
    res = mults["residual"]

    h = _norm(x_BTD, p["attn_norm"], p.get("attn_norm_bias"), m.norm, m.norm_eps)
    q_BTHK = jnp.einsum("btd,dhk->bthk", h, w["wq"])
    k_BTGK = jnp.einsum("btd,dgk->btgk", h, w["wk"])
    v_BTGK = jnp.einsum("btd,dgk->btgk", h, w["wv"])
    if m.qk_norm:
        q_BTHK = _norm(q_BTHK, p["q_norm"], None, "rmsnorm", m.norm_eps)
        k_BTGK = _norm(k_BTGK, p["k_norm"], None, "rmsnorm", m.norm_eps)
    q_BTHK, k_BTGK = rope(q_BTHK, m.rope_theta), rope(k_BTGK, m.rope_theta)
    att_BTHK = jax.nn.dot_product_attention(q_BTHK, k_BTGK, v_BTGK, scale=mults["attn_scale"], is_causal=True)
    attn_BTD = jnp.einsum("bthk,hkd->btd", att_BTHK, w["wo"])
    x_BTD = x_BTD + res * attn_BTD
    x_BTD = sharding.constrain(x_BTD, ("batch", None, None))

    h = _norm(x_BTD, p["mlp_norm"], p.get("mlp_norm_bias"), m.norm, m.norm_eps)
    up_BTF = jnp.einsum("btd,df->btf", h, w["w_up"])
    if m.mlp == "swiglu":
        act_BTF = jax.nn.silu(jnp.einsum("btd,df->btf", h, w["w_gate"])) * up_BTF
    else:
        act_BTF = jax.nn.gelu(up_BTF)
    mlp_BTD = jnp.einsum("btf,fd->btd", act_BTF, w["w_down"])
    x_BTD = sharding.constrain(x_BTD + res * mlp_BTD, ("batch", None, None))
    if capture:
        return x_BTD, {"attn": _mean_abs(attn_BTD), "mlp": _mean_abs(mlp_BTD), "resid": _mean_abs(x_BTD)}
    return x_BTD


# ----------------------------------------------------------------------------------------------------------------

class Blocks(nnx.Module):
    """All blocks, parameters stacked on a leading `layers` axis."""

    def __init__(self, cfg, par: Parameterization, rngs: nnx.Rngs):
        dtype = DTYPES[cfg.model.param_dtype]
        for name, spec in block_specs(cfg).items():
            setattr(self, name, _param(rngs, par, name, spec, dtype))
        self._names = tuple(block_specs(cfg))

    def __call__(self, x_BTD, cfg, mults, capture: bool = False):
        """Returns x, or (x, {stat: [L]}) with `capture` (per-layer stats as scan outputs)."""
        stacked = {name: getattr(self, name)[...] for name in self._names}
        body = (lambda x, p: block(p, x, cfg, mults, capture=True)) if capture else (
            lambda x, p: (block(p, x, cfg, mults), None))
        if cfg.model.remat:
            body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
        x_BTD, stats = jax.lax.scan(body, x_BTD, stacked)
        return (x_BTD, stats) if capture else x_BTD


class Transformer(nnx.Module):
    def __init__(self, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs):
        self.cfg = cfg
        self.par = Parameterization(cfg)
        dtype = DTYPES[cfg.model.param_dtype]
        self.embed = _param(rngs, self.par, "embed", ParamSpec("embedding", ("vocab", "embed"), ()), dtype)
        self.blocks = Blocks(cfg, self.par, rngs)
        self.final_norm = _param(rngs, self.par, "final_norm", ParamSpec("norm", ("embed",), ()), dtype)
        if cfg.model.norm == "layernorm":
            self.final_norm_bias = _param(rngs, self.par, "final_norm_bias", ParamSpec("bias", ("embed",), ()), dtype)
        if not cfg.model.tie_embeddings:
            self.unembed = _param(rngs, self.par, "unembed", ParamSpec("readout", ("embed", "vocab"), ("embed",)), dtype)

    def __call__(self, tokens_BT, capture: bool = False):
        """Returns float32 logits [B, T, V]; with `capture`, (logits, stats) where stats holds mean |x| of the
        embedding output, the logits, and per layer ([L]) the attention and MLP outputs and the residual stream."""
        m = self.cfg.model
        dt = DTYPES[m.dtype]
        mults = self.par.multipliers()
        embed_VD = self.embed[...]
        # Gather from a whole table (FSDP all-gathers it, as it does every weight): a lookup into a table sharded
        # on `embed` yields rows sharded the wrong way, and XLA then replicates them in the backward pass.
        table_VD = sharding.constrain(embed_VD.astype(dt), (None, None))
        x_BTD = (table_VD[tokens_BT] * mults["input"]).astype(dt)
        x_BTD = sharding.constrain(x_BTD, ("batch", None, None))
        if capture:
            stats = {"embed": _mean_abs(x_BTD)}
            x_BTD, stats["layers"] = self.blocks(x_BTD, self.cfg, mults, capture=True)
        else:
            x_BTD = self.blocks(x_BTD, self.cfg, mults)
        bias = self.final_norm_bias[...] if m.norm == "layernorm" else None
        x_BTD = _norm(x_BTD, self.final_norm[...], bias, m.norm, m.norm_eps)
        readout_DV = embed_VD.T if m.tie_embeddings else self.unembed[...]
        logits = jnp.einsum("btd,dv->btv", x_BTD, readout_DV.astype(dt), preferred_element_type=jnp.float32)
        logits = logits * mults["output"]
        if capture:
            return logits, {**stats, "logits": _mean_abs(logits)}
        return logits


# ----------------------------------------------------------------------------------------------------------------
# Functional view: the trainer keeps params as a plain nested dict of arrays.

class ModelDef:
    """Pure-function view of the model: `apply(params, tokens)`; params are a nested dict of arrays."""

    def __init__(self, cfg: ml_collections.ConfigDict):
        self.cfg = cfg
        abstract = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
        self.graphdef, state = nnx.split(abstract)
        self._state_treedef = jax.tree.structure(state)
        self.specs = {path: spec_of(v) for path, v in _flat_params(state)}
        self.abstract_params = nnx.to_pure_dict(state)

    def init(self, seed: int) -> dict:
        """Initial params (call under jit with out_shardings to create them sharded)."""
        return nnx.to_pure_dict(nnx.state(Transformer(self.cfg, nnx.Rngs(seed))))

    def apply(self, params: dict, tokens_BT, capture: bool = False):
        """Logits [B, T, V]; with `capture`, (logits, stats) as in `Transformer.__call__` (coordinate checks)."""
        state = jax.tree.unflatten(self._state_treedef, jax.tree.leaves(params))
        return nnx.merge(self.graphdef, state)(tokens_BT, capture=capture)

    def spec_tree(self) -> dict:
        """A tree shaped like params whose leaves are ParamSpecs."""
        return _unflatten({path: spec for path, spec in self.specs.items()})


def _flat_params(state) -> Iterator[tuple[str, nnx.Param]]:
    for path, var in nnx.to_flat_state(state):
        yield "/".join(str(k) for k in path), var


def _unflatten(flat: dict) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        *parents, leaf = path.split("/")
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = value
    return out


def param_specs(cfg: ml_collections.ConfigDict) -> list[tuple[str, ParamSpec, tuple[int, ...]]]:
    """(path, spec, shape) of every parameter, without allocating any."""
    abstract = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
    return [(path, spec_of(v), tuple(v.get_value().shape)) for path, v in _flat_params(nnx.state(abstract))]


def count_params(cfg: ml_collections.ConfigDict) -> dict[str, int]:
    total = embedding = 0
    for _, spec, shape in param_specs(cfg):
        n = 1
        for s in shape:
            n *= s
        total += n
        if spec.role == "embedding":
            embedding += n
    return {"total": total, "non_embedding": total - embedding}


def flops_per_token(cfg: ml_collections.ConfigDict) -> float:
    """Training FLOPs per token: 6 x matmul params (readout included) + 12 L T H K for attention (PaLM, App. B)."""
    m = cfg.model
    n_mlp = 3 if m.mlp == "swiglu" else 2
    per_layer = m.width * m.head_dim * (2 * m.num_heads + 2 * m.num_kv_heads) + n_mlp * m.width * m.ffn_size
    matmul_params = m.depth * per_layer + m.width * m.vocab_size
    return 6.0 * matmul_params + 12.0 * m.depth * cfg.data.seq_len * m.num_heads * m.head_dim
