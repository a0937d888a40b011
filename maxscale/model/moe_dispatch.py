"""MoE dispatch: how routed token-expert pairs reach the experts and come back (used by maxscale/model/moe.py).

Shapes: T tokens (batch x sequence, flattened), D width, E routed experts, K active experts per token, M expert
hidden size, P = T*K token-expert pairs (token-major: pair t*K + j is token t's j-th choice), C capacity slots per
expert and group, G token groups (each with its own capacity), X = E*C buffer slots of one group (tiled dropless:
X = N*tile slots in N tiles).

Every path has the signature `(p, h_TD, weights_TK, experts_TK, moe, mm) -> (y_TD, dropped_fraction)` where
`weights_TK` are the combine weights (already /K or renormalised by the router) and y_TD = sum_j weights_Tj *
expert_{experts_Tj}(h_T). All weight matmuls go through `mm` (maxscale.model.layers.Matmul); moving rows to and
from the experts uses gathers/scatters (O(P*D) work, linear in T), not one-hot dispatch einsums, which cost
O(T*E*C*D) = O(cf*K*T^2*D) and would send 0/1 masks through the quantizer. The expert-parallel paths (inside
`jax.shard_map` on a mesh with an `expert` axis) are in moe_ep.py, the layouts both use (the expert FFN, `Tiles`,
capacity buffers) in moe_layout.py; both are re-exported here.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Callable

import jax
import jax.numpy as jnp

from maxscale.errors import ConfigError
from maxscale.model.moe_config import MoEConfig
from maxscale.model.moe_ep import (  # noqa: F401  (public: the expert-parallel paths)
    capacity_dispatch_ep,
    capacity_dispatch_ep_grouped,
    dropless_dispatch_ep,
)
from maxscale.model.moe_layout import (  # noqa: F401  (public: the layouts the paths share)
    ACTIVATIONS,
    Tiles,
    _combine,
    _dropped_fraction,
    _expert_compute,
    _experts,
    _from_buffers,
    _to_buffers,
    capacity_of,
    capacity_slots,
    grouped_impl,
    queue_positions,
    sort_by_expert,
    tile_size,
)

if TYPE_CHECKING:
    from maxscale.model.layers import Matmul

# ---------------------------------------------------------------------------------------------------------------
# dropless: sort pairs by expert, grouped matmuls (`grouped_impl`, moe_layout.py), unsort.


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


def _dropless_tiled(p: dict, h_TD, experts_TK, moe: MoEConfig, mm: Matmul, loop: bool = False):
    """Expert outputs of the pairs [P, D] via mm.grouped on Tiles. The pairs' rows are h repeated K times, so every
    move is a gather both ways (the K copies' gradients are summed by the broadcast's transpose)."""
    T, K = experts_TK.shape
    tiles = Tiles.build(experts_TK.reshape(-1), moe.num_experts, tile_size(T * K, moe.num_experts), loop)
    x_PD = jnp.broadcast_to(h_TD[:, None, :], (T, K, h_TD.shape[-1])).reshape(T * K, -1)
    mm_in = lambda x, w, name: mm.grouped(x, w, tiles, role="expert_in", name=name)  # noqa: E731
    mm_out = lambda x, w, name: mm.grouped(x, w, tiles, role="expert_out", name=name)  # noqa: E731
    return tiles.unpad(_experts(p, tiles.pad(x_PD), mm_in, mm_out, moe))


# model.moe.grouped_impl (besides auto) -> (p, h_TD, experts_TK, moe, mm) -> expert outputs of the pairs [P, D]
GROUPED: dict[str, Callable] = {
    "tiled": _dropless_tiled,
    "tiled_loop": functools.partial(_dropless_tiled, loop=True),
    "ragged_dot": _dropless_ragged,
}


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


def capacity(p: dict, h_TD, weights_TK, experts_TK, moe: MoEConfig, mm: Matmul, num_groups: int = 1):
    """Capacity-limited dispatch on one device. Tokens are split into `num_groups` contiguous groups, each with its
    own C = capacity_of(moe, T / G) slots per expert (G = 1: the whole batch competes, what every mesh computes,
    `capacity_dispatch_ep` included; G = number of token shards: what `capacity_dispatch_ep_grouped` computes).
    Returns (y_TD, dropped_fraction of the T*K pairs)."""
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
