"""Building blocks shared by every layer: parameter creation, norms, rotary embeddings, and THE matmul entry point.

Every matmul of the model (q/k/v/o projections, MLP, readout; the router and experts of MoE layers) goes through
`Matmul`, which knows the parameter's role. That is the one place where the compute dtype is applied and where
quantization (weights and activations) wraps a product, so a new layer gets both by calling it.
"""

from __future__ import annotations

import dataclasses
import math
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
        std = par.init_std(spec)
        key = rngs.params()
        value = (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype) if std else jnp.zeros(shape, dtype)
    return nnx.Param(value, role=spec.role, axes=spec.axes, fan_in=spec.fan_in, kind=spec.kind)


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

    def with_bits(self, qbits: dict) -> "Quantizer": ...


@dataclasses.dataclass(frozen=True)
class Matmul:
    """The model's one matmul entry point: `mm(eq, x, w, role=..., name=...)`.

    `eq` is an einsum equation whose first operand is the activation and second the weight; `role` is the weight's
    parameterization role ("hidden", "readout", ...), `name` its parameter name ("wq", "w_up", ...). Operands are
    cast to the compute dtype here, so weights are stored in `param_dtype` and cast once per use. `out_dtype` asks
    for a wider accumulator/result (the readout returns float32 logits from bfloat16 operands). With a `recorder`
    (context.Recorder: the forward's `capture`), what the quantizer changes and each named matrix's input are
    reported to it; `kv`, `probs` and `table` are the quantizer's other hooks, reported the same way."""

    dtype: Any = jnp.float32
    quantizer: Quantizer | None = None
    recorder: Any = None

    def _q(self, kind: str, method: str, x, *args):
        if self.quantizer is None:
            return x
        x_hat = getattr(self.quantizer, method)(x, *args)
        if self.recorder is not None:
            self.recorder.quantized(kind, x, x_hat)
        return x_hat

    def _operands(self, eq: str, x, w, role: str, name: str | None):
        x, w = x.astype(self.dtype), w.astype(self.dtype)
        x = self._q("activations", "activations", x, eq, role)
        if self.recorder is not None:
            self.recorder.matmul_input(name, role, eq, x)
        return x, self._q("weights", "weights", w, eq, role)

    def __call__(self, eq: str, x, w, *, role: str, name: str | None = None, out_dtype=None) -> jax.Array:
        x, w = self._operands(eq, x, w, role, name)
        return jnp.einsum(eq, x, w, preferred_element_type=out_dtype)

    def ragged(self, x_MD, w_EDF, group_sizes_E, *, role: str, name: str | None = None, out_dtype=None) -> jax.Array:
        """Grouped matmul for expert layers: rows of `x_MD` are sorted by group; group e uses `w_EDF[e]`."""
        # for the quantizer, each expert's matrix is its own: e stays out of the contracted axes (only d is summed)
        x_MD, w_EDF = self._operands("md,edf->emf", x_MD, w_EDF, role, name)
        if self.recorder is not None:  # row m belongs to the group whose cumulative size first exceeds m
            group_M = jnp.searchsorted(jnp.cumsum(group_sizes_E), jnp.arange(x_MD.shape[0]), side="right")
            self.recorder.grouped_input(name, role, x_MD, group_M, w_EDF.shape[0])
        return jax.lax.ragged_dot(x_MD, w_EDF, group_sizes_E, preferred_element_type=out_dtype)

    def grouped(self, x_NtD, w_EDF, tiles, *, role: str, name: str | None = None, out_dtype=None) -> jax.Array:
        """Block-sparse grouped matmul for expert layers: tile n of `x_NtD` (rows of one group, zero-padded) times
        its group's matrix `w_EDF[tiles.expert_N[n]]` (tiles: moe_dispatch.Tiles), so only the tiles' FLOPs are done
        on every backend (XLA:CPU expands ragged_dot over every group). The quantizer sees whole per-expert
        matrices, as in `ragged`; zero padding rows stay zero."""
        x_NtD, w_EDF = self._operands("ntd,edf->entf", x_NtD, w_EDF, role, name)
        if self.recorder is not None:  # each tile's rows belong to its expert; padding rows are zero
            group_R = jnp.repeat(tiles.expert_N, x_NtD.shape[1])
            self.recorder.grouped_input(name, role, x_NtD.reshape(-1, x_NtD.shape[-1]), group_R, w_EDF.shape[0])
        return tiles.matmul(x_NtD, w_EDF, out_dtype)

    @property
    def quantizes_kv(self) -> bool:
        return self.quantizer is not None and self.quantizer.quantizes_kv

    @property
    def whole_attention(self) -> bool:
        return self.quantizer is not None and self.quantizer.whole_attention

    def kv(self, x):
        """Keys, values (and with whole_attention queries) at the kv format."""
        return self._q("kv", "kv", x)

    def probs(self, p):
        """Attention probabilities at the kv format (whole_attention)."""
        return self._q("probs", "probs", p)

    def table(self, table_VD):
        """The embedding table before the lookup (quantized with quant.embeddings)."""
        return self._q("weights", "table", table_VD)


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


def rope(x_BTHK, theta: float, offset=0):
    """Rotary position embedding over the last axis (split halves); the T positions start at `offset` (decoding
    with a KV cache: an int or a traced int32 scalar)."""
    T, K = x_BTHK.shape[1], x_BTHK.shape[-1]
    freq_k = theta ** (-jnp.arange(0, K // 2, dtype=jnp.float32) * 2 / K)
    positions_T = offset + jnp.arange(T, dtype=jnp.int32)
    angle_TK = positions_T.astype(jnp.float32)[:, None] * freq_k[None, :]
    sin, cos = jnp.sin(angle_TK)[None, :, None, :], jnp.cos(angle_TK)[None, :, None, :]
    x1, x2 = jnp.split(x_BTHK.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTHK.dtype)


def input_moments(x, eq: str) -> jax.Array:
    """X^T X float32 [I, I] of a matmul's activation operand `x` of einsum `eq`: its rows [N, I], the contracted
    axes last in the activation's order (GPTQ's Hessians; an activation x activation product, like kernels')."""
    inputs, _, out = eq.replace(" ", "").partition("->")
    x_sub = inputs.split(",")[0]
    kept = [i for i, c in enumerate(x_sub) if c in out]
    contracted = [i for i, c in enumerate(x_sub) if c not in out]
    n_in = math.prod(x.shape[i] for i in contracted)
    x_NI = jnp.transpose(x, kept + contracted).reshape(-1, n_in).astype(jnp.float32)
    return jnp.einsum("ni,nj->ij", x_NI, x_NI)


def mean_abs(x) -> jax.Array:
    """Mean |x| in float32: the coordinate-check statistic."""
    return jnp.abs(x.astype(jnp.float32)).mean()


def readout_loss(x_BTD, w_DV, targets_BT, output_mult, mm: "Matmul", chunk: int, name: str = "unembed") -> dict:
    """Mean next-token cross-entropy and mean log(Z)^2 (the output z-loss; Z the softmax normaliser), float32,
    of the readout logits x.w * output_mult. With `chunk` (positions per chunk, a divisor of T; 0 = all at once)
    the logits are formed chunk by chunk in a scan whose body is rematerialised, so neither the forward nor the
    backward pass holds [B, T, V] float32 logits: at most one chunk's [B, chunk, V]."""
    B, T, D = x_BTD.shape

    def sums(x_BCD, t_BC):
        logits_BCV = mm("btd,dv->btv", x_BCD, w_DV, role="readout", name=name, out_dtype=jnp.float32) * output_mult
        lse_BC = jax.nn.logsumexp(logits_BCV, axis=-1)
        nll_BC = lse_BC - jnp.take_along_axis(logits_BCV, t_BC[..., None], axis=-1)[..., 0]
        return nll_BC.sum(), (lse_BC * lse_BC).sum()

    if not chunk or chunk >= T:
        nll, z = sums(x_BTD, targets_BT)
    else:
        n = T // chunk  # chunks along the sequence: each one spans the batch, so it stays split over the devices
        xs = (x_BTD.reshape(B, n, chunk, D).swapaxes(0, 1), targets_BT.reshape(B, n, chunk).swapaxes(0, 1))
        body = jax.checkpoint(lambda acc, xs: (jax.tree.map(jnp.add, acc, sums(*xs)), None))
        zero = jnp.zeros((), jnp.float32)
        (nll, z), _ = jax.lax.scan(body, (zero, zero), xs)
    return {"ce": nll / (B * T), "z_loss": z / (B * T)}
