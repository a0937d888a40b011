"""MoE layouts: how token-expert pairs are arranged for the experts (used by moe_dispatch.py and moe_ep.py, which
re-export what they share; the shapes are described in moe_dispatch.py). The expert FFN applied in a path's layout,
the sort of the pairs by expert, the dropless tiles (`Tiles`), and the capacity buffers (queue positions, slots)."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import TYPE_CHECKING, Callable

import jax
import jax.numpy as jnp

from maxscale.model import grouped_matmul
from maxscale.model.moe_config import MoEConfig

if TYPE_CHECKING:
    from maxscale.model.layers import Matmul

# Expert nonlinearity, matching maxscale/model/mlp.py. `gate` is a thunk so GELU experts never compute one.
ACTIVATIONS: dict[str, Callable] = {
    "swiglu": lambda up, gate: jax.nn.silu(gate()) * up,
    "gelu": lambda up, gate: jax.nn.gelu(up),
}


def _experts(p: dict, x, mm_in: Callable, mm_out: Callable, moe: MoEConfig):
    """The routed experts' FFN on x; `mm_in(x, w, name)` and `mm_out` are the path's matmuls (its layout)."""
    up = mm_in(x, p["w_up_e"], "w_up_e")
    return mm_out(ACTIVATIONS[moe.mlp](up, lambda: mm_in(x, p["w_gate_e"], "w_gate_e")), p["w_down_e"], "w_down_e")


def _combine(y_PD, weights_TK):
    """sum_j weights_Tj * y_(T*K+j) in float32: [T, D]."""
    T, K = weights_TK.shape
    return (weights_TK[..., None] * y_PD.reshape(T, K, -1).astype(jnp.float32)).sum(1)


def sort_by_expert(experts_P, num_experts: int):
    """Stable sort of the pairs by expert: (order_P, group_sizes_E). Stable, so within an expert the pairs stay in
    token order (earlier tokens first: the capacity path's priority)."""
    order_P = jnp.argsort(experts_P, stable=True)
    return order_P, jnp.bincount(experts_P, length=num_experts).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------------------------
# dropless: sort pairs by expert, grouped matmuls, unsort. Two exact grouped matmuls (`model.moe.grouped_impl`):
#   ragged_dot  mm.ragged: jax.lax.ragged_dot; a grouped-matmul kernel on TPU, but XLA:CPU and XLA:GPU expand it
#               into work over every expert (E times the FLOPs; 5.2x slower than capacity on an H200,
#               docs/performance.md)
#   tiled       mm.grouped: each expert's rows padded to whole tiles of `tile` rows (block-sparse, as MegaBlocks and
#               megablox), each tile times its expert's matrix in one batched matmul [N, tile, D] x [N, D, F]; the
#               FLOPs of the routed pairs plus at most E * (tile - 1) padding rows, on every backend
#   tiled_loop  the same tiles, one matmul per tile that holds pairs (grouped_matmul.tile_loop): the per-tile weights
#               are never gathered and empty tiles cost nothing; 1.7x faster than `tiled` on CPU, but a loop on a
#               GPU waits on the host at each iteration


def grouped_impl(moe: MoEConfig) -> str:
    """The grouped matmul that `dropless` uses: `moe.grouped_impl`, or for auto the fastest exact one on this
    backend: ragged_dot on TPU (a grouped kernel there), tiled_loop on CPU, tiled elsewhere."""
    if moe.grouped_impl != "auto":
        return moe.grouped_impl
    return {"tpu": "ragged_dot", "cpu": "tiled_loop"}.get(jax.default_backend(), "tiled")


def tile_size(rows: int, num_experts: int) -> int:
    """Rows per tile: the largest power of two <= rows / (4 E) (at least 8), so the E * (tile - 1) padding rows the
    static tile count must allow stay within a quarter of the rows (and tiles <= 5 E: the gathered weights too)."""
    return max(8, 1 << max(0, (rows // (4 * num_experts)).bit_length() - 1))


@jax.custom_vjp
def _take_rows(x_RD, take_S, back_R):
    """x_RD[take_S] with zero rows where take_S is out of range. `back_R` is the inverse map (take_S[back_R[r]] = r,
    out of range for a row not taken), so the gradient is a gather too, not a scatter-add."""
    return jnp.take(x_RD, take_S, axis=0, mode="fill", fill_value=0)


def _take_rows_fwd(x_RD, take_S, back_R):
    return _take_rows(x_RD, take_S, back_R), (take_S, back_R)


def _take_rows_bwd(res, g_SD):
    take_S, back_R = res
    return jnp.take(g_SD, back_R, axis=0, mode="fill", fill_value=0), None, None


_take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _take_sorted(w_EDF, index_N, num: int):
    """w_EDF[index_N] for sorted indices; the gradient is a sorted segment sum (XLA:CPU's generic scatter-add of the
    [N, D, F] cotangent is twice as slow)."""
    return jnp.take(w_EDF, index_N, axis=0)


def _take_sorted_fwd(w_EDF, index_N, num: int):
    return _take_sorted(w_EDF, index_N, num), index_N


def _take_sorted_bwd(num: int, index_N, g_NDF):
    return jax.ops.segment_sum(g_NDF, index_N, num, indices_are_sorted=True), None


_take_sorted.defvjp(_take_sorted_fwd, _take_sorted_bwd)


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Where the P token-expert pairs sit in N tiles of `tile` rows (X = N * tile slots): each expert's pairs, in
    token order, fill whole tiles of their own, padding rows are zero. N is static: sum_e ceil(size_e / tile) <=
    (P + E * (tile - 1)) / tile for any loads. The expert FFN runs in this layout (the padding rows stay zero through
    up, gate, the activation and down), `Matmul.grouped` multiplying each tile by its expert's matrix (`matmul`)."""

    slot_P: jax.Array  # slot of each pair (token-major)
    pair_X: jax.Array  # pair in each slot (P for padding)
    expert_N: jax.Array  # expert of each tile, sorted (tiles past the last expert's: the last expert, zero rows)
    tile_end_E: jax.Array  # tiles of experts <= e: tile_end_E[-1] tiles hold pairs, the rest are zero
    tile: int
    num_experts: int
    loop: bool = False  # `matmul` as a loop over the tiles that hold pairs (grouped_impl=tiled_loop)

    @classmethod
    def build(cls, experts_P, num_experts: int, tile: int, loop: bool = False) -> Tiles:
        (P,), E = experts_P.shape, num_experts
        N = (P + E * (tile - 1)) // tile
        order_P, sizes_E = sort_by_expert(experts_P, E)
        tiles_E = (sizes_E + tile - 1) // tile
        tile_end_E = jnp.cumsum(tiles_E)
        # sorted pair i of expert e goes to slot (first tile of e) * tile + (i - first sorted index of e)
        shift_E = (tile_end_E - tiles_E) * tile - (jnp.cumsum(sizes_E) - sizes_E)
        slot_sorted = jnp.arange(P, dtype=jnp.int32) + shift_E[experts_P[order_P]]
        slot_P = jnp.zeros(P, jnp.int32).at[order_P].set(slot_sorted)
        pair_X = jnp.full(N * tile, P, jnp.int32).at[slot_sorted].set(order_P.astype(jnp.int32))
        expert_N = jnp.minimum(jnp.searchsorted(tile_end_E, jnp.arange(N), side="right"), E - 1)
        return cls(slot_P, pair_X, expert_N.astype(jnp.int32), tile_end_E.astype(jnp.int32), tile, E, loop)

    def pad(self, x_PD):
        """[P, D] pair rows -> [N, tile, D] tiles, zero in the padding (gradient: a gather back)."""
        return _take_rows(x_PD, self.pair_X, self.slot_P).reshape(-1, self.tile, x_PD.shape[-1])

    def weights(self, w_EDF):
        """Each tile's expert's matrix: [N, D, F]."""
        return _take_sorted(w_EDF, self.expert_N, self.num_experts)

    def matmul(self, x_NtD, w_EDF, out_dtype=None):
        """Each tile times its expert's matrix: [N, tile, F] (maxscale/model/grouped_matmul.py: a loop over the tiles
        that hold pairs, or one batched matmul with `weights`). Both give the same values; tiles past the last
        expert's give zero."""
        if self.loop:
            return grouped_matmul.tile_loop(x_NtD, w_EDF, self.expert_N, self.tile_end_E[-1], out_dtype)
        return grouped_matmul.batched(x_NtD, self.weights(w_EDF), out_dtype)

    def unpad(self, y_NtD):
        """[N, tile, D] tiles -> [P, D] pair rows."""
        return _take_rows(y_NtD.reshape(-1, y_NtD.shape[-1]), self.slot_P, self.pair_X)


# capacity buffers: a fixed [E, C] buffer per token group; position priority; overflow dropped.


def capacity_of(moe: MoEConfig, tokens: int) -> int:
    """Slots per expert for a group of `tokens` tokens: ceil(capacity_factor * K * tokens / E), at least 1."""
    return max(1, math.ceil(moe.capacity_factor * moe.num_active * tokens / moe.num_experts))


def queue_positions(experts_P, num_experts: int):
    """(pos_P, sizes_E): each pair's rank among the pairs of its expert, in pair (token) order, and the counts."""
    (n,) = experts_P.shape
    order_P, sizes_E = sort_by_expert(experts_P, num_experts)
    start_E = jnp.cumsum(sizes_E) - sizes_E
    rank_sorted_P = jnp.arange(n, dtype=jnp.int32) - start_E[experts_P[order_P]]
    return jnp.zeros(n, jnp.int32).at[order_P].set(rank_sorted_P), sizes_E


def capacity_slots(experts_SK, num_experts: int, capacity: int):
    """For one group of S tokens: (slot_P, token_X). slot_P in [0, E*C] is the buffer slot of each pair (E*C =
    dropped); token_X in [0, S] is the token in each slot (S = empty). A pair's position in its expert's queue is its
    rank among that expert's pairs in token order, so earlier tokens win: the drop decision of token t depends only
    on tokens <= t of its group, which keeps a group that is one sequence causal."""
    S, K = experts_SK.shape
    e_P = experts_SK.reshape(-1)
    pos_P, _ = queue_positions(e_P, num_experts)
    X = num_experts * capacity
    slot_P = jnp.where(pos_P < capacity, e_P * capacity + pos_P, X)
    token_X = jnp.full(X, S, jnp.int32).at[slot_P].set(jnp.arange(S * K, dtype=jnp.int32) // K, mode="drop")
    return slot_P, token_X


def _to_buffers(h_GSD, experts_GSK, num_experts: int, capacity: int):
    """Groups -> expert buffers: (x_GXD with zero rows in empty slots, slot_GP)."""
    slot_GP, token_GX = jax.vmap(lambda e: capacity_slots(e, num_experts, capacity))(experts_GSK)
    x_GXD = jax.vmap(lambda h, t: jnp.take(h, t, axis=0, mode="fill", fill_value=0))(h_GSD, token_GX)
    return x_GXD, slot_GP


def _from_buffers(y_GXD, slot_GP, weights_GSK):
    """Expert buffers -> combined output per group [G, S, D]; dropped pairs (slot E*C) read zero."""
    y_GPD = jax.vmap(lambda y, s: jnp.take(y, s, axis=0, mode="fill", fill_value=0))(y_GXD, slot_GP)
    return jax.vmap(_combine)(y_GPD, weights_GSK)


def _expert_compute(p: dict, x_ECD, moe: MoEConfig, mm: Matmul):
    """Batched expert FFN over [E, C, D] buffers (E may be the local experts of an EP shard)."""
    return _experts(
        p,
        x_ECD,
        lambda x, w, name: mm("ecd,edf->ecf", x, w, role="expert_in", name=name),
        lambda x, w, name: mm("ecf,efd->ecd", x, w, role="expert_out", name=name),
        moe,
    )


def _dropped_fraction(slot_GP, num_slots: int):
    return (slot_GP >= num_slots).mean(dtype=jnp.float32)  # exactly 0.0 when nothing drops
