"""Training-dynamics metrics (train/dyn.py): dyn/ keys on dyn steps only, training unchanged, the numbers right."""

import math

import jax
import numpy as np
import pytest
from conftest import one_device_mesh, tiny_config

from maxscale.errors import ConfigError
from maxscale.parallel import sharding
from maxscale.parameterization import scale_shapes
from maxscale.train import data, loop, metrics
from maxscale.train import dyn as dyn_lib
from maxscale.train import step as step_lib

RUN = {"train.steps": 8, "train.log_every": 3, "checkpoint.every": 8, "train.eval_steps": 0, "train.sample_tokens": 0}
GROUPS = ("attn_out", "attn_qkv", "embed", "mlp_in", "mlp_out", "norm", "readout")
PER_GROUP = ("rms_w", "rms_g", "rms_u", "u_over_w")
PER_LAYER = ("dh_init", "dh_step", "attn_entropy", "attn_entropy_norm")


def dyn_keys(groups=GROUPS, layers=2) -> set:
    return {f"dyn/{m}/{g}" for m in PER_GROUP for g in groups} | {
        f"dyn/{m}/layer_{i}" for m in PER_LAYER for i in range(layers)
    }


def by_step(workdir) -> dict:
    return {r["step"]: r for r in metrics.read_metrics(str(workdir)) if "train/loss" in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_corpus):
    """8-step runs logged every 3rd step: without dyn metrics, with them every 4 steps, and the latter stopped after
    4 steps and resumed (one Setup for the three, compiled once). {name: workdir}"""
    root = tmp_path_factory.mktemp("dyn")

    def run(name, every, setup=None, steps=None):
        cfg = tiny_config(**RUN, **{"train.dyn_every": every})
        setup = setup or step_lib.Setup.build(cfg, one_device_mesh(cfg))
        trainer = loop.Trainer(cfg, str(root / name), corpus=tiny_corpus, setup=setup)
        if steps:
            trainer.cfg.train.steps = steps  # the same schedule horizon; the loop stops (and saves) at `steps`
        trainer.run()
        return setup

    run("off", 0)
    setup = run("on", 4)
    run("split", 4, setup, steps=4)
    run("split", 4, setup)
    return {name: root / name for name in ("off", "on", "split")}


def test_dyn_metrics_only_on_dyn_steps_and_training_is_unchanged(runs):
    off, on = by_step(runs["off"]), by_step(runs["on"])
    assert sorted(off) == [1, 3, 6, 8] and sorted(on) == [1, 3, 4, 6, 8]  # 4: a dyn step is always logged
    assert not any(k.startswith("dyn/") for r in off.values() for k in r)
    for step, record in on.items():
        keys = {k for k in record if k.startswith("dyn/")}
        assert keys == (dyn_keys() if step in (4, 8) else set()), (step, sorted(keys))
        if step in off:
            assert record["train/loss"] == off[step]["train/loss"]  # bit for bit (6 and 8 after the dyn step 4)
    last = on[8]
    assert all(math.isfinite(last[k]) for k in dyn_keys())
    assert last["dyn/dh_init/layer_1"] > last["dyn/dh_step/layer_1"] > 0
    assert 0 < last["dyn/attn_entropy/layer_0"] < math.log(64) and 0 < last["dyn/attn_entropy_norm/layer_0"] <= 1
    tb = metrics.read_tensorboard_scalars(runs["on"] / "tensorboard")
    assert [s for s, _ in tb["dyn/u_over_w/readout"]] == [4, 8]


def test_a_resumed_run_continues_the_dyn_series(runs):
    """After a resume the step-0 probe features are recomputed from the seed; dh_step is relative to the resume step,
    here the previous dyn step: the resumed run logs what the uninterrupted one did."""
    full, split = by_step(runs["on"]), by_step(runs["split"])
    assert sorted(split) == [1, 3, 4, 5, 6, 8]  # 5: the first step after the resume
    for key in dyn_keys():
        np.testing.assert_allclose(split[8][key], full[8][key], rtol=1e-5, err_msg=key)


def test_first_adam_update_and_update_weight_ratio(tiny_corpus):
    """SP, no warmup, eps ~ 0: Adam's first update is lr * g / |g|, RMS = lr wherever gradients are not zero (all
    groups but the embedding, whose rows of absent tokens get none); u_over_w equals RMS(after - before) /
    RMS(after) of the params themselves."""
    lr = 1e-2
    fields = {"schedule.name": "constant", "schedule.warmup_steps": 0, "optimizer.lr": lr, "optimizer.eps": 1e-30}
    cfg = tiny_config(**fields, **{"train.dyn_every": 1})
    setup = step_lib.Setup.build(cfg, one_device_mesh(cfg))
    state = setup.init_state()
    before = jax.device_get(state["params"])
    batch = setup.global_batch(next(iter(data.train_dataset(tiny_corpus, cfg)))["tokens"])
    state, m = setup.train_step(state, batch)
    m, after = jax.device_get((m, state["params"]))
    assert set(k for k in m if k.startswith("dyn/")) == {f"dyn/{s}/{g}" for s in PER_GROUP for g in GROUPS}
    for group in GROUPS:
        if group != "embed":
            np.testing.assert_allclose(m[f"dyn/rms_u/{group}"], lr, rtol=1e-5, err_msg=group)
    assert 0 < m["dyn/rms_u/embed"] < lr
    rms = lambda x: float(np.sqrt(np.mean(np.square(np.asarray(x, np.float64)))))  # noqa: E731
    w0, w1 = before["blocks"]["w_down"], after["blocks"]["w_down"]
    np.testing.assert_allclose(m["dyn/rms_w/mlp_out"], rms(w1), rtol=1e-5)
    np.testing.assert_allclose(m["dyn/u_over_w/mlp_out"], rms(w1 - w0) / rms(w1), rtol=1e-4)
    qkv = [after["blocks"][n] for n in ("wq", "wk", "wv")]
    want = math.sqrt(sum(float(np.sum(np.square(w, dtype=np.float64))) for w in qkv) / sum(w.size for w in qkv))
    np.testing.assert_allclose(m["dyn/rms_w/attn_qkv"], want, rtol=1e-5)


def probe_setup(cfg, corpus, mesh=None):
    setup = step_lib.Setup.build(cfg, mesh if mesh is not None else one_device_mesh(cfg))
    state = setup.init_state()
    dyn = dyn_lib.Dynamics(setup, dyn_lib.probe_batch(setup, corpus, [], 0, 1))
    dyn.begin(state, 0)
    return setup, state, dyn


def test_probe_at_init_and_uniform_attention_of_a_zero_query(tiny_corpus):
    """At step 0 the features have not moved (dh = 0; that they move later: the runs above) and a zero query attends
    uniformly: the entropy is mean_t log(t + 1), normalised 1."""
    cfg = tiny_config(**{"train.dyn_every": 2, "parameterization.zero_init_query": True})
    setup, state, dyn = probe_setup(cfg, tiny_corpus)
    assert dyn.add({"dyn/rms_w/embed": 1.0, "train/loss": 2.0}, state, 3) == {"train/loss": 2.0}  # not a dyn step
    at_init = jax.device_get(dyn.add({}, state, 2))
    assert set(at_init) == {f"dyn/{m}/layer_{i}" for m in PER_LAYER for i in range(2)}
    uniform = float(np.mean(np.log(np.arange(1, cfg.data.seq_len + 1))))  # q = 0: every visible key alike
    for i in range(2):
        assert at_init[f"dyn/dh_init/layer_{i}"] == 0 and at_init[f"dyn/dh_step/layer_{i}"] == 0
        assert abs(at_init[f"dyn/attn_entropy/layer_{i}"] - uniform) < 1e-5
        assert abs(at_init[f"dyn/attn_entropy_norm/layer_{i}"] - 1) < 1e-5


@pytest.mark.slow
def test_moe_microbatches_and_a_mesh(tiny_corpus):
    """MoE blocks (router and expert groups), 2 microbatches, data x expert = 2 x 2 devices: training unchanged,
    every dyn/ metric finite."""
    moe = {
        "model.moe.num_experts": 4,
        "model.moe.expert_ffn_size": 64,
        "model.moe.dispatch": "capacity",
        "model.moe.capacity_factor": 2.0,
        "train.microbatches": 2,
        "mesh.data": 2,
        "mesh.expert": 2,
    }
    losses, out = {}, None
    for every in (0, 1):
        cfg = tiny_config(**moe, **{"train.dyn_every": every})
        mesh = sharding.make_mesh(cfg, jax.devices()[:4])
        setup, state, dyn = probe_setup(cfg, tiny_corpus, mesh) if every else (None, None, None)
        setup = setup or step_lib.Setup.build(cfg, mesh)
        state = state if state is not None else setup.init_state()
        it = iter(data.train_dataset(tiny_corpus, cfg))
        losses[every] = []
        for _ in range(2):
            state, m = setup.train_step(state, setup.global_batch(next(it)["tokens"]))
            losses[every].append(float(m["train/loss"]))
        if every:
            out = jax.device_get(dyn.add(m, state, 2))
    assert losses[0] == losses[1]
    groups = ("attn_out", "attn_qkv", "embed", "expert_in", "expert_out", "norm", "readout", "router")
    assert {k for k in out if k.startswith("dyn/")} == dyn_keys(groups)
    assert all(np.isfinite(out[k]) for k in dyn_keys(groups))


def test_bad_dyn_every_is_refused():
    cfg = tiny_config(**{"train.dyn_every": -1})
    with pytest.raises(ConfigError, match=r"train\.dyn_every=-1 must be"):
        step_lib.Setup.build(cfg, one_device_mesh(cfg))


@pytest.mark.slow
def test_feature_change_is_width_independent_under_mup_not_sp(tiny_corpus):
    """3 steps at LR 1e-2, width 64 and 256 (base 64): muP's dh_init per layer moves by under 30% with width,
    SP's grows over 2x (measured: SP 3-9x, muP 0.9-1.1x after 5 steps)."""
    fields = {"train.dyn_every": 1, "schedule.name": "constant", "schedule.warmup_steps": 0, "optimizer.lr": 1e-2}
    ratios = {}
    for name in ("sp", "mup"):
        dh = {}
        for width in (64, 256):
            base = tiny_config(**fields, **{"parameterization.name": name})
            cfg = tiny_config(**fields, **{"parameterization.name": name}, **scale_shapes(base, width=width))
            setup, state, dyn = probe_setup(cfg, tiny_corpus)
            it = iter(data.train_dataset(tiny_corpus, cfg))
            for _ in range(3):
                state, m = setup.train_step(state, setup.global_batch(next(it)["tokens"]))
            out = jax.device_get(dyn.add(m, state, 3))
            dh[width] = np.array([out[f"dyn/dh_init/layer_{i}"] for i in range(2)])
        ratios[name] = dh[256] / dh[64]
    print(ratios)
    assert np.all(ratios["sp"] > 2.0), ratios
    assert np.all(np.abs(np.log(ratios["mup"])) < np.log(1.3)), ratios
