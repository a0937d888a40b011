"""Expert-parallel MoE dispatch (re-exported by moe_dispatch.py; the shapes and path signature are described there).

The routed experts' weights are sharded over mesh axis `axis` on their experts dimension (E / ep local experts per
rank), the T tokens over `token_axes` (which contain `axis`; S tokens per shard), and each path runs inside
`jax.shard_map`. A = ep * S are the tokens of one `axis` group (the shards that differ only in their `axis` index).

  capacity_dispatch_ep          capacity with the drops decided over the global batch: equal to one device's
                                `capacity` whatever the mesh. The shards exchange their per-expert counts (an
                                all-gather of [shards, E] int32), so each pair knows its global queue position;
                                then tokens are all-gathered over `axis`, each rank runs its experts' kept pairs in
                                [E/ep, C, D] buffers (C over the global batch) and reduce-scatters the outputs.
  capacity_dispatch_ep_grouped  per-shard capacity groups (equal to `capacity(..., num_groups=shards)`): two
                                all_to_alls of [E, C_shard, D]; fewer bytes at ep >= 4, but the drops depend on
                                the mesh (docs/moe.md measures both).
  dropless_dispatch_ep          every pair: all-gather over `axis`, the local experts' pairs through the backend's
                                grouped matmul (`grouped_impl`), reduce-scatter.

`jax.lax.ragged_all_to_all` would send only the routed rows, but jax 0.10.2's XLA:CPU cannot run it ("UNIMPLEMENTED:
HLO opcode `ragged-all-to-all` is not supported by XLA:CPU ThunkEmitter"), so the exchange here is the
all-gather/reduce-scatter one, which runs and is tested everywhere.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import TYPE_CHECKING, Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from maxscale.errors import ConfigError
from maxscale.model.moe_config import MoEConfig
from maxscale.model.moe_layout import (
    Tiles,
    _combine,
    _dropped_fraction,
    _expert_compute,
    _experts,
    _from_buffers,
    _to_buffers,
    capacity_of,
    grouped_impl,
    queue_positions,
    sort_by_expert,
    tile_size,
)

if TYPE_CHECKING:
    from maxscale.model.layers import Matmul


@dataclasses.dataclass(frozen=True)
class _EP:
    """Where an expert-parallel path runs: `mesh`, the experts' mesh axis `axis` (ep ranks, E / ep = El local experts
    each) and the tokens' `token_axes` (`groups` shards)."""

    mesh: Any
    axis: str
    token_axes: tuple[str, ...]
    E: int
    ep: int
    El: int
    groups: int


def _ep_layout(p: dict, h_TD, moe: MoEConfig, mesh, axis: str, token_axes: tuple[str, ...]) -> tuple[_EP, dict]:
    """(the layout, the routed experts' params): what every expert-parallel path shards by; ConfigError (one line)
    when the mesh cannot split the experts or the tokens evenly."""
    E, ep = moe.num_experts, mesh.shape[axis]
    groups = math.prod(mesh.shape[a] for a in token_axes)
    if axis not in token_axes or E % ep or h_TD.shape[0] % groups:
        raise ConfigError(
            f"expert parallelism: need {axis!r} in token_axes={token_axes}, num_experts={E} divisible by "
            f"mesh.{axis}={ep} and {h_TD.shape[0]} tokens divisible by the {groups} token shards"
        )
    p_e = {name: w for name, w in p.items() if name.endswith("_e")}  # only the routed experts enter the shard_map
    return _EP(mesh, axis, tuple(token_axes), E, ep, E // ep, groups), p_e


def _expert_parallel(make_local: Callable) -> Callable:
    """The dispatch path `(p, h_TD, weights_TK, experts_TK, moe, mm, *, mesh, axis="expert", token_axes=("expert",))
    -> (y_TD, dropped)` built from `make_local(lay: _EP, T tokens, moe, mm) -> local`: `local(p_e, h_SD, w_SK, e_SK)
    -> (y_SD, dropped)` runs under shard_map with the weights over `axis`, the tokens over `token_axes` and the
    dropped fraction replicated (its docstring is the path's)."""

    def path(
        p, h_TD, weights_TK, experts_TK, moe: MoEConfig, mm: Matmul, *, mesh, axis="expert", token_axes=("expert",)
    ):
        lay, p_e = _ep_layout(p, h_TD, moe, mesh, axis, token_axes)
        tok = P(lay.token_axes)
        in_specs = ({n: P(axis) for n in p_e}, tok, tok, tok)
        local = make_local(lay, h_TD.shape[0], moe, mm)
        return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=(tok, P()))(
            p_e, h_TD, weights_TK, experts_TK
        )

    path.__name__ = path.__qualname__ = make_local.__name__
    path.__doc__ = make_local.__doc__
    return path


def _local_experts(e_AK, axis: str, El: int):
    """Each gathered pair's expert index among this rank's El experts, and whether it is one of them: [A*K] each."""
    local_P = e_AK.reshape(-1) - jax.lax.axis_index(axis) * El
    return local_P, (local_P >= 0) & (local_P < El)


def global_positions(e_SK, num_experts: int, token_axes: tuple[str, ...]):
    """Inside shard_map: each pair's position in its expert's queue over the global batch [S*K]: its rank among this
    shard's pairs of that expert plus that expert's pairs in the shards before this one. Shards are in the row-major
    order of `token_axes`, which is the batch's (its sharding is P(token_axes)), so this is the position one device
    computes over the whole batch. Only per-expert counts travel: an all-gather of [shards, E] int32."""
    pos_P, sizes_E = queue_positions(e_SK.reshape(-1), num_experts)
    counts_GE = jax.lax.all_gather(sizes_E, token_axes)
    before_G = jnp.arange(counts_GE.shape[0]) < jax.lax.axis_index(token_axes)
    return pos_P + (counts_GE * before_G[:, None]).sum(0)[e_SK.reshape(-1)]


@_expert_parallel
def capacity_dispatch_ep(lay: _EP, T: int, moe: MoEConfig, mm: Matmul):
    """Expert-parallel capacity dispatch with the drops of one device: C = capacity_of(moe, T) slots per expert over
    the global batch, earlier tokens first (equals `capacity(..., num_groups=1)` on any mesh). Per rank:

      1. global queue positions of its own pairs (`global_positions`); a pair is kept when its position is < C;
      2. all-gather over `axis` the group's tokens with their choices, positions and combine weights;
      3. the kept pairs of its E/ep experts fill [E/ep, C, D] buffers at slot (local expert, global position), the
         experts run as batched matmuls (as `capacity` does), each pair reads its slot back, combined per token;
      4. `psum_scatter` over `axis` returns each shard the full output of its tokens.

    Bytes per rank: gathers of (ep-1)*S*(D + 3K) values and a reduce-scatter of A*D. Compute: (E/ep)*C buffer rows,
    one device's E*C split over ep (on a mesh with data > 1, each data row pads its own C: data x one device's).
    Returns (y_TD, dropped_fraction of the T*K pairs)."""
    E, El, axis, token_axes = lay.E, lay.El, lay.axis, lay.token_axes
    C = capacity_of(moe, T)

    def local(p, h_SD, w_SK, e_SK):
        pos_SK = global_positions(e_SK, E, token_axes).reshape(e_SK.shape)
        dropped = jax.lax.pmean(_dropped_fraction(pos_SK, C), token_axes)
        gather = lambda a: jax.lax.all_gather(a, axis, tiled=True)  # noqa: E731
        h_AD, w_AK, e_AK, pos_AK = gather(h_SD), gather(w_SK), gather(e_SK), gather(pos_SK)
        local_P, mine_P = _local_experts(e_AK, axis, El)
        pos_P = pos_AK.reshape(-1)
        slot_1P = jnp.where(mine_P & (pos_P < C), local_P * C + pos_P, El * C)[None]
        pair_token_P = jnp.arange(pos_P.shape[0], dtype=jnp.int32) // e_AK.shape[1]
        token_X = jnp.full(El * C, e_AK.shape[0], jnp.int32).at[slot_1P[0]].set(pair_token_P, mode="drop")
        x_XD = jnp.take(h_AD, token_X, axis=0, mode="fill", fill_value=0)
        y_ECD = _expert_compute(p, x_XD.reshape(El, C, -1), moe, mm)
        y_AD = _from_buffers(y_ECD.reshape(1, El * C, -1), slot_1P, w_AK[None])[0]
        return jax.lax.psum_scatter(y_AD, axis, scatter_dimension=0, tiled=True), dropped

    return local


@_expert_parallel
def capacity_dispatch_ep_grouped(lay: _EP, T: int, moe: MoEConfig, mm: Matmul):
    """Expert-parallel capacity with one capacity group per token shard (equals `capacity(..., num_groups=prod of
    token_axes sizes)`, so its drops depend on the mesh), two `jax.lax.all_to_all`s over `axis`. Each rank fills its
    [E, C, D] buffers from its own tokens, the all_to_all sends each expert's slice to the rank that owns it, the rank
    runs its local experts on [E/ep, ep*C, D], and the reverse all_to_all brings the results home. Mesh axes not
    named are replicated inside (redundant compute). Returns (y_TD, dropped_fraction)."""
    E, ep, El, axis, token_axes = lay.E, lay.ep, lay.El, lay.axis, lay.token_axes
    C = capacity_of(moe, T // lay.groups)

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
        return y_SD, jax.lax.pmean(_dropped_fraction(slot_1P, E * C), token_axes)

    return local


def _local_ragged(p: dict, h_AD, local_P, mine_P, K: int, El: int, moe: MoEConfig, mm: Matmul):
    """This rank's pairs [A*K, D] via mm.ragged (zero for other ranks' pairs): sorted by local expert, other ranks'
    pairs last with zeroed rows (XLA:CPU/GPU ragged_dot computes them over every group; TPU skips them)."""
    order_P, sizes = sort_by_expert(jnp.where(mine_P, local_P, El), El + 1)
    x_PD = jnp.take(h_AD, order_P // K, axis=0)
    x_PD = jnp.where(jnp.take(mine_P, order_P)[:, None], x_PD, jnp.zeros_like(x_PD))
    mm_in = lambda x, w, name: mm.ragged(x, w, sizes[:El], role="expert_in", name=name)  # noqa: E731
    mm_out = lambda x, w, name: mm.ragged(x, w, sizes[:El], role="expert_out", name=name)  # noqa: E731
    y_PD = _experts(p, x_PD, mm_in, mm_out, moe)
    inverse_P = jnp.zeros_like(order_P).at[order_P].set(jnp.arange(order_P.shape[0], dtype=order_P.dtype))
    return jnp.take(y_PD, inverse_P, axis=0)


def _local_tiled(p: dict, h_AD, local_P, mine_P, K: int, El: int, moe: MoEConfig, mm: Matmul, loop: bool = False):
    """This rank's pairs [A*K, D] via mm.grouped on Tiles: other ranks' pairs form the tiles of a virtual expert El
    after the real ones, with zero rows and the last local expert's matrix (zero rows stay zero), so each rank does
    A*K rows plus padding, not E/ep times that (what XLA:CPU's ragged_dot costs)."""
    tiles = Tiles.build(jnp.where(mine_P, local_P, El), El + 1, tile_size(local_P.shape[0], El + 1), loop)
    tiles = dataclasses.replace(
        tiles, expert_N=jnp.minimum(tiles.expert_N, El - 1), tile_end_E=tiles.tile_end_E[:El], num_experts=El
    )
    x_PD = jnp.broadcast_to(h_AD[:, None, :], (h_AD.shape[0], K, h_AD.shape[-1])).reshape(-1, h_AD.shape[-1])
    x_PD = jnp.where(mine_P[:, None], x_PD, jnp.zeros_like(x_PD))
    mm_in = lambda x, w, name: mm.grouped(x, w, tiles, role="expert_in", name=name)  # noqa: E731
    mm_out = lambda x, w, name: mm.grouped(x, w, tiles, role="expert_out", name=name)  # noqa: E731
    return tiles.unpad(_experts(p, tiles.pad(x_PD), mm_in, mm_out, moe))


LOCAL_GROUPED = {
    "tiled": _local_tiled,
    "tiled_loop": functools.partial(_local_tiled, loop=True),
    "ragged_dot": _local_ragged,
}


@_expert_parallel
def dropless_dispatch_ep(lay: _EP, T: int, moe: MoEConfig, mm: Matmul):
    """Expert-parallel dropless dispatch: all-gather the tokens over `axis`, compute the local experts' pairs,
    reduce-scatter the outputs. Inside `jax.shard_map` over `mesh`:

      1. each rank gathers the A = ep*S tokens (with their choices and combine weights) of its `axis` group;
      2. it runs the pairs routed to its E/ep local experts through `grouped_impl(moe)`'s grouped matmul (tiled or
         ragged_dot, as one-device `dropless`); the other pairs' rows are zeroed and their outputs masked;
      3. it combines its pairs' outputs per token (0 for pairs it does not own) and `psum_scatter`s the [A, D]
         partial sums over `axis`, so each rank gets the full output of its own S tokens.

    Exact (nothing dropped; the same sums as `dropless`). Bytes per rank: gathers of (ep-1)*S*(D + 2K) values and a
    reduce-scatter of A*D. Gradients flow through the collectives' transposes. Returns (y_TD, 0.0)."""
    El, axis, token_axes = lay.El, lay.axis, lay.token_axes
    local_pairs = LOCAL_GROUPED[grouped_impl(moe)]
    others = tuple(a for a in token_axes if a != axis)

    def local(p, h_SD, w_SK, e_SK):
        # the weights made varying over the other token axes here, so the tiled path's custom VJPs see the tokens'
        # axes and the psum of the weights' gradient over those axes is the pcast's transpose
        p = jax.lax.pcast(p, others, to="varying")
        gather = lambda a: jax.lax.all_gather(a, axis, tiled=True)  # noqa: E731
        h_AD, w_AK, e_AK = gather(h_SD), gather(w_SK), gather(e_SK)
        local_P, mine_P = _local_experts(e_AK, axis, El)
        y_PD = local_pairs(p, h_AD, local_P, mine_P, e_AK.shape[1], El, moe, mm)
        y_AD = _combine(jnp.where(mine_P[:, None], y_PD, jnp.zeros_like(y_PD)), w_AK)
        return jax.lax.psum_scatter(y_AD, axis, scatter_dimension=0, tiled=True), jnp.float32(0.0)

    return local
