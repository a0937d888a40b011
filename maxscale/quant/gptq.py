"""GPTQ post-training weight quantization (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers") and the round-to-nearest baseline, in JAX.

Shapes in names: I input (contracted) features, O output features, N calibration rows, L stacked layers. Weights
are w_IO (y = x @ w), so GPTQ walks over the rows of w_IO (one input feature at a time) where the reference code
walks over the columns of its [O, I] weight. Everything runs in float32 under jax.lax loops and jits; the
quantizers and scales are those of `maxscale.quant.formats` (symmetric absmax int, scaled ExMy float).

Scales are computed once from the full (dead-input-zeroed) weight before the loop, the standard GPTQ practice for
per-channel scales; for per_block groups along I this is AutoGPTQ's `static_groups=True` (the reference's lazy
variant instead derives each group's scale from the error-updated weights when the loop reaches it).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from maxscale.quant import formats
from maxscale.quant.formats import Format


def hessian_from_inputs(x_NI) -> jax.Array:
    """H = 2 X^T X / n from calibration inputs of the layer, [..., I] flattened to N rows; float32 [I, I]."""
    x_NI = jnp.asarray(x_NI, jnp.float32).reshape(-1, jnp.shape(x_NI)[-1])
    return 2.0 * (x_NI.T @ x_NI) / x_NI.shape[0]


def _absmax_IO(w_IO, granularity: str, group_size: int) -> jax.Array:
    """The absmax each weight entry is quantized with, broadcast to [I, O] (so rows permute along with w)."""
    amax = formats.group_absmax(w_IO, granularity, axis=0, block=group_size)  # [1,1] | [1,O] | [ceil(I/g), O]
    if granularity == "per_block":
        amax = jnp.repeat(amax, group_size, axis=0)[: w_IO.shape[0]]
    return jnp.broadcast_to(amax, w_IO.shape)


def _quantize(kind: str, x, amax, nums):
    """nums = int32 [bits, exp_bits, man_bits], traced, so every bit width of a kind shares one compilation."""
    if kind == "int":
        return formats.quantize_int_with_absmax(x, amax, nums[0])
    return formats.quantize_float_with_absmax(x, amax, nums[1], nums[2])


def _nums(fmt: Format) -> jax.Array:
    return jnp.array([fmt.bits, fmt.exp_bits, fmt.man_bits], jnp.int32)


@functools.partial(jax.jit, static_argnames=("kind", "granularity", "group_size"))
def _rtn_jit(w_IO, nums, kind, granularity, group_size):
    w = w_IO.astype(jnp.float32)
    return _quantize(kind, w, _absmax_IO(w, granularity, group_size), nums).astype(w_IO.dtype)


def rtn_quantize(w_IO, fmt: Format | str, granularity: str = "per_channel", group_size: int = 128) -> jax.Array:
    """Round to nearest with the same scales as `gptq_quantize` (one per output channel by default). Same
    shape/dtype as w_IO."""
    fmt = _check(fmt, granularity, 1)
    return _rtn_jit(jnp.asarray(w_IO), _nums(fmt), kind=fmt.kind, granularity=granularity, group_size=group_size)


def _gptq(w_IO, h_II, damp, nums, act_order, kind: str, granularity: str, block_size: int, group_size: int):
    dtype = w_IO.dtype
    w = w_IO.astype(jnp.float32)
    h = h_II.astype(jnp.float32)
    n_in = w.shape[0]
    dead = jnp.diag(h) == 0  # inputs that never fire: their weights cannot matter, so zero them and decouple them
    h = jnp.where(jnp.diag(dead), 1.0, h)
    w = jnp.where(dead[:, None], 0.0, w)
    amax = _absmax_IO(w, granularity, group_size)
    # act_order: quantize the inputs with the largest H_ii first, while most inputs are left to compensate. A traced
    # flag (identity permutation when off) keeps one compilation for both.
    perm = jnp.where(act_order, jnp.argsort(-jnp.diag(h), stable=True), jnp.arange(n_in))
    w, amax, h = w[perm], amax[perm], h[perm][:, perm]
    h = h + damp * jnp.mean(jnp.diag(h)) * jnp.eye(n_in, dtype=jnp.float32)

    # Pad I to whole blocks with decoupled zero rows (identity in H): they quantize to zero and feed back nothing.
    bs = min(block_size, n_in)
    nb = -(-n_in // bs)
    pad = nb * bs - n_in
    if pad:
        w = jnp.pad(w, ((0, pad), (0, 0)))
        amax = jnp.pad(amax, ((0, pad), (0, 0)), constant_values=1.0)
        h = jnp.pad(h, ((0, pad), (0, pad))) + jnp.diag(jnp.arange(nb * bs) >= n_in).astype(jnp.float32)

    # Upper Cholesky factor U of H^-1 (H^-1 = U^T U): row i of U holds the OBS error-feedback coefficients for
    # quantizing input i given that inputs < i are fixed, so no inverse has to be updated inside the loop.
    chol = jnp.linalg.cholesky(h)
    h_inv = jax.scipy.linalg.cho_solve((chol, True), jnp.eye(h.shape[0], dtype=jnp.float32))
    u_II = jnp.linalg.cholesky(h_inv).T

    def column(i, carry):
        w1_BO, q1_BO, err1_BO, u1_BB, amax1_BO = carry
        row = w1_BO[i]
        q = _quantize(kind, row, amax1_BO[i], nums)
        err = (row - q) / u1_BB[i, i]
        # u1_BB is upper triangular, so this only touches rows >= i (row i itself is done and not read again).
        w1_BO = w1_BO - u1_BB[i][:, None] * err[None, :]
        return w1_BO, q1_BO.at[i].set(q), err1_BO.at[i].set(err), u1_BB, amax1_BO

    def block(b, carry):
        w, q_IO = carry
        i1 = b * bs
        w1 = jax.lax.dynamic_slice_in_dim(w, i1, bs, axis=0)
        amax1 = jax.lax.dynamic_slice_in_dim(amax, i1, bs, axis=0)
        u_rows = jax.lax.dynamic_slice_in_dim(u_II, i1, bs, axis=0)  # [bs, I]
        u1 = jax.lax.dynamic_slice_in_dim(u_rows, i1, bs, axis=1)
        zeros = jnp.zeros_like(w1)
        _, q1, err1, _, _ = jax.lax.fori_loop(0, bs, column, (w1, zeros, zeros, u1, amax1))
        # Lazy batch update of all later rows at once (earlier rows get 0: U is upper triangular; this block's own
        # rows are already quantized and never read again).
        w = w - u_rows.T @ err1
        return w, jax.lax.dynamic_update_slice_in_dim(q_IO, q1, i1, axis=0)

    _, q_IO = jax.lax.fori_loop(0, nb, block, (w, jnp.zeros_like(w)))
    return q_IO[:n_in][jnp.argsort(perm)].astype(dtype)


_STATIC = ("kind", "granularity", "block_size", "group_size")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _gptq_jit(w_IO, h_II, damp, nums, act_order, kind, granularity, block_size, group_size):
    return _gptq(w_IO, h_II, damp, nums, act_order, kind, granularity, block_size, group_size)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _gptq_stacked_jit(w_LIO, h_LII, damp, nums, act_order, kind, granularity, block_size, group_size):
    one = functools.partial(_gptq, kind=kind, granularity=granularity, block_size=block_size, group_size=group_size)
    return jax.vmap(one, in_axes=(0, 0, None, None, None))(w_LIO, h_LII, damp, nums, act_order)


def _check(fmt, granularity: str, block_size: int) -> Format:
    fmt = formats._as_format(fmt)
    if fmt is None:
        raise ValueError("GPTQ needs a format; 'none' means: do not quantize, so skip the call")
    if granularity not in ("per_tensor", "per_channel", "per_block"):
        raise ValueError(f"GPTQ granularity {granularity!r} must be per_tensor, per_channel or per_block")
    if block_size < 1:
        raise ValueError(f"block_size={block_size} must be >= 1")
    return fmt


def gptq_quantize(
    w_IO,
    hessian_II,
    fmt: Format | str,
    granularity: str = "per_channel",
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    group_size: int = 128,
) -> jax.Array:
    """GPTQ of one weight w_IO [I, O] against H [I, I] (`hessian_from_inputs`). Rows are quantized in order
    (by decreasing H_ii with act_order), each row's rounding error fed back to the not-yet-quantized rows through
    the upper Cholesky factor of (H + damp mean(diag H) I)^-1, in lazy batches of `block_size` rows. Inputs with
    H_ii = 0 get zero weights. granularity per_channel: one scale per output column; per_block: static groups of
    `group_size` rows per output column; per_tensor: one scale. Returns w_IO's shape and dtype. One compilation
    per (int|float, granularity, block_size, group_size, shapes): bit widths, damp and act_order are traced."""
    fmt = _check(fmt, granularity, block_size)
    return _gptq_jit(
        jnp.asarray(w_IO),
        jnp.asarray(hessian_II),
        jnp.float32(damp),
        _nums(fmt),
        jnp.bool_(act_order),
        kind=fmt.kind,
        granularity=granularity,
        block_size=block_size,
        group_size=group_size,
    )


def gptq_quantize_stacked(
    w_LIO,
    h_LII,
    fmt: Format | str,
    granularity: str = "per_channel",
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    group_size: int = 128,
) -> jax.Array:
    """`gptq_quantize` over a leading layers axis (stacked block parameters, [L, I, O] and [L, I, I]), one vmap."""
    fmt = _check(fmt, granularity, block_size)
    return _gptq_stacked_jit(
        jnp.asarray(w_LIO),
        jnp.asarray(h_LII),
        jnp.float32(damp),
        _nums(fmt),
        jnp.bool_(act_order),
        kind=fmt.kind,
        granularity=granularity,
        block_size=block_size,
        group_size=group_size,
    )
