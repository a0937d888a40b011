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
