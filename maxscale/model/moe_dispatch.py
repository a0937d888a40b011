"""MoE dispatch: how routed token-expert pairs reach the experts and come back (used by maxscale/model/moe.py).

Shapes: T tokens (batch x sequence, flattened), D width, E routed experts, K active experts per token, M expert
hidden size, P = T*K token-expert pairs (token-major: pair t*K + j is token t's j-th choice), C capacity slots per
expert and group, G token groups (each with its own capacity), X = E*C buffer slots of one group (tiled dropless:
X = N*tile slots in N tiles).

Every path has the signature `(p, h_TD, weights_TK, experts_TK, moe, mm) -> (y_TD, dropped_fraction)` where
`weights_TK` are the combine weights (already /K or renormalised by the router) and y_TD = sum_j weights_Tj *
expert_{experts_Tj}(h_T). All weight matmuls go through `mm` (maxscale.model.layers.Matmul); moving rows to and
from the experts uses gathers/scatters (O(P*D) work, linear in T), not one-hot dispatch einsums, which cost
O(T*E*C*D) = O(cf*K*T^2*D) and would send 0/1 masks through the quantizer.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import TYPE_CHECKING, Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from maxscale.errors import ConfigError
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
#               megablox), then one batched matmul [N, tile, D] x [N, D, F] with each tile's expert's matrix; the
#               FLOPs of the routed pairs plus at most E * (tile - 1) padding rows, on every backend


def grouped_impl(moe: MoEConfig) -> str:
    """The grouped matmul that `dropless` uses: `moe.grouped_impl`, or for auto the fastest exact one on this
    backend (ragged_dot on TPU, where it is a grouped kernel; tiled elsewhere)."""
    if moe.grouped_impl != "auto":
        return moe.grouped_impl
    return "ragged_dot" if jax.default_backend() == "tpu" else "tiled"


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
    up, gate, the activation and down), `Matmul.grouped` taking each tile's expert's matrix from `weights`."""

    slot_P: jax.Array  # slot of each pair (token-major)
    pair_X: jax.Array  # pair in each slot (P for padding)
    expert_N: jax.Array  # expert of each tile, sorted (tiles past the last expert's: the last expert, zero rows)
    tile: int
    num_experts: int

    @classmethod
    def build(cls, experts_P, num_experts: int, tile: int) -> Tiles:
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
        return cls(slot_P, pair_X, expert_N.astype(jnp.int32), tile, E)

    def pad(self, x_PD):
        """[P, D] pair rows -> [N, tile, D] tiles, zero in the padding (gradient: a gather back)."""
        return _take_rows(x_PD, self.pair_X, self.slot_P).reshape(-1, self.tile, x_PD.shape[-1])

    def weights(self, w_EDF):
        """Each tile's expert's matrix: [N, D, F]."""
        return _take_sorted(w_EDF, self.expert_N, self.num_experts)

    def unpad(self, y_NtD):
        """[N, tile, D] tiles -> [P, D] pair rows."""
        return _take_rows(y_NtD.reshape(-1, y_NtD.shape[-1]), self.slot_P, self.pair_X)


def _dropless_ragged(p: dict, h_TD, experts_TK, moe: MoEConfig, mm: Matmul):
    """Expert outputs of the pairs [P, D] via mm.ragged: rows sorted by expert, unsorted after."""
    T, K = experts_TK.shape
    order_P, sizes_E = sort_by_expert(experts_TK.reshape(-1), moe.num_experts)
    x_PD = jnp.take(h_TD, order_P // K, axis=0)  # sorted rows: pair order_P[i] is token order_P[i] // K
    mm_in = lambda x, w, name: mm.ragged(x, w, sizes_E, role="expert_in", name=name)  # noqa: E731
    mm_out = lambda x, w, name: mm.ragged(x, w, sizes_E, role="expert_out", name=name)  # noqa: E731
    y_PD = _experts(p, x_PD, mm_in, mm_out, moe)
    inverse_P = jnp.zeros_like(order_P).at[order_P].set(jnp.arange(T * K, dtype=order_P.dtype))
    return jnp.take(y_PD, inverse_P, axis=0)


def _dropless_tiled(p: dict, h_TD, experts_TK, moe: MoEConfig, mm: Matmul):
    """Expert outputs of the pairs [P, D] via mm.grouped on Tiles. The pairs' rows are h repeated K times, so every
    move is a gather both ways (the K copies' gradients are summed by the broadcast's transpose)."""
    T, K = experts_TK.shape
    tiles = Tiles.build(experts_TK.reshape(-1), moe.num_experts, tile_size(T * K, moe.num_experts))
    x_PD = jnp.broadcast_to(h_TD[:, None, :], (T, K, h_TD.shape[-1])).reshape(T * K, -1)
    mm_in = lambda x, w, name: mm.grouped(x, w, tiles, role="expert_in", name=name)  # noqa: E731
    mm_out = lambda x, w, name: mm.grouped(x, w, tiles, role="expert_out", name=name)  # noqa: E731
    return tiles.unpad(_experts(p, tiles.pad(x_PD), mm_in, mm_out, moe))


# model.moe.grouped_impl (besides auto) -> (p, h_TD, experts_TK, moe, mm) -> expert outputs of the pairs [P, D]
GROUPED: dict[str, Callable] = {"tiled": _dropless_tiled, "ragged_dot": _dropless_ragged}


def dropless(p: dict, h_TD, weights_TK, experts_TK, moe: MoEConfig, mm: Matmul):
    """Every pair is computed (nothing dropped), with `grouped_impl(moe)`'s grouped matmuls."""
    y_PD = GROUPED[grouped_impl(moe)](p, h_TD, experts_TK, moe, mm)
    return _combine(y_PD, weights_TK), jnp.float32(0.0)


# ---------------------------------------------------------------------------------------------------------------
# dense: every expert on every token; the test reference (E/K times the FLOPs).


def dense(p: dict, h_TD, weights_TK, experts_TK, moe: MoEConfig, mm: Matmul):
    """All E experts on all T tokens, combined with the routing weights (zero for experts not chosen)."""
    y_TED = _experts(
        p,
        h_TD,
        lambda x, w, name: mm("td,edf->tef", x, w, role="expert_in", name=name),
        lambda x, w, name: mm("tef,efd->ted", x, w, role="expert_out", name=name),
        moe,
    )
    combine_TE = (jax.nn.one_hot(experts_TK, moe.num_experts, dtype=jnp.float32) * weights_TK[..., None]).sum(1)
    return (combine_TE[..., None] * y_TED.astype(jnp.float32)).sum(1), jnp.float32(0.0)


# ---------------------------------------------------------------------------------------------------------------
# capacity: a fixed [E, C] buffer per token group; position priority; overflow dropped.


def capacity_of(moe: MoEConfig, tokens: int) -> int:
    """Slots per expert for a group of `tokens` tokens: ceil(capacity_factor * K * tokens / E), at least 1."""
    return max(1, math.ceil(moe.capacity_factor * moe.num_active * tokens / moe.num_experts))


def capacity_slots(experts_SK, num_experts: int, capacity: int):
    """For one group of S tokens: (slot_P, token_X). slot_P in [0, E*C] is the buffer slot of each pair (E*C =
    dropped); token_X in [0, S] is the token in each slot (S = empty). A pair's position in its expert's queue is its
    rank among that expert's pairs in token order, so earlier tokens win: the drop decision of token t depends only
    on tokens <= t of its group, which keeps a group that is one sequence causal."""
    S, K = experts_SK.shape
    e_P = experts_SK.reshape(-1)
    order_P, sizes_E = sort_by_expert(e_P, num_experts)
    start_E = jnp.cumsum(sizes_E) - sizes_E
    rank_sorted_P = jnp.arange(S * K, dtype=jnp.int32) - start_E[e_P[order_P]]
    pos_P = jnp.zeros(S * K, jnp.int32).at[order_P].set(rank_sorted_P)
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


def capacity(p: dict, h_TD, weights_TK, experts_TK, moe: MoEConfig, mm: Matmul, num_groups: int = 1):
    """Capacity-limited dispatch on one device. Tokens are split into `num_groups` contiguous groups, each with its
    own C = capacity_of(moe, T / G) slots per expert (G = 1: the whole batch competes; G = number of EP ranks: what
    `capacity_dispatch_ep` computes). Returns (y_TD, dropped_fraction of the T*K pairs)."""
    T, D = h_TD.shape
    E, G = moe.num_experts, num_groups
    if T % G:
        raise ConfigError(f"capacity dispatch: {T} tokens do not split into {G} equal groups")
    S = T // G
    C = capacity_of(moe, S)
    x_GXD, slot_GP = _to_buffers(h_TD.reshape(G, S, D), experts_TK.reshape(G, S, -1), E, C)
    x_ECD = x_GXD.reshape(G, E, C, D).transpose(1, 0, 2, 3).reshape(E, G * C, D)
    y_ECD = _expert_compute(p, x_ECD, moe, mm)
    y_GXD = y_ECD.reshape(E, G, C, D).transpose(1, 0, 2, 3).reshape(G, E * C, D)
    y_GSD = _from_buffers(y_GXD, slot_GP, weights_TK.reshape(G, S, -1))
    return y_GSD.reshape(T, D), _dropped_fraction(slot_GP, E * C)


def _ep_layout(p: dict, h_TD, moe: MoEConfig, mesh, axis: str, token_axes: tuple[str, ...]):
    """(E, ep ranks, E/ep local experts, token shards, the routed experts' params): what both expert-parallel
    paths shard by; ConfigError (one line) when the mesh cannot split the experts or the tokens evenly."""
    E, ep = moe.num_experts, mesh.shape[axis]
    groups = math.prod(mesh.shape[a] for a in token_axes)
    if axis not in token_axes or E % ep or h_TD.shape[0] % groups:
        raise ConfigError(
            f"expert parallelism: need {axis!r} in token_axes={token_axes}, num_experts={E} divisible by "
            f"mesh.{axis}={ep} and {h_TD.shape[0]} tokens divisible by the {groups} token shards"
        )
    p_e = {name: w for name, w in p.items() if name.endswith("_e")}  # only the routed experts enter the shard_map
    return E, ep, E // ep, groups, p_e


def capacity_dispatch_ep(
    p: dict,
    h_TD,
    weights_TK,
    experts_TK,
    moe: MoEConfig,
    mm: Matmul,
    *,
    mesh,
    axis: str = "expert",
    token_axes: tuple[str, ...] = ("expert",),
):
    """Expert-parallel capacity dispatch with `jax.shard_map` and two `jax.lax.all_to_all`s over mesh axis `axis`.

    Tokens [T] are sharded over `token_axes` (which must contain `axis`; each shard is one capacity group, so this
    equals `capacity(..., num_groups=prod of token_axes sizes)`), the expert weights over `axis` on their experts
    dim (E / ep local experts per rank). Each rank fills its [E, C, D] buffers from its own tokens, the all_to_all
    sends each expert's slice to the rank that owns it, the rank runs its local experts on [E/ep, ep*C, D], and the
    reverse all_to_all brings the results home. Mesh axes not named are replicated inside (redundant compute).
    Returns (y_TD, dropped_fraction)."""
    E, ep, El, groups, p_e = _ep_layout(p, h_TD, moe, mesh, axis, token_axes)
    S = h_TD.shape[0] // groups
    C = capacity_of(moe, S)
    tok, wts = P(token_axes), P(axis)

    def local(p, h_SD, w_SK, e_SK):
        D = h_SD.shape[-1]
        x_1XD, slot_1P = _to_buffers(h_SD[None], e_SK[None], E, C)
        # [E, C, D] = [ep(owner), El, C, D] -> after all_to_all [ep(source rank), El, C, D]
        x_RECD = jax.lax.all_to_all(x_1XD.reshape(ep, El, C, D), axis, 0, 0, tiled=True)
        x_ECD = x_RECD.transpose(1, 0, 2, 3).reshape(El, ep * C, D)
        y_ECD = _expert_compute(p, x_ECD, moe, mm)
        y_RECD = y_ECD.reshape(El, ep, C, D).transpose(1, 0, 2, 3)
        y_XD = jax.lax.all_to_all(y_RECD, axis, 0, 0, tiled=True).reshape(1, E * C, D)
        y_SD = _from_buffers(y_XD, slot_1P, w_SK[None])[0]
        dropped = jax.lax.pmean(_dropped_fraction(slot_1P, E * C), token_axes)
        return y_SD, dropped

    run = jax.shard_map(local, mesh=mesh, in_specs=({n: wts for n in p_e}, tok, tok, tok), out_specs=(tok, P()))
    return run(p_e, h_TD, weights_TK, experts_TK)


def dropless_dispatch_ep(
    p: dict,
    h_TD,
    weights_TK,
    experts_TK,
    moe: MoEConfig,
    mm: Matmul,
    *,
    mesh,
    axis: str = "expert",
    token_axes: tuple[str, ...] = ("expert",),
):
    """Expert-parallel dropless dispatch: all-gather the tokens over `axis`, compute the local experts' pairs,
    reduce-scatter the outputs. Inside `jax.shard_map` over `mesh`:

      1. each rank gathers the [ep*S] tokens (with their choices and combine weights) of its `axis` group;
      2. it sorts the group's pairs so those routed to its E/ep local experts come first, by local expert, and runs
         them through `mm.ragged` (grouped matmuls over its own expert weights; the other pairs' rows are zeroed
         and their outputs masked: they belong to other ranks);
      3. it combines its pairs' outputs per token (0 for pairs it does not own) and `psum_scatter`s the [ep*S, D]
         partial sums over `axis`, so each rank gets the full output of its own S tokens.

    Exact (nothing dropped; the same sums as `dropless`). Cost per rank: gathers of ep*S*(D + 2K) values, a
    reduce-scatter of ep*S*D, and a [ep*S*K, D] ragged buffer (on GPU/TPU grouped matmuls skip rows past the groups;
    XLA:CPU computes them, masked). `ragged_all_to_all` would send only the routed rows; it has no XLA:CPU lowering,
    so this path is the one that runs everywhere. Gradients flow through the collectives' transposes. Returns
    (y_TD, 0.0)."""
    E, ep, El, _, p_e = _ep_layout(p, h_TD, moe, mesh, axis, token_axes)
    tok, wts = P(token_axes), P(axis)

    def local(p, h_SD, w_SK, e_SK):
        gather = lambda a: jax.lax.all_gather(a, axis, tiled=True)  # noqa: E731
        h_AD, w_AK, e_AK = gather(h_SD), gather(w_SK), gather(e_SK)
        A, K = e_AK.shape
        local_P = e_AK.reshape(-1) - jax.lax.axis_index(axis) * El
        mine_P = (local_P >= 0) & (local_P < El)
        order_P, sizes = sort_by_expert(jnp.where(mine_P, local_P, El), El + 1)  # foreign pairs sort last
        x_PD = jnp.take(h_AD, order_P // K, axis=0)
        x_PD = jnp.where(jnp.take(mine_P, order_P)[:, None], x_PD, jnp.zeros_like(x_PD))
        y_PD = _experts(
            p,
            x_PD,
            lambda x, w, name: mm.ragged(x, w, sizes[:El], role="expert_in", name=name),
            lambda x, w, name: mm.ragged(x, w, sizes[:El], role="expert_out", name=name),
            moe,
        )
        inverse_P = jnp.zeros_like(order_P).at[order_P].set(jnp.arange(A * K, dtype=order_P.dtype))
        y_PD = jnp.take(y_PD, inverse_P, axis=0)
        y_PD = jnp.where(mine_P[:, None], y_PD, jnp.zeros_like(y_PD))
        y_AD = _combine(y_PD, w_AK)
        return jax.lax.psum_scatter(y_AD, axis, scatter_dimension=0, tiled=True)

    run = jax.shard_map(local, mesh=mesh, in_specs=({n: wts for n in p_e}, tok, tok, tok), out_specs=tok)
    return run(p_e, h_TD, weights_TK, experts_TK), jnp.float32(0.0)
