"""The MoE layer (maxscale/model/moe.py, moe_dispatch.py): dispatch paths agree, empty experts get no gradient,
balance statistics and the bias update, capacity dropping, the matmul entry point, expert parallelism."""

from __future__ import annotations

import dataclasses
import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxscale.errors import ConfigError
from maxscale.model import moe as moe_lib
from maxscale.model import moe_dispatch, moe_ep, moe_layout
from maxscale.model.layers import Matmul

D, T = 16, 24  # width, tokens (B=2 x 12)
MM = Matmul()


def make_moe(**kw) -> moe_lib.MoEConfig:
    base = dict(num_experts=4, num_active=2, expert_ffn_size=32, shared_ffn_size=8)
    return moe_lib.MoEConfig(**{**base, **kw})


def init(moe, key, router_std=1.0):
    """One layer's params (specs without the `layers` axis), std 1/sqrt(fan_in); the router x router_std."""
    sizes = {"embed": D, **moe_lib.axis_sizes(moe)}
    out = {}
    for i, (name, spec) in enumerate(sorted(moe_lib.specs(moe).items())):
        assert spec.axes[0] == "layers"
        shape = tuple(sizes[a] for a in spec.axes[1:])
        std = math.prod(sizes[a] for a in spec.fan_in) ** -0.5 * (router_std if name == "router" else 1.0)
        out[name] = std * jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)
    return out


def inputs(seed=0):
    return jax.random.normal(jax.random.PRNGKey(100 + seed), (2, T // 2, D), jnp.float32)


def value_and_grads(moe, p, h, bias=None, dispatch=None, mm=MM):
    """Output, the layer's stats, and grads of <out, r> for a fixed random cotangent r w.r.t. (params, input)."""
    r = jax.random.normal(jax.random.PRNGKey(7), h.shape, jnp.float32)

    def f(p, h):
        stats = {}
        out = moe_lib.apply(p, h, moe, mm, bias, stats, dispatch=dispatch)
        return (out * r).sum(), (out, stats)

    (_, (out, stats)), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(p, h)
    return out, stats, grads


def assert_tree_close(a, b, rtol=1e-5, atol=1e-6):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol), a, b)


# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "score,combine,num_shared,mlp",
    [
        ("sigmoid", "mean_k", 0, "swiglu"),
        ("softmax", "renorm", 0, "swiglu"),
        ("sigmoid", "mean_k", 1, "swiglu"),
        ("softmax", "renorm", 2, "gelu"),
    ],
)
def test_paths_agree(score, combine, num_shared, mlp):
    """dropless (both grouped matmuls) == capacity (cf = E/K: nothing drops) == dense, values and grads w.r.t. every
    param and the input."""
    moe = make_moe(score=score, combine=combine, num_shared=num_shared, mlp=mlp, capacity_factor=4 / 2)
    p, h = init(moe, jax.random.PRNGKey(1)), inputs()
    ref_out, _, ref_grads = value_and_grads(moe, p, h, dispatch=moe_lib.DISPATCH["dense"])
    assert float(jnp.abs(ref_out).mean()) > 0.05
    for path, impl in [("dropless", impl) for impl in ("tiled", "tiled_loop", "ragged_dot")] + [("capacity", "auto")]:
        moe_i = dataclasses.replace(moe, grouped_impl=impl)
        out, stats, grads = value_and_grads(moe_i, p, h, dispatch=moe_lib.DISPATCH[path])
        assert_tree_close(out, ref_out)
        assert_tree_close(grads, ref_grads)
        assert float(stats["moe_dropped_fraction"]) == 0.0


@pytest.mark.parametrize("impl", ["tiled", "tiled_loop", "ragged_dot"])
@pytest.mark.parametrize(
    "E,K,bias,tile",
    [
        (4, 2, [10.0, 0.0, 0.0, -100.0], 0),  # expert 0 on every token, expert 3 on none
        (4, 1, [100.0, 0.0, 0.0, 0.0], 0),  # every pair on expert 0, three experts empty
        (8, 2, [0.0] * 8, 4),  # near uniform, small tiles
        (5, 3, [3.0, 0.0, -100.0, 1.0, 0.0], 32),  # one tile larger than every group; expert 2 empty
    ],
)
def test_dropless_equals_dense_under_uneven_loads(impl, E, K, bias, tile, monkeypatch):
    """Each grouped matmul == the dense reference, values and gradients (rtol 1e-5), with empty experts, one expert
    taking every pair, and tiles smaller and larger than the groups; an empty expert gets exactly zero gradient."""
    if tile:
        monkeypatch.setattr(moe_dispatch, "tile_size", lambda rows, num_experts: tile)
    moe = make_moe(num_experts=E, num_active=K, num_shared=1, grouped_impl=impl)
    p, h, b = init(moe, jax.random.PRNGKey(11), router_std=2.0), inputs(6), jnp.asarray(bias)
    ref_out, _, ref_grads = value_and_grads(moe, p, h, b, dispatch=moe_lib.DISPATCH["dense"])
    out, stats, grads = value_and_grads(moe, p, h, b, dispatch=moe_lib.DISPATCH["dropless"])
    assert_tree_close(out, ref_out)
    assert_tree_close(grads, ref_grads)
    load = np.asarray(stats["moe_load"])
    empty = np.flatnonzero(load == 0)
    assert len(empty) == sum(x < 0 for x in bias) + (3 if K == 1 else 0)
    for e in empty:
        assert float(jnp.abs(grads[0]["w_down_e"][e]).max()) == 0.0


@pytest.mark.parametrize("tile", [1, 4, 16])
def test_tiles_layout(tile):
    """Each pair sits in a tile of its own expert, each expert's pairs are contiguous from a tile boundary in token
    order, pair_X inverts slot_P, and the static tile count covers these loads (expert 2 empty, 3 the largest)."""
    E, P = 5, 40
    experts_P = np.random.default_rng(0).choice([0, 1, 1, 3, 3, 3, 4], P)
    t = moe_dispatch.Tiles.build(jnp.asarray(experts_P), E, tile)
    slot, pair, ex = np.asarray(t.slot_P), np.asarray(t.pair_X), np.asarray(t.expert_N)
    N = (P + E * (tile - 1)) // tile
    assert ex.shape == (N,) and pair.shape == (N * tile,)
    np.testing.assert_array_equal(pair[slot], np.arange(P))
    assert (pair == P).sum() == N * tile - P  # every other slot is padding
    np.testing.assert_array_equal(ex[slot // tile], experts_P)
    assert (np.diff(ex) >= 0).all()
    for e in np.unique(experts_P):
        s = slot[experts_P == e]
        assert s[0] % tile == 0 and (np.diff(s) == 1).all()
    x = jax.random.normal(jax.random.PRNGKey(0), (P, 3))
    padded = t.pad(x)
    assert padded.shape == (N, tile, 3) and float(jnp.abs(padded).sum(-1).reshape(-1)[pair == P].max(initial=0)) == 0
    np.testing.assert_array_equal(np.asarray(t.unpad(padded)), np.asarray(x))
    r = jax.random.normal(jax.random.PRNGKey(1), padded.shape)  # the gather-only VJPs equal the plain transposes
    g = jax.grad(lambda x: (t.pad(x) * r).sum())(x)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(r.reshape(N * tile, 3)[slot]))
    w = jax.random.normal(jax.random.PRNGKey(2), (E, 3, 2))
    gw = jax.grad(lambda w: (t.weights(w) * jnp.arange(N)[:, None, None]).sum())(w)
    np.testing.assert_allclose(np.asarray(gw[:, 0, 0]), [np.arange(N)[ex == e].sum() for e in range(E)])


def test_tiled_dropless_does_the_routed_flops_only(monkeypatch):
    """The compiled tiled path (tiles in one batched matmul) costs the 3 expert matmuls of the P pairs plus the tile
    padding (<= E * (tile - 1) rows), not E times that (XLA:CPU's ragged_dot). The loop over the tiles (CPU default)
    is checked in test_tile_loop_equals_batched. The choice and the config field are validated."""
    moe = make_moe(num_experts=8, num_active=2, grouped_impl="tiled")
    p, h_TD = init(moe, jax.random.PRNGKey(9)), jax.random.normal(jax.random.PRNGKey(10), (256, D))
    weights_TK, experts_TK, _ = moe_lib.route(h_TD, p["router"], None, moe, MM)
    f = jax.jit(lambda p, h: moe_dispatch.dropless(p, h, weights_TK, experts_TK, moe, MM)[0])
    flops = f.lower(p, h_TD).compile().cost_analysis()["flops"]
    P, tile = 512, moe_dispatch.tile_size(512, 8)
    assert tile == 16 and moe_dispatch.tile_size(2048 * 2, 8) == 128 and moe_dispatch.tile_size(48, 4) == 8
    routed = 2 * P * D * 32 * 3
    assert routed < flops < routed * (P + 8 * (tile - 1)) / P + 0.2 * routed, (flops, routed)
    auto = {"tpu": "ragged_dot", "cpu": "tiled_loop"}.get(jax.default_backend(), "tiled")
    assert moe_dispatch.grouped_impl(make_moe()) == auto
    assert moe_dispatch.grouped_impl(make_moe(grouped_impl="ragged_dot")) == "ragged_dot"
    assert set(moe_lib.CHOICES["grouped_impl"]) == {"auto", *moe_dispatch.GROUPED}
    with pytest.raises(ConfigError, match="model.moe.grouped_impl='megablox'"):
        make_moe(grouped_impl="megablox")
    from maxscale import config as config_lib

    cfg, _ = config_lib.parse_argv(["--config=configs/moe.py", "--config.model.moe.grouped_impl=mega"], ())
    with pytest.raises(ConfigError, match="grouped_impl='mega' is not supported; choose one of auto, tiled, tiled_l"):
        config_lib.resolve(cfg)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_tile_loop_equals_batched(dtype, monkeypatch):
    """Tiles.matmul as a loop over the tiles that hold pairs == one batched matmul (values, gradients of x and w,
    dtypes), with an empty expert and a full one; the tiles past tile_end_E[-1] are not computed (zero even for
    non-zero rows there, whose gradient is zero too)."""
    E, P, tile = 5, 60, 8
    experts_P = jnp.asarray(np.random.default_rng(1).choice([0, 1, 1, 3, 4, 4, 4, 4], P))
    t = moe_dispatch.Tiles.build(experts_P, E, tile)
    sizes = np.bincount(np.asarray(experts_P), minlength=E)
    used = int(np.sum(-(-sizes // tile)))
    assert int(t.tile_end_E[-1]) == used < t.expert_N.shape[0]
    x = jax.random.normal(jax.random.PRNGKey(0), (t.expert_N.shape[0], tile, 6)).astype(dtype)
    w = jax.random.normal(jax.random.PRNGKey(1), (E, 6, 3)).astype(dtype)
    r = jax.random.normal(jax.random.PRNGKey(2), (t.expert_N.shape[0], tile, 3))
    mask = (jnp.arange(t.expert_N.shape[0]) < used)[:, None, None]

    def run(loop):
        tl = dataclasses.replace(t, loop=loop)
        f = lambda x, w: (tl.matmul(x, w, jnp.float32) * r * mask).sum()  # noqa: E731
        return jax.jit(lambda x, w: (tl.matmul(x, w), jax.grad(f, (0, 1))(x, w)))(x, w)

    (y_loop, g_loop), (y_batched, g_batched) = run(True), run(False)
    assert y_loop.dtype == dtype and g_loop[0].dtype == dtype and g_loop[1].dtype == dtype
    tol = 1e-6 if dtype == jnp.float32 else 1e-2
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    np.testing.assert_allclose(f32(y_loop[:used]), f32(y_batched[:used]), rtol=tol, atol=tol)
    assert float(jnp.abs(y_loop[used:].astype(jnp.float32)).max()) == 0.0 < float(jnp.abs(x[used:]).max())
    for a, b in zip(g_loop, g_batched):
        np.testing.assert_allclose(f32(a), f32(b), rtol=tol, atol=tol * float(jnp.abs(f32(b)).max()))
    assert float(jnp.abs(g_loop[1][2].astype(jnp.float32)).max()) == 0.0  # the empty expert


@pytest.mark.parametrize("path", ["dropless", "capacity", "dense"])
def test_unused_expert_gets_zero_gradient(path):
    moe = make_moe(dispatch=path, num_shared=1, capacity_factor=2.0)
    p, h = init(moe, jax.random.PRNGKey(2)), inputs(1)
    bias = jnp.array([0.0, 0.0, -100.0, 0.0])  # expert 2 never wins a top-2 slot
    _, stats, (g, _) = value_and_grads(moe, p, h, bias)
    assert float(stats["moe_load"][2]) == 0.0
    for name in ("w_up_e", "w_gate_e", "w_down_e"):
        assert float(jnp.abs(g[name][2]).max()) == 0.0, name
        assert float(jnp.abs(g[name][0]).max()) > 0.0  # the others do learn


@pytest.mark.parametrize("E,K", [(8, 2), (5, 3), (4, 1)])
def test_balance_losses_at_uniform_routing(E, K):
    moe = make_moe(num_experts=E, num_active=K)
    h_TD = inputs().reshape(T, D)
    _, experts_TK, s = moe_lib.route(h_TD, jnp.zeros((D, E)), None, moe, MM)
    np.testing.assert_allclose(float(s["aux_loss"]), 1.0, rtol=1e-6)
    np.testing.assert_allclose(float(s["z_loss"]), math.log(E) ** 2, rtol=1e-6)
    np.testing.assert_allclose(float(s["router_entropy"]), math.log(E), rtol=1e-6)
    np.testing.assert_allclose(float(s["load_E"].sum()), 1.0, rtol=1e-6)
    assert experts_TK.shape == (T, K)
    # and it can fail: a router whose probabilities favour the overloaded expert gives aux > 1
    w_DE = jnp.zeros((D, E)).at[:, 0].set(1.0)
    _, _, s = moe_lib.route(jnp.abs(h_TD), w_DE, None, moe, MM)
    assert float(s["aux_loss"]) > 1.5 and float(s["max_load"]) == pytest.approx(E / K)


def hand_count_keep(experts_TK, E, C, groups=1):
    """keep[t, j]: pair (t, j) gets a slot, by walking the tokens of each group in order."""
    e = np.asarray(experts_TK)
    keep = np.zeros(e.shape, bool)
    S = e.shape[0] // groups
    for g in range(groups):
        used = np.zeros(E, int)
        for t in range(g * S, (g + 1) * S):
            for j in range(e.shape[1]):
                keep[t, j] = used[e[t, j]] < C
                used[e[t, j]] += 1
    return keep


@pytest.mark.parametrize("groups", [1, 2])
def test_capacity_drops_later_tokens(groups):
    moe = make_moe(dispatch="capacity", capacity_factor=0.5)
    p = init(moe, jax.random.PRNGKey(3), router_std=3.0)
    h_TD = inputs(2).reshape(T, D)
    bias = jnp.array([1.0, 0.5, 0.0, 0.0])  # skew so that experts 0 and 1 overflow
    weights_TK, experts_TK, _ = moe_lib.route(h_TD, p["router"], bias, moe, MM)
    C = moe_dispatch.capacity_of(moe, T // groups)
    assert C == math.ceil(0.5 * 2 * (T // groups) / 4)
    keep = hand_count_keep(experts_TK, 4, C, groups)
    y_TD, dropped = moe_dispatch.capacity(p, h_TD, weights_TK, experts_TK, moe, MM, num_groups=groups)
    assert 0.2 < 1 - keep.mean() < 0.8
    assert float(dropped) == pytest.approx(1 - keep.mean(), abs=1e-7)
    S = T // groups
    for g in range(groups):
        assert keep[g * S : g * S + C].all()  # the first C tokens of a group always fit
    assert not keep[-1].all()
    # the kept pairs are exactly the dense reference with the dropped pairs' weights zeroed
    ref_TD, _ = moe_dispatch.dense(p, h_TD, weights_TK * jnp.asarray(keep), experts_TK, moe, MM)
    np.testing.assert_allclose(np.asarray(y_TD), np.asarray(ref_TD), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rule,rate", [("linear", 0.1), ("sign", 0.01)])
def test_bias_update_balances_load(rule, rate):
    moe = make_moe(num_experts=8, num_active=2)
    key = jax.random.PRNGKey(4)
    h_TD = jax.random.normal(key, (256, D)).at[:, 0].add(2.0)  # feature 0 is large on every token ...
    w_DE = jax.random.normal(jax.random.fold_in(key, 1), (D, 8)) / math.sqrt(D)
    w_DE = w_DE.at[0, 0].add(1.0)  # ... and expert 0's router reads it: expert 0 is on (almost) every token
    step = jax.jit(
        lambda b: moe_lib.update_bias(b, moe_lib.route(h_TD, w_DE, b, moe, MM)[2]["load_E"], rate, rule, num_active=2)
    )
    max_load = lambda b: float(moe_lib.route(h_TD, w_DE, b, moe, MM)[2]["max_load"])  # noqa: E731
    bias = jnp.zeros(8)
    start = max_load(bias)
    for _ in range(50):
        bias = step(bias)
    assert start > 2.0 and max_load(bias) < 1.3, (start, max_load(bias))


def test_update_bias_linear_is_the_papers_rule():
    load_E = jnp.array([0.5, 0.25, 0.25, 0.0])  # fraction of pairs; K=2: the paper's Load = [1, .5, .5, 0]
    new = moe_lib.update_bias(jnp.zeros(4), load_E, 0.1, num_active=2)
    np.testing.assert_allclose(np.asarray(new), -0.1 * (np.array([1.0, 0.5, 0.5, 0.0]) - 2 / 4), atol=1e-7)
    new = moe_lib.update_bias(jnp.zeros(4), load_E, 0.1, "sign", num_active=2)
    np.testing.assert_allclose(np.asarray(new), [-0.1, 0.0, 0.0, 0.1], atol=1e-7)
    with pytest.raises(ConfigError):
        moe_lib.update_bias(jnp.zeros(4), load_E, 0.1, "cubic", num_active=2)


class CountingQuantizer:
    """Passes operands through, recording the role of every weight and activation it sees."""

    def __init__(self):
        self.weights_roles, self.activation_roles = [], []

    def weights(self, w, eq, role):
        self.weights_roles.append(role)
        return w

    def activations(self, x, eq, role):
        self.activation_roles.append(role)
        return x


@pytest.mark.parametrize(
    "path,impl",
    [("dropless", i) for i in ("tiled", "tiled_loop", "ragged_dot")] + [("capacity", "auto"), ("dense", "auto")],
)
def test_every_matmul_goes_through_the_entry_point(path, impl):
    moe = make_moe(dispatch=path, num_shared=1, grouped_impl=impl)
    q = CountingQuantizer()
    p, h = init(moe, jax.random.PRNGKey(5)), inputs()
    jax.make_jaxpr(lambda p, h: moe_lib.apply(p, h, moe, Matmul(quantizer=q)))(p, h)
    expected = ["router", "expert_in", "expert_in", "expert_out", "hidden", "hidden", "hidden"]
    assert sorted(q.weights_roles) == sorted(expected)
    assert sorted(q.activation_roles) == sorted(expected)
    # and a quantizer's output is what gets multiplied: zeroing the expert weights zeroes the routed output
    zero = CountingQuantizer()
    zero.weights = lambda w, eq, role: w * 0 if role.startswith("expert") else w
    out = moe_lib.apply(p, h, dataclasses.replace(moe, num_shared=0), Matmul(quantizer=zero))
    assert float(jnp.abs(out).max()) == 0.0


def test_no_direct_matmuls_in_source():
    for module in (moe_lib, moe_dispatch, moe_ep, moe_layout):
        src = inspect.getsource(module)
        for bad in ("jnp.einsum(", "jnp.dot(", "ragged_dot(", " @ ", "jnp.matmul("):
            assert bad not in src, (module.__name__, bad)


def test_specs_and_config():
    moe = make_moe(num_shared=2, mlp="gelu")
    s = moe_lib.specs(moe)
    assert set(s) == {"router", "w_up_e", "w_down_e", "w_up_s", "w_down_s"}
    assert s["router"].role == "router" and s["router"].fan_in == ("embed",)
    assert s["w_up_e"].axes == ("layers", "experts", "embed", "expert_mlp") and s["w_up_e"].fan_in == ("embed",)
    assert s["w_down_e"].role == "expert_out" and s["w_down_e"].fan_in == ("expert_mlp",)
    assert all("experts" not in spec.fan_in for spec in s.values())
    assert moe_lib.axis_sizes(moe)["shared_mlp"] == 16
    with pytest.raises(ConfigError):
        make_moe(dispatch="ragged")
    with pytest.raises(ConfigError):
        make_moe(num_active=5)
    import ml_collections

    cfg = ml_collections.ConfigDict(
        {"model": {"mlp": "gelu", "moe": {f: getattr(moe, f) for f in moe.__dataclass_fields__ if f != "mlp"}}}
    )
    assert moe_lib.MoEConfig.from_config(cfg) == moe


def test_bias_chooses_experts_but_not_weights():
    moe = make_moe(score="sigmoid", combine="mean_k")
    p, h_TD = init(moe, jax.random.PRNGKey(8)), inputs(4).reshape(T, D)
    bias = jnp.array([0.3, -0.2, 0.1, 0.0])
    weights_TK, experts_TK, _ = moe_lib.route(h_TD, p["router"], bias, moe, MM)
    _, unbiased_TK, _ = moe_lib.route(h_TD, p["router"], None, moe, MM)
    assert (np.asarray(experts_TK) != np.asarray(unbiased_TK)).any()  # the bias changed some choices ...
    scores_TE = jax.nn.sigmoid(h_TD @ p["router"])
    ref_TK = jnp.take_along_axis(scores_TE, experts_TK, axis=-1) / 2  # ... the weights are the pre-bias scores / K
    np.testing.assert_allclose(np.asarray(weights_TK), np.asarray(ref_TK), rtol=1e-6)
    g = jax.grad(lambda b: moe_lib.route(h_TD, p["router"], b, moe, MM)[0].sum())(bias)
    assert float(jnp.abs(g).max()) == 0.0


def test_scan_over_layers_bfloat16():
    """The layer inside a jax.lax.scan over stacked layers, bf16 compute: stats come out per layer."""
    moe = make_moe(num_shared=1)
    L = 3
    layers = [init(moe, jax.random.PRNGKey(20 + i)) for i in range(L)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a).astype(jnp.bfloat16), *layers)
    bias_LE = jnp.zeros((L, 4)).at[:, 3].set(-100.0)
    mm = Matmul(dtype=jnp.bfloat16)

    def body(x, pb):
        p, b = pb
        stats = {}
        return x + moe_lib.apply(p, x, moe, mm, b, stats), stats

    x, stats = jax.jit(lambda x: jax.lax.scan(body, x, (stacked, bias_LE)))(inputs().astype(jnp.bfloat16))
    assert x.dtype == jnp.bfloat16 and bool(jnp.isfinite(x.astype(jnp.float32)).all())
    assert stats["moe_load"].shape == (L, 4) and stats["moe_aux_loss"].shape == (L,)
    np.testing.assert_allclose(np.asarray(stats["moe_load"][:, 3]), 0.0)
    np.testing.assert_allclose(np.asarray(stats["moe_load"].sum(-1)), 1.0, rtol=1e-6)
