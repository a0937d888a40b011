"""The tile kernels behind `Matmul.grouped` (maxscale/model/layers.py) for dropless MoE: tile n of [N, tile, D] rows
times its expert's matrix. `Matmul` has applied the compute dtype and the quantizer to both operands before these
run, so they are the grouped matmul itself (as `jax.lax.ragged_dot` is for `Matmul.ragged`); the layout (which tile
holds which pairs) is `moe_layout.Tiles`."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def batched(x_NtD, w_NDF, out_dtype=None):
    """One batched matmul over all N tiles with each tile's matrix gathered beforehand: [N, tile, F]."""
    return jnp.einsum("ntd,ndf->ntf", x_NtD, w_NDF, preferred_element_type=out_dtype)


def _tile(a_N, n):
    return jax.lax.dynamic_index_in_dim(a_N, n, 0, keepdims=False)


def _zeros(shape, dtype, *like):
    """Zeros that vary over the mesh axes any of `like` varies over (inside shard_map a loop's carry must have the
    type its body returns; the added zeros fold away)."""
    out = jnp.zeros(shape, dtype)
    for a in like:
        out = out + jnp.zeros_like(a, shape=(), dtype=dtype)
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def tile_loop(x_NtD, w_EDF, expert_N, used, out_dtype):
    """Tile n < `used` times its expert's matrix, one tile per iteration of a loop: [N, tile, F], zero past `used`.
    Each iteration reads w_EDF[expert_N[n]] in place, so the [N, D, F] per-tile weights are never materialised, and
    the tiles that hold no pair (past `used`) cost nothing."""
    N, t, _ = x_NtD.shape
    dtype = out_dtype or jnp.result_type(x_NtD, w_EDF)

    def body(n, y_NtF):
        y_tF = jnp.dot(_tile(x_NtD, n), _tile(w_EDF, _tile(expert_N, n)), preferred_element_type=dtype)
        return jax.lax.dynamic_update_index_in_dim(y_NtF, y_tF, n, 0)

    return jax.lax.fori_loop(0, used, body, _zeros((N, t, w_EDF.shape[-1]), dtype, x_NtD, w_EDF, expert_N))


def _tile_loop_fwd(x_NtD, w_EDF, expert_N, used, out_dtype):
    return tile_loop(x_NtD, w_EDF, expert_N, used, out_dtype), (x_NtD, w_EDF, expert_N, used)


def _tile_loop_bwd(out_dtype, res, g_NtF):
    """dx_n = g_n w_e^T per tile; dw_e += x_n^T g_n accumulated in float32 in place (no [N, D, F] cotangent, no
    segment sum); tiles past `used` get zero."""
    x_NtD, w_EDF, expert_N, used = res

    def body(n, carry):
        dx_NtD, dw_EDF = carry
        e, g_tF, x_tD = _tile(expert_N, n), _tile(g_NtF, n), _tile(x_NtD, n)
        dx_tD = jnp.dot(g_tF, _tile(w_EDF, e).T, preferred_element_type=jnp.float32).astype(x_NtD.dtype)
        dw_DF = _tile(dw_EDF, e) + jnp.dot(x_tD.T, g_tF, preferred_element_type=jnp.float32)
        dx_NtD = jax.lax.dynamic_update_index_in_dim(dx_NtD, dx_tD, n, 0)
        return dx_NtD, jax.lax.dynamic_update_index_in_dim(dw_EDF, dw_DF, e, 0)

    like = (x_NtD, w_EDF, expert_N, g_NtF)
    zeros = (_zeros(x_NtD.shape, x_NtD.dtype, *like), _zeros(w_EDF.shape, jnp.float32, *like))
    dx_NtD, dw_EDF = jax.lax.fori_loop(0, used, body, zeros)
    return dx_NtD, dw_EDF.astype(w_EDF.dtype), None, None


tile_loop.defvjp(_tile_loop_fwd, _tile_loop_bwd)
