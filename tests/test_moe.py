"""Mixture-of-experts models end to end: dispatch paths agree through the whole model, expert-parallel meshes equal
one device, the routing bias is state (not a parameter), MoE configs are validated, active FLOPs, a CLI run with
routing metrics, exact resume after kills, and 2 processes x 2 devices with expert=2 equal 1 x 4."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import ROOT, one_device_mesh, xla_flags
from conftest import train_losses as losses
from jax.sharding import PartitionSpec as P

from maxscale import config as config_lib
from maxscale.errors import ConfigError
from maxscale.model import transformer
from maxscale.parallel import sharding
from maxscale.quant import formats
from maxscale.tools import chaos
from maxscale.train import data
from maxscale.train import step as step_lib

MOE_TINY = os.path.join(ROOT, "configs", "moe_tiny.py")


def moe_config(**overrides):
    cfg = config_lib.load(MOE_TINY)
    cfg.data.max_bytes = 400_000
    cfg.mesh.update(data=1, fsdp=1, tensor=1, expert=1)
    for key, value in overrides.items():
        config_lib.override(cfg, key, str(value))
    return config_lib.resolve(cfg)


@pytest.fixture(scope="module")
def reference(tiny_corpus):
    cfg = moe_config()
    return losses(cfg, one_device_mesh(cfg), tiny_corpus)


def test_dispatch_paths_give_the_same_loss_and_gradients_through_the_model(tiny_corpus):
    tokens = next(iter(data.train_dataset(tiny_corpus, moe_config())))["tokens"]
    out = {}
    for dispatch in ("dense", "dropless", "capacity"):  # capacity_factor 2 = E/k: nothing drops
        cfg = moe_config(**{"model.moe.dispatch": dispatch, "model.moe.num_shared": 1})
        setup = step_lib.Setup.build(cfg, one_device_mesh(cfg))
        params = setup.init_state()["params"]
        grad_fn = jax.jit(jax.value_and_grad(lambda p, t, s=setup: s.loss_and_aux(p, t)[0]))
        out[dispatch] = jax.device_get(grad_fn(params, tokens))
    (ref_loss, ref_grads) = out["dense"]
    for dispatch in ("dropless", "capacity"):
        loss, grads = out[dispatch]
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("n_data,n_expert,dispatch", [(1, 2, "capacity"), (2, 4, "capacity"), (2, 2, "dropless")])
def test_expert_parallel_mesh_matches_one_device(n_data, n_expert, dispatch, reference, tiny_corpus):
    """EP runs (all-gather + reduce-scatter) equal the one-device capacity run (capacity_factor 2 drops nothing with
    4 experts, so both paths compute the same model)."""
    cfg = moe_config(**{"mesh.data": n_data, "mesh.expert": n_expert, "model.moe.dispatch": dispatch})
    mesh = sharding.make_mesh(cfg, jax.devices()[: n_data * n_expert])
    got, setup, state = losses(cfg, mesh, tiny_corpus)
    np.testing.assert_allclose(got, reference[0], rtol=1e-4)
    params = state["params"]["moe_blocks"]
    assert params["w_up_e"].sharding.spec == P(None, "expert", None, None)
    assert params["w_down_e"].sharding.spec == P(None, "expert", None, None)
    assert params["router"].sharding.spec == P(None, None, "expert")
    E = cfg.model.moe.num_experts
    assert params["w_up_e"].addressable_shards[0].data.shape[1] == E // n_expert  # each rank holds its experts
    assert setup.batch_sharding.spec == P(("data", "expert") if n_data > 1 else "expert", None)


def test_capacity_drops_do_not_depend_on_the_mesh(tiny_corpus):
    """8 experts top-2 at capacity_factor 2 drop pairs (6.6% at step 1): on data=2 x expert=2 the same pairs drop as
    on one device, since capacity is counted over the global batch (per-shard groups dropped 7.4%)."""
    runs = {}
    for n_data, n_expert in ((1, 1), (2, 2)):
        over = {"model.moe.num_experts": 8, "parameterization.check_kappa": False}
        cfg = moe_config(**over, **{"mesh.data": n_data, "mesh.expert": n_expert})
        setup = step_lib.Setup.build(cfg, sharding.make_mesh(cfg, jax.devices()[: n_data * n_expert]))
        state, it, rows = setup.init_state(), iter(data.train_dataset(tiny_corpus, cfg)), []
        for _ in range(3):
            state, m = setup.train_step(state, setup.global_batch(next(it)["tokens"]))
            rows.append((float(m["train/loss"]), float(m["moe/dropped_fraction"])))
        runs[n_data, n_expert] = np.asarray(rows)
    one, ep = runs[1, 1], runs[2, 2]
    assert one[0, 1] > 0.03 and np.all(np.diff(one[:, 1]) != 0)  # drops happen and change as the router trains
    np.testing.assert_allclose(ep[:, 1], one[:, 1], atol=1e-7)  # the same pairs dropped, step by step
    np.testing.assert_allclose(ep[:, 0], one[:, 0], rtol=2e-6)  # per-shard groups were 5e-5 apart at step 1


def test_interleaved_layout_on_an_expert_mesh_matches_one_device(tiny_corpus):
    cfg = moe_config(**{"model.depth": 4, "model.moe.every": 2, "model.moe.dispatch": "dropless"})
    ref = losses(cfg, one_device_mesh(cfg), tiny_corpus, steps=3)[0]
    ep = moe_config(**{"model.depth": 4, "model.moe.every": 2, "model.moe.dispatch": "dropless", "mesh.expert": 2})
    got, _, state = losses(ep, sharding.make_mesh(ep, jax.devices()[:2]), tiny_corpus, steps=3)
    np.testing.assert_allclose(got, ref, rtol=1e-4)
    assert state["params"]["interleaved"]["w_up"].shape[0] == 2 and state["moe_bias"].shape == (2, 4)


def test_routing_bias_is_state_updated_by_the_load_not_a_parameter(reference):
    _, setup, state = reference
    assert "moe_bias" not in state["params"] and state["moe_bias"].shape == setup.moe_bias_shape == (2, 4)
    bias = np.asarray(state["moe_bias"])
    assert np.abs(bias).max() > 0 and np.allclose(bias.sum(-1), 0, atol=1e-6)  # the linear rule keeps sum b = 0
    flat = {
        "/".join(str(getattr(k, "key", k)) for k in path)
        for path, _ in jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]
    }
    assert not any("moe_bias" in p for p in flat)  # no optimizer state: no Adam, no weight decay


def test_one_bias_step_follows_the_papers_linear_rule(tiny_corpus):
    cfg = moe_config(**{"model.moe.bias_rate": 0.5})
    setup = step_lib.Setup.build(cfg, one_device_mesh(cfg))
    state = setup.init_state()
    tokens = setup.global_batch(next(iter(data.train_dataset(tiny_corpus, cfg)))["tokens"])
    _, aux = jax.jit(setup.loss_and_aux)(state["params"], tokens, state["moe_bias"])
    load_LE = np.asarray(aux["moe"]["moe_load"])
    state, metrics = setup.train_step(state, tokens)
    K, E = cfg.model.moe.num_active, cfg.model.moe.num_experts
    np.testing.assert_allclose(state["moe_bias"], -0.5 * K * (load_LE - 1 / E), rtol=1e-5, atol=1e-7)
    assert float(metrics["moe/load_max"]) == pytest.approx(E * load_LE.max(), rel=1e-5)


@pytest.mark.parametrize(
    "overrides,expected",
    [
        ({"model.moe.num_active": 5}, "model.moe.num_active=5 must lie in [1, model.moe.num_experts=4]"),
        ({"model.moe.first_dense": 2}, "model.moe.first_dense=2 leaves no MoE block"),
        ({"model.moe.every": 3}, "model.moe.every=3 must be >= 1 and divide the 2 blocks after"),
        ({"model.moe.every": 0}, "model.moe.every=0 must be >= 1"),
        ({"model.moe.dispatch": "ragged"}, "model.moe.dispatch='ragged' is not supported"),
        ({"parameterization.base_num_experts": 8}, "k/E = 2/4 differs from the base's 2/8"),
        ({"model.moe.capacity_factor": 0.0}, "model.moe.capacity_factor=0.0 must be > 0"),
    ],
)
def test_bad_moe_config_is_one_line(overrides, expected):
    with pytest.raises(ConfigError) as e:
        moe_config(**overrides)
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_kappa_check_can_be_turned_off_for_a_control():
    cfg = moe_config(**{"parameterization.base_num_experts": 8, "parameterization.check_kappa": False})
    assert cfg.parameterization.base_num_experts == 8


def test_flops_and_params_count_active_experts_only():
    moe = moe_config(**{"model.moe.num_shared": 1, "model.moe.shared_ffn_size": 32})
    m, e = moe.model, moe.model.moe
    counts = transformer.count_params(moe)
    expert_params = m.depth * e.num_experts * 3 * m.width * e.expert_ffn_size
    assert counts["total"] - counts["active"] == expert_params * (e.num_experts - e.num_active) // e.num_experts
    attn = m.width * m.head_dim * 4 * m.num_heads
    per_layer = attn + m.width * e.num_experts + 3 * m.width * (e.num_active * e.expert_ffn_size + e.shared_ffn_size)
    expected = 6.0 * (m.depth * per_layer + m.width * m.vocab_size) + 12.0 * m.depth * moe.data.seq_len * m.width
    assert transformer.flops_per_token(moe) == expected


def test_first_dense_blocks_then_moe_blocks(tiny_corpus):
    cfg = moe_config(**{"model.depth": 3, "model.moe.first_dense": 1})
    setup = step_lib.Setup.build(cfg, one_device_mesh(cfg))
    state = setup.init_state()
    assert state["params"]["blocks"]["w_up"].shape[0] == 1 and state["params"]["moe_blocks"]["w_up_e"].shape[0] == 2
    tokens = setup.global_batch(next(iter(data.train_dataset(tiny_corpus, cfg)))["tokens"])
    out = setup.model.forward(state["params"], tokens[:, :-1], capture=("stats",))
    logits, stats = out.logits, transformer.stats_of(out)
    assert {k: stats["layers"][k].shape for k in ("attn", "mlp", "resid")} == {"attn": (3,), "mlp": (3,), "resid": (3,)}
    assert all(v.shape[0] == 3 for v in stats["layers"].values())  # every per-layer series spans both stacks
    assert np.isfinite(np.asarray(logits)).all()


def test_every_nth_block_is_moe_in_depth_order(tiny_corpus):
    """first_dense=1, every=2, depth 5: D, (D, M), (D, M). The scanned groups equal a hand-written loop over the
    blocks in that order, per-layer series span all five blocks, and counts and FLOPs follow the layout."""
    cfg = moe_config(**{"model.depth": 5, "model.moe.first_dense": 1, "model.moe.every": 2})
    assert transformer.stack_depths(cfg) == {"blocks": 1, "interleaved": 2, "moe_blocks": 2}
    model = transformer.ModelDef(cfg)
    params = jax.jit(model.init, static_argnums=0)(0)
    tokens = np.asarray(next(iter(data.train_dataset(tiny_corpus, cfg)))["tokens"])[:2, :-1]
    bias_LE = jax.random.normal(jax.random.key(1), (2, cfg.model.moe.num_experts)) * 0.1
    out = model.forward(params, tokens, capture=("stats",), moe_bias=bias_LE)
    logits, stats = out.logits, transformer.stats_of(out)
    assert all(v.shape[0] == 5 for v in stats["layers"].values()) and stats["moe"]["moe_load"].shape == (2, 4)

    mults = transformer.Parameterization(cfg).multipliers()
    m = cfg.model
    x = params["embed"][tokens] * mults["input"]
    order = [("blocks", 0), ("interleaved", 0), ("moe_blocks", 0), ("interleaved", 1), ("moe_blocks", 1)]
    resid = []
    for stack, i in order:
        p = {k: v[i] for k, v in params[stack].items()}
        ctx = transformer.build_context(cfg)
        x, _ = transformer.block(p, x, cfg, mults, ctx, bias_E=bias_LE[i] if stack == "moe_blocks" else None)
        resid.append(float(np.abs(np.asarray(x)).mean()))
    x = transformer.norm(x, params["final_norm"], None, m.norm, m.norm_eps)
    expected = np.asarray(x @ params["unembed"]) * mults["output"]
    np.testing.assert_allclose(logits, expected, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(stats["layers"]["resid"], resid, rtol=1e-5)

    dense = moe_config(**{"model.depth": 5, "model.moe.num_experts": 0})
    counts, dense_counts = transformer.count_params(cfg), transformer.count_params(dense)
    e = cfg.model.moe
    expert = 3 * m.width * e.expert_ffn_size  # swiglu
    moe_block_extra = m.width * e.num_experts + e.num_experts * expert - 3 * m.width * m.ffn_size
    assert counts["total"] == dense_counts["total"] + 2 * moe_block_extra


def _env(**extra):
    drop = ("MAXSCALE_", "SLURM_", "TPU_", "MEGASCALE_", "JAX_", "XLA_FLAGS")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop) or "CACHE" in k}  # keep the compile cache
    return {**env, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(1), **extra}


COMMON = [
    f"--config={MOE_TINY}",
    "--config.train.log_every=1",
    "--config.data.max_bytes=300000",
    "--config.train.eval_steps=0",
    "--config.train.sample_tokens=0",
    "--config.schedule.name=constant",
    "--config.train.peak_flops=1e12",
]


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as fh:
        return {r["step"]: r for r in map(json.loads, fh) if "train/loss" in r}


@pytest.mark.slow
def test_cli_trains_an_moe_with_routing_metrics(tmp_path):
    cmd = [sys.executable, "-m", "maxscale.train", *COMMON, f"--workdir={tmp_path}", "--config.train.steps=40"]
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = _losses(tmp_path)
    assert rows[40]["train/loss"] < rows[1]["train/loss"] - 1.0
    for key in ("moe/aux_loss", "moe/z_loss", "moe/load_max", "moe/dropped_fraction", "moe/router_entropy"):
        assert np.isfinite(rows[40][key]), key
    with open(tmp_path / "moe_load.jsonl") as fh:
        load = [json.loads(line) for line in fh]
    assert len(load) == 40 and np.allclose(np.sum(load[-1]["moe_load"], axis=1), 1.0, atol=1e-4)


@pytest.mark.slow
def test_moe_run_resumes_exactly_after_kills(tmp_path, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", xla_flags(1))
    args = [f"--config={MOE_TINY}", *chaos.DEFAULT_OVERRIDES, "--config.train.steps=24", "--config.checkpoint.every=3"]
    report = chaos.run(args, kills=2, workdir=str(tmp_path), seed=3, log=lambda line: None)
    assert report.diverged == 0 and report.failures == [], report.line()
    assert report.records_mismatched == 0 and report.states_identical == report.rounds


@pytest.mark.slow
def test_two_processes_with_expert_parallelism_equal_one_process(tmp_path):
    mesh = ["--config.mesh.data=2", "--config.mesh.expert=2", "--config.train.steps=4"]
    one = [sys.executable, "-m", "maxscale.train", *COMMON, *mesh, f"--workdir={tmp_path / 'one'}"]
    r = subprocess.run(
        one,
        cwd=ROOT,
        env=_env(XLA_FLAGS=xla_flags(4)),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert r.returncode == 0, r.stderr
    two = [sys.executable, "launch/local.py", "--num_processes=2", "--devices_per_process=2", "--"]
    two += [sys.executable, "-m", "maxscale.train", *COMMON, *mesh, f"--workdir={tmp_path / 'two'}"]
    r = subprocess.run(two, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    np.testing.assert_allclose([b[s]["train/loss"] for s in a], [a[s]["train/loss"] for s in a], rtol=1e-5)


def test_quantized_training_reaches_the_experts(tiny_corpus):
    """quant.* applies at the matmul entry point, so routed experts (capacity and dropless) are quantized too."""
    tokens = next(iter(data.train_dataset(tiny_corpus, moe_config())))["tokens"]
    losses = {}
    for name, extra in (("hp", {}), ("int2", {"quant.weights": "int2"})):
        for dispatch in ("capacity", "dropless"):
            cfg = moe_config(**{"model.moe.dispatch": dispatch, **extra})
            setup = step_lib.Setup.build(cfg, one_device_mesh(cfg))
            params = setup.init_state()["params"]
            losses[name, dispatch] = float(setup.eval_step(params, setup.global_batch(tokens)))
    assert losses["hp", "capacity"] == pytest.approx(losses["hp", "dropless"], rel=1e-5)
    assert losses["int2", "capacity"] == pytest.approx(losses["int2", "dropless"], rel=1e-4)
    assert abs(losses["int2", "capacity"] - losses["hp", "capacity"]) > 1e-4
    # The experts themselves are quantized (not only the attention matmuls): rounding the expert matrices to int2 by
    # hand beforehand moves the float loss but leaves the int2 loss as it is (rounding twice is rounding once).
    cfg = moe_config(**{"quant.weights": "int2"})
    setup = step_lib.Setup.build(cfg, one_device_mesh(cfg))
    params = setup.init_state()["params"]
    rounded = jax.tree.map(lambda w: w, params)
    for name, w in params["moe_blocks"].items():
        spec = setup.model.specs[f"moe_blocks/{name}"]
        if spec.role in ("expert_in", "expert_out"):  # scaled up 20x (in both) so the experts move the loss
            axes = tuple(spec.axes[1:].index(a) for a in spec.fan_in)  # one layer's slice: `layers` dropped
            params["moe_blocks"][name] = w = 20 * w
            rounded["moe_blocks"][name] = jax.vmap(lambda m, a=axes: formats.fake_quant(m, "int2", "per_channel", a))(w)
    batch = setup.global_batch(tokens)
    hp = step_lib.Setup.build(moe_config(), one_device_mesh(cfg))
    hp_moved = abs(float(hp.eval_step(rounded, batch)) - float(hp.eval_step(params, batch)))
    int2_moved = abs(float(setup.eval_step(rounded, batch)) - float(setup.eval_step(params, batch)))
    assert hp_moved > 1e-2 and int2_moved < 1e-5, (hp_moved, int2_moved)
