"""Expert-parallel MoE dispatch (maxscale/model/moe_ep.py) against one device: capacity drops decided over the
global batch, the per-shard-group variant, global queue positions, and dropless with each grouped matmul."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from test_moe_layer import MM, D, T, assert_tree_close, init, inputs, make_moe, value_and_grads

from maxscale.model import moe as moe_lib
from maxscale.model import moe_dispatch, moe_ep


def expert_mesh(shape, names):
    n = math.prod(shape)
    return Mesh(np.asarray(jax.devices()[:n]).reshape(shape), names)


EP_MESHES = [((2,), ("expert",)), ((4,), ("expert",)), ((2, 2), ("data", "expert")), ((2, 4), ("data", "expert"))]


@pytest.mark.parametrize("shape,names", EP_MESHES)
@pytest.mark.parametrize("cf", [0.75, 2.0])
def test_expert_parallel_capacity_drops_as_one_device(shape, names, cf):
    """EP capacity decides the drops over the global batch: == one-device capacity (one group) on every mesh, the
    same pairs dropped (cf=0.75) or none (cf=2). Values, stats (dropped fraction included) and grads."""
    mesh = expert_mesh(shape, names)
    moe = make_moe(dispatch="capacity", capacity_factor=cf, num_shared=int(cf > 1))
    p, h = init(moe, jax.random.PRNGKey(6), router_std=2.0), inputs(3)
    bias = jnp.array([1.0, 0.0, 0.0, -1.0])  # skewed loads: expert 0 overflows, so drops depend on the order
    ep = functools.partial(moe_lib.capacity_dispatch_ep, mesh=mesh, token_axes=names)
    out, stats, grads = value_and_grads(moe, p, h, bias, dispatch=ep)
    ref_out, ref_stats, ref_grads = value_and_grads(moe, p, h, bias, dispatch=moe_dispatch.capacity)
    assert_tree_close(out, ref_out)
    assert_tree_close(grads, ref_grads)
    assert_tree_close(stats, ref_stats)
    dropped = float(stats["moe_dropped_fraction"])
    assert (dropped > 0.1) if cf < 1 else (dropped == 0.0)
    grouped = moe_dispatch.capacity(
        p,
        h.reshape(T, D),
        *moe_lib.route(h.reshape(T, D), p["router"], bias, moe, MM)[:2],
        moe,
        MM,
        num_groups=math.prod(shape),
    )[1]
    if cf < 1:  # per-shard groups would have dropped other pairs: the global decision is what makes them equal
        assert float(grouped) != pytest.approx(dropped, abs=1e-6)


def test_global_positions_follow_the_batch_order():
    """Each pair's global queue position, computed per shard from exchanged counts, == one device's over the batch."""
    mesh = expert_mesh((2, 4), ("data", "expert"))
    experts_TK = jax.random.randint(jax.random.PRNGKey(3), (T, 2), 0, 4)
    run = jax.shard_map(
        lambda e: moe_ep.global_positions(e, 4, ("data", "expert")).reshape(e.shape),
        mesh=mesh,
        in_specs=P(("data", "expert")),
        out_specs=P(("data", "expert")),
    )
    want, _ = moe_dispatch.queue_positions(experts_TK.reshape(-1), 4)
    np.testing.assert_array_equal(np.asarray(run(experts_TK)).reshape(-1), np.asarray(want))


@pytest.mark.parametrize("shape,names", EP_MESHES[:3])
def test_expert_parallel_grouped_capacity_matches_per_shard_groups(shape, names):
    """The all_to_all variant keeps one capacity group per token shard: == capacity(num_groups=shards)."""
    groups = math.prod(shape)
    mesh = expert_mesh(shape, names)
    moe = make_moe(dispatch="capacity", capacity_factor=0.75)
    p, h = init(moe, jax.random.PRNGKey(6), router_std=2.0), inputs(3)
    ep = functools.partial(moe_dispatch.capacity_dispatch_ep_grouped, mesh=mesh, token_axes=names)
    one = functools.partial(moe_dispatch.capacity, num_groups=groups)
    out, stats, grads = value_and_grads(moe, p, h, dispatch=ep)
    ref_out, ref_stats, ref_grads = value_and_grads(moe, p, h, dispatch=one)
    assert_tree_close(out, ref_out)
    assert_tree_close(grads, ref_grads)
    assert_tree_close(stats, ref_stats)
    assert float(stats["moe_dropped_fraction"]) > 0.05


DROPLESS_CASES = [(*m, impl) for m in EP_MESHES for impl in ("tiled_loop", "ragged_dot")]


@pytest.mark.parametrize("shape,names,impl", DROPLESS_CASES + [(*EP_MESHES[1], "tiled"), (*EP_MESHES[2], "tiled")])
def test_expert_parallel_dropless_matches_single_device(shape, names, impl, monkeypatch):
    """All-gather + reduce-scatter EP dropless (each grouped matmul; `batched`: tiled with the tiles in one batched
    matmul, where the CPU default loops over the tiles and skips the other ranks' ones) == one-device dropless:
    values, stats and gradients, with a skewed bias (expert 0 on every token, expert 3 on none) so the local groups
    are ragged and one is empty."""
    mesh = expert_mesh(shape, names)
    moe = make_moe(dispatch="dropless", num_shared=1, grouped_impl=impl)
    p, h = init(moe, jax.random.PRNGKey(7), router_std=2.0), inputs(5)
    bias = jnp.array([10.0, 0.0, 0.0, -10.0])
    ep = functools.partial(moe_lib.dropless_dispatch_ep, mesh=mesh, token_axes=names)
    out, stats, grads = value_and_grads(moe, p, h, bias, dispatch=ep)
    ref_out, ref_stats, ref_grads = value_and_grads(moe, p, h, bias, dispatch=moe_dispatch.dropless)
    assert_tree_close(out, ref_out)
    assert_tree_close(grads, ref_grads)
    assert_tree_close(stats, ref_stats)
    np.testing.assert_allclose(
        np.asarray(stats["moe_load"])[[0, 3]], [0.5, 0.0]
    )  # half the pairs on expert 0, none on 3
    assert float(jnp.abs(grads[0]["w_up_e"][3]).max()) == 0.0  # the expert without tokens gets no gradient
