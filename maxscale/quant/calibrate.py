"""An observable forward pass: the model's own blocks, one layer at a time, with an observer in the quantizer's seat.

The block stack runs under `jax.lax.scan`, so nothing inside a layer can be seen from outside except through the
scan's outputs. Here the layers run unrolled in Python (`transformer.block` on each layer's slice of the stacked
params) with an `Observer` as the quantizer of the matmul entry point. It delegates to the run's own quantizer (or
to none) and reports what it sees to callbacks, which turn it into values of the same trace: calibration inputs
for GPTQ (`Calibrator`), quantization errors (`maxscale.quant.metrics`). Everything here is jittable.

Shapes: B batch, T sequence, D width, V vocab, N rows (B*T), I a matrix's input (contracted) features, O its output
features. A weight in its einsum layout (e.g. wo [H, K, D] for "bthk,hkd->btd") maps to w_IO [I, O] with
`weight_to_IO`; an activation to rows x_NI with `inputs_to_NI`, contracted axes in the same order.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections

from maxscale.model import layers, transformer
from maxscale.parameterization import Parameterization

# (kind, x, x_hat) for every tensor the inner quantizer changed; kind: weights, activations, kv, probs.
OnQuantize = Callable[[str, jax.Array, jax.Array], None]
# (weight name, einsum equation, the matmul's input as the matmul sees it) for every named weight.
OnMatmul = Callable[[str, str, jax.Array], None]


@dataclasses.dataclass(eq=False)
class Observer:
    """A `layers.Quantizer` that delegates to `inner` (None: identity) and reports to the callbacks.

    `names` maps id(weight array) -> parameter name for the arrays of the layer being run (set by
    `run_block`), so the input of each matmul is reported under its weight's name. Matmul calls
    `activations` then `weights` for each product, so the input seen last is the one of that weight."""

    inner: object | None = None
    on_quantize: OnQuantize | None = None
    on_matmul: OnMatmul | None = None
    names: dict = dataclasses.field(default_factory=dict)
    _input: jax.Array | None = None

    @property
    def quantizes_kv(self) -> bool:
        return self.inner is not None and self.inner.quantizes_kv

    @property
    def whole_attention(self) -> bool:
        return self.inner is not None and self.inner.whole_attention

    def _pass(self, kind: str, method: str, x, *args):
        x_hat = x if self.inner is None else getattr(self.inner, method)(x, *args)
        if x_hat is not x and self.on_quantize is not None:  # the quantizer returns x itself when it skips x
            self.on_quantize(kind, x, x_hat)
        return x_hat

    def activations(self, x, eq: str, role: str):
        self._input = self._pass("activations", "activations", x, eq, role)
        return self._input

    def weights(self, w, eq: str, role: str):
        name = self.names.get(id(w))
        if name is not None and self.on_matmul is not None:
            self.on_matmul(name, eq, self._input)
        return self._pass("weights", "weights", w, eq, role)

    def kv(self, x_BTGK):
        return self._pass("kv", "kv", x_BTGK)

    def probs(self, p):
        return self._pass("probs", "probs", p)

    def table(self, table_VD):
        return self._pass("weights", "table", table_VD)


def observing_matmul(cfg: ml_collections.ConfigDict, observer: Observer) -> layers.Matmul:
    """The run's matmul entry point with `observer` as its quantizer (passed to `transformer.block`), so the real
    block is observed, not a copy of it."""
    return layers.Matmul(dtype=layers.DTYPES[cfg.model.dtype], quantizer=observer)


# ------------------------------------------------------------------------------------------------ the forward pass


def hidden_matrices(cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
    """Names of the block's stacked matrices with role hidden (wq wk wv wo w_up w_gate w_down for a dense block)."""
    return tuple(name for name, spec in transformer.block_specs(cfg).items() if spec.role == "hidden")


def layer_params(params: dict, layer: int, cfg: ml_collections.ConfigDict) -> dict:
    """Layer `layer`'s slice of the stacked block params; hidden matrices cast to the compute dtype, so the Matmul's
    own cast is a no-op and the array it hands the quantizer is the one `run_block` named."""
    dt = layers.DTYPES[cfg.model.dtype]
    hidden = set(hidden_matrices(cfg))
    return {k: (v[layer].astype(dt) if k in hidden else v[layer]) for k, v in params["blocks"].items()}


def run_block(cfg: ml_collections.ConfigDict, p_layer: dict, x_BTD, observer: Observer):
    """transformer.block on one layer's params with `observer` as the quantizer; returns the block's output."""
    observer.names = {id(p_layer[k]): k for k in hidden_matrices(cfg)}
    mm = observing_matmul(cfg, observer)
    out_BTD = transformer.block(p_layer, x_BTD, cfg, Parameterization(cfg).multipliers(), mm=mm)
    observer.names = {}
    return out_BTD


def embed(cfg: ml_collections.ConfigDict, params: dict, tokens_BT, observer: Observer | None = None):
    """The embedding lookup as Transformer.__call__ does it (table quantized when the run quantizes it)."""
    dt = layers.DTYPES[cfg.model.dtype]
    table_VD = params["embed"].astype(dt)
    if observer is not None:
        table_VD = observer.table(table_VD)
    return (table_VD[tokens_BT] * Parameterization(cfg).multipliers()["input"]).astype(dt)


def final_hidden(cfg: ml_collections.ConfigDict, params: dict, x_BTD):
    """The final norm: the readout's input [B, T, D]."""
    m = cfg.model
    bias = params.get("final_norm_bias") if m.norm == "layernorm" else None
    return layers.norm(x_BTD, params["final_norm"], bias, m.norm, m.norm_eps)


def readout(cfg: ml_collections.ConfigDict, params: dict, h_BTD, observer: Observer):
    """Float32 logits [B, T, V] from the final hidden state, through the observed matmul entry point."""
    w_DV = params["embed"].T if cfg.model.tie_embeddings else params["unembed"]
    mm = layers.Matmul(dtype=layers.DTYPES[cfg.model.dtype], quantizer=observer)
    logits = mm("btd,dv->btv", h_BTD, w_DV, role="readout", out_dtype=jnp.float32)
    return logits * Parameterization(cfg).multipliers()["output"]


def unrolled_logits(cfg: ml_collections.ConfigDict, params: dict, tokens_BT, observer: Observer):
    """The model's logits [B, T, V] computed layer by layer with `observer` seeing every quantizer call."""
    x_BTD = embed(cfg, params, tokens_BT, observer)
    for layer in range(cfg.model.depth):
        x_BTD = run_block(cfg, layer_params(params, layer, cfg), x_BTD, observer)
    return readout(cfg, params, final_hidden(cfg, params, x_BTD), observer)


# ---------------------------------------------------------------------------------------------------- layouts


def _letters(eq: str) -> tuple[str, str, str]:
    inputs, _, out = eq.replace(" ", "").partition("->")
    x_sub, w_sub = inputs.split(",")
    return x_sub, w_sub, out


def weight_to_IO(w, eq: str) -> jax.Array:
    """A weight in its einsum layout -> [I, O]: contracted axes first (in the activation's order), then the rest."""
    x_sub, w_sub, out = _letters(eq)
    contracted = sorted((c for c in w_sub if c not in out), key=x_sub.index)
    kept = [c for c in w_sub if c in out]
    w_t = jnp.transpose(w, [w_sub.index(c) for c in contracted + kept])
    n_in = math.prod(w.shape[w_sub.index(c)] for c in contracted)
    return w_t.reshape(n_in, -1)


def weight_from_IO(w_IO, eq: str, shape: tuple[int, ...]) -> jax.Array:
    """Inverse of `weight_to_IO` for a weight of `shape`."""
    x_sub, w_sub, out = _letters(eq)
    order = sorted((c for c in w_sub if c not in out), key=x_sub.index) + [c for c in w_sub if c in out]
    perm = [w_sub.index(c) for c in order]
    w_t = jnp.reshape(w_IO, [shape[i] for i in perm])
    return jnp.transpose(w_t, [perm.index(i) for i in range(len(shape))])


def inputs_to_NI(x, eq: str) -> jax.Array:
    """A matmul's activation operand -> rows [N, I], contracted axes last in their own order."""
    x_sub, _, out = _letters(eq)
    kept = [i for i, c in enumerate(x_sub) if c in out]
    contracted = [i for i, c in enumerate(x_sub) if c not in out]
    n_in = math.prod(x.shape[i] for i in contracted)
    return jnp.transpose(x, kept + contracted).reshape(-1, n_in)


# ---------------------------------------------------------------------------------------------------- calibration


class Calibrator:
    """Jitted per-layer pieces for GPTQ calibration of one config (every layer has the same shapes, so each
    compiles once): `embed`, `moments` (X^T X and row counts of every hidden matrix's input), `forward` (one block
    as the run computes it), `head_moments` (the readout's input)."""

    def __init__(self, cfg: ml_collections.ConfigDict):
        self.cfg = cfg
        self.embed = jax.jit(lambda params, tokens_BT: embed(cfg, params, tokens_BT))
        self.moments = jax.jit(self._moments)
        self.forward = jax.jit(
            lambda p_layer, x_BTD: transformer.block(p_layer, x_BTD, cfg, Parameterization(cfg).multipliers())
        )
        self.head_moments = jax.jit(self._head_moments)

    def equations(self) -> dict[str, str]:
        """{matrix name: einsum equation} of one block, read off a shape-only trace of the real block."""
        eqs = {}
        observer = Observer(on_matmul=lambda name, eq, x: eqs.setdefault(name, eq))
        m = self.cfg.model
        x = jax.ShapeDtypeStruct((1, 2, m.width), layers.DTYPES[m.dtype])
        p = {k: jax.ShapeDtypeStruct(v.shape[1:], v.dtype) for k, v in _abstract_blocks(self.cfg).items()}
        jax.eval_shape(lambda p, x: run_block(self.cfg, _cast_hidden(self.cfg, p), x, observer), p, x)
        missing = set(hidden_matrices(self.cfg)) - set(eqs)
        if missing:
            raise RuntimeError(f"calibration did not see the inputs of {sorted(missing)}")
        return eqs

    def _moments(self, p_layer: dict, x_BTD) -> dict[str, jax.Array]:
        """{name: X^T X [I, I] float32} of each hidden matrix's input over this batch's B*T rows."""
        out = {}

        def record(name, eq, x):
            x_NI = inputs_to_NI(x, eq).astype(jnp.float32)
            out[name] = x_NI.T @ x_NI

        run_block(self.cfg, _cast_hidden(self.cfg, p_layer), x_BTD, Observer(on_matmul=record))
        return out

    def _head_moments(self, params: dict, x_BTD) -> jax.Array:
        h_ND = final_hidden(self.cfg, params, x_BTD).reshape(-1, x_BTD.shape[-1]).astype(jnp.float32)
        return h_ND.T @ h_ND


def _abstract_blocks(cfg) -> dict:
    return transformer.ModelDef(cfg).abstract_params["blocks"]


def _cast_hidden(cfg, p_layer: dict) -> dict:
    dt = layers.DTYPES[cfg.model.dtype]
    hidden = set(hidden_matrices(cfg))
    return {k: (v.astype(dt) if k in hidden else v) for k, v in p_layer.items()}
