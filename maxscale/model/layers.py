"""Building blocks shared by every layer: parameter creation, norms, rotary embeddings, and THE matmul entry point.

Every matmul of the model (q/k/v/o projections, MLP, readout; the router and experts of MoE layers) goes through
`Matmul`, which knows the parameter's role. That is the one place where the compute dtype is applied and where
quantization (weights and activations) wraps a product, so a new layer gets both by calling it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from maxscale.parameterization import Parameterization, ParamSpec

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def make_param(
    rngs: nnx.Rngs, par: Parameterization, name: str, spec: ParamSpec, dtype, layers: int | None = None
) -> nnx.Param:
    """A parameter of `spec`'s shape, initialised by the parameterization; the spec is kept as metadata.
    `layers`: the size of the `layers` axis for this stack (default: the model's depth)."""
    sizes = par.sizes if layers is None else {**par.sizes, "layers": layers}
    shape = tuple(sizes[a] for a in spec.axes)
    if spec.role == "norm":
        value = jnp.ones(shape, dtype)  # gains start at one
    else:
        std = par.init_std(spec, name)
        key = rngs.params()
        value = (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype) if std else jnp.zeros(shape, dtype)
    return nnx.Param(value, role=spec.role, axes=spec.axes, fan_in=spec.fan_in)


class Quantizer(Protocol):
    """What the model asks of a quantizer (maxscale/quant/qat.py): fake-quantize a matmul's operands, knowing the
    role of the weight and the einsum equation (so it can find the contracted axes for per-channel or per-block
    scales); attention keys/values (and, for the whole attention, queries and probabilities); the embedding table."""

    quantizes_kv: bool  # kv() and probs() are used only when this is true
    whole_attention: bool

    def weights(self, w: jax.Array, eq: str, role: str) -> jax.Array: ...

    def activations(self, x: jax.Array, eq: str, role: str) -> jax.Array: ...

    def kv(self, x_BTGK: jax.Array) -> jax.Array: ...

    def probs(self, p: jax.Array) -> jax.Array: ...

    def table(self, table_VD: jax.Array) -> jax.Array: ...


@dataclasses.dataclass(frozen=True)
class Matmul:
    """The model's one matmul entry point: `mm(eq, x, w, role=...)`.

    `eq` is an einsum equation whose first operand is the activation and second the weight; `role` is the weight's
    parameterization role ("hidden", "readout", ...). Operands are cast to the compute dtype here, so weights are
    stored in `param_dtype` and cast once per use. `out_dtype` asks for a wider accumulator/result (the readout
    returns float32 logits from bfloat16 operands)."""

    dtype: Any = jnp.float32
    quantizer: Quantizer | None = None

    def _operands(self, eq: str, x, w, role: str):
        x, w = x.astype(self.dtype), w.astype(self.dtype)
        if self.quantizer is not None:
            x, w = self.quantizer.activations(x, eq, role), self.quantizer.weights(w, eq, role)
        return x, w

    def __call__(self, eq: str, x, w, *, role: str, out_dtype=None) -> jax.Array:
        x, w = self._operands(eq, x, w, role)
        return jnp.einsum(eq, x, w, preferred_element_type=out_dtype)

    def ragged(self, x_MD, w_EDF, group_sizes_E, *, role: str, out_dtype=None) -> jax.Array:
        """Grouped matmul for expert layers: rows of `x_MD` are sorted by group; group e uses `w_EDF[e]`."""
        # for the quantizer, each expert's matrix is its own: e stays out of the contracted axes (only d is summed)
        x_MD, w_EDF = self._operands("md,edf->emf", x_MD, w_EDF, role)
        return jax.lax.ragged_dot(x_MD, w_EDF, group_sizes_E, preferred_element_type=out_dtype)


def norm(x_BTD, gain, bias, kind: str, eps: float):
    """RMSNorm or LayerNorm over the last axis, computed in float32, returned in the input dtype."""
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


def mean_abs(x) -> jax.Array:
    """Mean |x| in float32: the coordinate-check statistic."""
    return jnp.abs(x.astype(jnp.float32)).mean()
