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

from maxscale.model import attention, mlp
from maxscale.model.layers import DTYPES, Matmul, make_param, mean_abs, norm
from maxscale.parallel import sharding
from maxscale.parameterization import Parameterization, ParamSpec, spec_of
from maxscale.quant import qat


def block_specs(cfg: ml_collections.ConfigDict) -> dict[str, ParamSpec]:
    """The parameters of one block, each with a leading `layers` axis (stacked over depth)."""
    L = ("layers",)
    specs = {
        "attn_norm": ParamSpec("norm", L + ("embed",), ()),
        **attention.specs(cfg),
        "mlp_norm": ParamSpec("norm", L + ("embed",), ()),
        **mlp.specs(cfg),
    }
    if cfg.model.norm == "layernorm":
        specs["attn_norm_bias"] = ParamSpec("bias", L + ("embed",), ())
        specs["mlp_norm_bias"] = ParamSpec("bias", L + ("embed",), ())
    return specs


def matmul_for(cfg: ml_collections.ConfigDict) -> Matmul:
    """The matmul entry point configured for this run: compute dtype and, with `quant.*` set, fake quantization."""
    return Matmul(dtype=DTYPES[cfg.model.dtype], quantizer=qat.make_quantizer(cfg))


# ----------------------------------------------------------------------------------------------------------------
# Pure block math (arrays in, arrays out): what the scan runs.


def block(p: dict, x_BTD, cfg: ml_collections.ConfigDict, mults: dict, capture: bool = False):
    """One pre-norm block: x + r * Attn(N(x)); then + r * MLP(N(.)). `p` holds this layer's arrays.

    With `capture`, returns (x, stats): mean |.| of the attention and MLP outputs (before the residual multiplier)
    and of the residual stream after the block, for the coordinate check."""
    m = cfg.model
    mm = matmul_for(cfg)
    res = mults["residual"]
    stats = {} if capture else None

    h_BTD = norm(x_BTD, p["attn_norm"], p.get("attn_norm_bias"), m.norm, m.norm_eps)
    x_BTD = x_BTD + res * attention.apply(p, h_BTD, cfg, mults, mm, stats)
    x_BTD = sharding.constrain(x_BTD, ("batch", None, None))

    h_BTD = norm(x_BTD, p["mlp_norm"], p.get("mlp_norm_bias"), m.norm, m.norm_eps)
    x_BTD = x_BTD + res * mlp.apply(p, h_BTD, cfg, mm, stats)
    x_BTD = sharding.constrain(x_BTD, ("batch", None, None))
    if capture:
        return x_BTD, {**stats, "resid": mean_abs(x_BTD)}
    return x_BTD


# ----------------------------------------------------------------------------------------------------------------


class Blocks(nnx.Module):
    """All blocks, parameters stacked on a leading `layers` axis."""

    def __init__(self, cfg, par: Parameterization, rngs: nnx.Rngs):
        dtype = DTYPES[cfg.model.param_dtype]
        for name, spec in block_specs(cfg).items():
            setattr(self, name, make_param(rngs, par, name, spec, dtype))
        self._names = tuple(block_specs(cfg))

    def __call__(self, x_BTD, cfg, mults, capture: bool = False):
        """Returns x, or (x, {stat: [L]}) with `capture` (per-layer stats as scan outputs)."""
        stacked = {name: getattr(self, name)[...] for name in self._names}
        body = (
            (lambda x, p: block(p, x, cfg, mults, capture=True))
            if capture
            else (lambda x, p: (block(p, x, cfg, mults), None))
        )
        if cfg.model.remat:
            body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
        x_BTD, stats = jax.lax.scan(body, x_BTD, stacked)
        return (x_BTD, stats) if capture else x_BTD


class Transformer(nnx.Module):
    def __init__(self, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs):
        self.cfg = cfg
        self.par = Parameterization(cfg)
        dtype = DTYPES[cfg.model.param_dtype]
        self.embed = make_param(rngs, self.par, "embed", ParamSpec("embedding", ("vocab", "embed"), ()), dtype)
        self.blocks = Blocks(cfg, self.par, rngs)
        self.final_norm = make_param(rngs, self.par, "final_norm", ParamSpec("norm", ("embed",), ()), dtype)
        if cfg.model.norm == "layernorm":
            self.final_norm_bias = make_param(
                rngs, self.par, "final_norm_bias", ParamSpec("bias", ("embed",), ()), dtype
            )
        if not cfg.model.tie_embeddings:
            self.unembed = make_param(
                rngs, self.par, "unembed", ParamSpec("readout", ("embed", "vocab"), ("embed",)), dtype
            )

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
        quantizer = qat.make_quantizer(self.cfg)
        if quantizer is not None:
            table_VD = quantizer.table(table_VD)
        x_BTD = (table_VD[tokens_BT] * mults["input"]).astype(dt)
        x_BTD = sharding.constrain(x_BTD, ("batch", None, None))
        if capture:
            stats = {"embed": mean_abs(x_BTD)}
            x_BTD, stats["layers"] = self.blocks(x_BTD, self.cfg, mults, capture=True)
        else:
            x_BTD = self.blocks(x_BTD, self.cfg, mults)
        bias = self.final_norm_bias[...] if m.norm == "layernorm" else None
        x_BTD = norm(x_BTD, self.final_norm[...], bias, m.norm, m.norm_eps)
        readout_DV = embed_VD.T if m.tie_embeddings else self.unembed[...]
        logits = matmul_for(self.cfg)("btd,dv->btv", x_BTD, readout_DV, role="readout", out_dtype=jnp.float32)
        logits = logits * mults["output"]
        if capture:
            return logits, {**stats, "logits": mean_abs(logits)}
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
