"""Schedules match their formulas; the per-parameter factor table reaches each parameter's update."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from maxscale.model import transformer
from maxscale.train import optim

T = 1000


def sched(name, **kw):
    over = {"schedule.name": name, "train.steps": T, "schedule.warmup_steps": kw.pop("warmup", 0)}
    over.update({f"schedule.{k}": v for k, v in kw.items()})
    return optim.schedule(tiny_config(**over))


@pytest.mark.parametrize("t", [0, 99, 250, 500, 999])
def test_cosine_with_warmup_and_floor(t):
    f = sched("cosine", warmup=100, final_lr_fraction=0.1)
    warm = min(1.0, (t + 1) / 100)
    progress = min(max((t - 100) / (T - 100), 0.0), 1.0)
    expect = warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    assert float(f(t)) == pytest.approx(expect, rel=1e-5)


@pytest.mark.parametrize("t,expect", [(0, 1.0), (799, 1.0), (800, 1.0), (900, 0.5), (999, 0.005)])
def test_wsd_decays_linearly_over_the_last_fraction(t, expect):
    f = sched("wsd", decay_fraction=0.2, final_lr_fraction=0.0)
    assert float(f(t)) == pytest.approx(expect, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("t", [0, 10, 100, 500, 900])
def test_power_family(t):
    f = sched("power", power_t0=50.0, power_chi=0.5, power_delta=2.0)
    assert float(f(t)) == pytest.approx((1 + t / 50) ** -0.5 * (1 - t / T) ** 2, rel=1e-5)


def test_constant_with_warmup():
    f = sched("constant", warmup=10)
    assert [float(f(t)) for t in (0, 4, 9, 500)] == pytest.approx([0.1, 0.5, 1.0, 1.0])


def _first_update(cfg, factor_override=None):
    model = transformer.ModelDef(cfg)
    specs = model.spec_tree()
    if factor_override:
        orig = optim.factor_tree

        def patched(c, s):
            tree = orig(c, s)
            tree["embed"] = dict(tree["embed"], **factor_override)
            return tree

        optim.factor_tree, saved = patched, orig
        try:
            tx = optim.make_optimizer(cfg, specs)
        finally:
            optim.factor_tree = saved
    else:
        tx = optim.make_optimizer(cfg, specs)
    params = model.init(0)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.01) * jnp.arange(p.size).reshape(p.shape) / p.size, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    return updates


def test_changing_one_factor_changes_only_that_parameters_update():
    cfg = tiny_config(**{"optimizer.grad_clip": 0.0, "optimizer.weight_decay": 0.0})
    base = _first_update(cfg)
    doubled = _first_update(cfg, {"lr": 2.0})
    flat_a, flat_b = dict(jax.tree_util.tree_leaves_with_path(base)), dict(jax.tree_util.tree_leaves_with_path(doubled))
    for path, a in flat_a.items():
        b = flat_b[path]
        if "embed" == jax.tree_util.keystr(path).strip("[]'"):
            np.testing.assert_allclose(b, 2 * a, rtol=1e-6)
        else:
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("mode", ["coupled", "independent"])
def test_weight_decay_modes(mode):
    """coupled: decay = lr * wd * p; independent: decay = wd * sched * p, not scaled by the LR."""
    cfg = tiny_config(
        **{
            "optimizer.grad_clip": 0.0,
            "optimizer.weight_decay": 0.5,
            "optimizer.lr": 0.01,
            "optimizer.weight_decay_mode": mode,
            "schedule.name": "constant",
            "schedule.warmup_steps": 0,
        }
    )
    model = transformer.ModelDef(cfg)
    tx = optim.make_optimizer(cfg, model.spec_tree())
    params = model.init(0)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)  # zero gradient: only the decay moves parameters
    w, u = params["blocks"]["wq"], updates["blocks"]["wq"]
    rate = 0.01 * 0.5 if mode == "coupled" else 0.5
    np.testing.assert_allclose(u, -rate * w, rtol=1e-5, atol=1e-10)
    np.testing.assert_array_equal(updates["blocks"]["attn_norm"], 0.0)  # norm gains are never decayed


def test_relative_clip_cuts_spikes_at_ratio_times_the_running_norm():
    clip = optim.clip_relative_to_running_norm(ratio=2.0, decay=0.9, warmup=5)
    state = clip.init(None)
    g = {"w": jnp.full((4,), 0.5)}  # norm 1
    for _ in range(30):
        out, state = clip.update(g, state)
        assert float(optax_norm(out)) == pytest.approx(1.0, rel=1e-6)  # steady: never clipped
    spike, state = clip.update({"w": g["w"] * 10}, state)
    assert float(optax_norm(spike)) == pytest.approx(2.0, rel=1e-4)  # cut to 2 x the running mean (1)
    after, state = clip.update(g, state)
    assert float(optax_norm(after)) == pytest.approx(1.0, rel=1e-6)  # the spike did not raise the bar


def optax_norm(tree):
    return jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(tree)))


@pytest.mark.parametrize("mode", ["relative", "global"])
def test_relative_clip_makes_the_optimizer_blind_to_the_gradient_scale(mode):
    """Gradients x 100 with a spike at step 20: relative clipping gives the same updates (Adam is scale-free up to
    eps), a fixed threshold does not (it clips a different set of steps)."""
    cfg = tiny_config(**{"optimizer.grad_clip_mode": mode, "optimizer.grad_clip": 1.0, "optimizer.eps": 1e-20})
    specs = transformer.ModelDef(cfg).spec_tree()
    params = jax.jit(transformer.ModelDef(cfg).init, static_argnums=0)(0)
    tx = optim.make_optimizer(cfg, specs)
    keys = jax.random.split(jax.random.key(0), 25)
    grads = [jax.tree.map(lambda p, k=k: 1e-4 * jax.random.normal(k, p.shape), params) for k in keys]  # norm < 1
    grads[20] = jax.tree.map(lambda g: 50 * g, grads[20])

    update = jax.jit(tx.update)

    def run(c):
        state, ups = tx.init(params), []
        for g in grads:
            u, state = update(jax.tree.map(lambda x: c * x, g), state, params)
            ups.append(u)
        return ups

    a, b = run(1.0), run(100.0)
    close = all(
        np.allclose(x, y, rtol=1e-4, atol=1e-9)
        for ua, ub in zip(a, b)
        for x, y in zip(jax.tree.leaves(ua), jax.tree.leaves(ub))
    )
    assert close == (mode == "relative")


def test_grad_clip_mode_auto_follows_the_parameterization():
    assert tiny_config(**{"parameterization.name": "sp"}).optimizer.grad_clip_mode == "global"
    for name in ("mup", "depth_mup", "completep"):
        assert tiny_config(**{"parameterization.name": name}).optimizer.grad_clip_mode == "relative"
    with pytest.raises(Exception, match="optimizer.grad_clip_ratio=1.0 must be > 1"):
        tiny_config(**{"optimizer.grad_clip_ratio": 1.0})
