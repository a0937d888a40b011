"""Quantized training: 16 bits is lossless, 3-bit weights cost loss far above seed noise, a sharded quantized run
equals the one-device run, the explicit attention kernel equals XLA's, the whole attention quantizes the
probabilities, the embedding/readout flags quantize exactly those matrices, a bad format is one line with exit 2;
and the quantization-error metrics are ~0 at 16 bits and grow as bits fall."""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, one_device_mesh, tiny_config

from maxscale.model import attention, kernels, transformer
from maxscale.model.layers import Matmul
from maxscale.parallel import sharding
from maxscale.parameterization import Parameterization
from maxscale.quant import formats, metrics, qat
from maxscale.train import data as data_lib
from maxscale.train import loop
from maxscale.train import metrics as metrics_lib
from maxscale.train import step as step_lib

# lr 2e-3 keeps the tiny model's trajectory stable: at the tiny config's 1e-2 two runs that differ by 1e-4 at step
# 10 (int16 rounding) are 14% apart by step 16, which says nothing about quantization.
STABLE = {"optimizer.lr": 2e-3, "train.steps": 400, "schedule.warmup_steps": 10}
W4A8KV8 = {"quant.weights": "int4", "quant.activations": "int8", "quant.kv": "int8"}
ONE_LAYER = {"model.depth": 1}  # for tests that compile one program per config: the claims do not need depth


def initial_state(cfg):
    """cfg's initial train state on the host (numpy): every run of the same model and optimizer starts from it, so
    each test compiles its quantized steps but not one init per config."""
    return jax.device_get(step_lib.Setup.build(cfg, one_device_mesh(cfg)).init_state())


def train_losses(cfg, corpus, steps: int, init, mesh=None) -> np.ndarray:
    """Train losses of the first `steps` steps of cfg's run from state `init` (its schedule is that of
    cfg.train.steps)."""
    setup = step_lib.Setup.build(cfg, mesh if mesh is not None else one_device_mesh(cfg))
    batches = iter(data_lib.train_dataset(corpus, cfg))
    state, losses = jax.device_put(init, setup.state_shardings), []
    for _ in range(steps):
        state, m = setup.train_step(state, setup.global_batch(next(batches)["tokens"]))
        losses.append(m["train/loss"])
    return np.asarray(jax.device_get(losses), np.float64)


@pytest.fixture(scope="module")
def init():
    return initial_state(tiny_config(**STABLE))


@pytest.fixture(scope="module")
def high_precision(tiny_corpus, init):
    return train_losses(tiny_config(**STABLE), tiny_corpus, STABLE["train.steps"], init)


def test_16_bit_training_matches_unquantized(high_precision, tiny_corpus, init):
    cfg = tiny_config(**STABLE, **{f"quant.{k}": "int16" for k in ("weights", "activations", "kv")})
    got = train_losses(cfg, tiny_corpus, 20, init)
    np.testing.assert_allclose(got, high_precision[:20], rtol=1e-3)  # measured: max 2e-6 relative


def test_3_bit_weights_cost_loss_far_above_seed_noise(high_precision, tiny_corpus, init):
    # Mean train loss of the last 100 of 400 steps (the same batches for every run). Measured over seeds 0..3:
    # high precision 1.844 1.841 1.853 1.867 (std 0.012), int3 weights 1.884 1.941 1.901 1.917: paired gaps
    # 0.040 0.100 0.048 0.050, i.e. 3.4..8.5 standard deviations of the seed noise (5 on average).
    int3 = train_losses(tiny_config(**STABLE, **{"quant.weights": "int3"}), tiny_corpus, STABLE["train.steps"], init)
    gap = int3[-100:].mean() - high_precision[-100:].mean()
    assert gap > 0.02, gap


def test_sharded_quantized_run_equals_one_device_run(tiny_corpus):
    start = initial_state(tiny_config(**ONE_LAYER))
    one = train_losses(tiny_config(**W4A8KV8, **ONE_LAYER), tiny_corpus, 5, start)
    cfg = tiny_config(**W4A8KV8, **ONE_LAYER, **{"mesh.data": 1, "mesh.fsdp": 2, "mesh.tensor": 2})
    sharded = train_losses(cfg, tiny_corpus, 5, start, mesh=sharding.make_mesh(cfg, jax.devices()[:4]))
    np.testing.assert_allclose(sharded, one, rtol=1e-4)


def test_explicit_attention_equals_xla_values_and_gradients():
    B, T, H, G, K = 2, 16, 4, 2, 8  # grouped-query: 2 query heads per key/value head
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(kk, (B, T, n, K)) for kk, n in zip(keys, (H, G, G)))
    cot_BTHK = jax.random.normal(keys[3], (B, T, H, K))

    def value_and_grads(impl):
        loss = lambda q, k, v: jnp.sum(attention.attend(q, k, v, scale=K**-0.5, impl=impl) * cot_BTHK)  # noqa: E731
        return jax.jit(jax.value_and_grad(loss, (0, 1, 2)))(q, k, v)

    (value_e, grads_e), (value_x, grads_x) = value_and_grads("explicit"), value_and_grads("xla")
    np.testing.assert_allclose(value_e, value_x, rtol=1e-5)
    for g_explicit, g_xla in zip(grads_e, grads_x):
        np.testing.assert_allclose(g_explicit, g_xla, atol=1e-5)
    # causal: the first half of the queries does not see the second half of the keys and values
    k2, v2 = k.at[:, T // 2 :].set(0), v.at[:, T // 2 :].set(0)
    half = jax.jit(lambda k, v: kernels.explicit_attention(q, k, v, K**-0.5)[:, : T // 2])
    np.testing.assert_array_equal(half(k2, v2), half(k, v))


def _attention_output(cfg):
    """(output, kinds, [(x, x_hat)]) of the first layer's attention branch on random input with cfg's quantizer:
    every tensor the quantizer changed, in call order."""
    p = {k: v[0] for k, v in transformer.ModelDef(cfg).init(0)["blocks"].items()}
    h = jax.random.normal(jax.random.key(1), (2, 16, cfg.model.width))
    kinds = []  # filled while tracing; the arrays come back as outputs

    def branch(p, h):
        seen = []

        class Seen:  # the Recorder's seat in the matmul entry point
            def quantized(self, kind, x, x_hat):
                if x_hat is not x:
                    kinds.append(kind)
                    seen.append((x, x_hat))

            def matmul_input(self, *args):
                pass

        ctx = qat.context(cfg)
        mm = Matmul(quantizer=ctx.quantizer, recorder=Seen())
        return attention.apply(p, h, cfg, Parameterization(cfg).multipliers(), mm, ctx), seen

    out, seen = jax.jit(branch)(p, h)
    return out, kinds, seen


def test_whole_attention_quantizes_the_probabilities():
    whole, kinds, seen = _attention_output(tiny_config(**{"quant.kv": "int3", "quant.whole_attention": True}))
    kv_only, _, _ = _attention_output(tiny_config(**{"quant.kv": "int3"}))
    assert kinds.count("probs") == 1 and kinds.count("kv") == 3  # keys, values and queries
    p, p_hat = (np.asarray(a) for a in seen[kinds.index("probs")])
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-5)
    # int3 with one scale per query row: every probability is rowmax * j / 3 for an integer j in 0..3
    levels = p_hat / p.max(-1, keepdims=True) * 3
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)
    assert np.linalg.norm(whole - kv_only) / np.linalg.norm(kv_only) > 0.01  # measured 0.04


def _initial_loss_fn(overrides):
    """Cross-entropy of the tiny model under cfg overrides, as a jitted f(params) on fixed random tokens."""
    cfg = tiny_config(**overrides)
    model = transformer.ModelDef(cfg, qat.context(cfg))
    tokens = jax.random.randint(jax.random.key(2), (4, 33), 0, 256)
    loss = jax.jit(lambda p: step_lib.cross_entropy(model.apply(p, tokens[:, :-1]), tokens[:, 1:]))
    return lambda params: float(loss(params))


def test_embedding_and_readout_flags_quantize_exactly_those_matrices():
    w4, emb, out = {"quant.weights": "int4"}, {"quant.embeddings": True}, {"quant.readout": True}
    params = transformer.ModelDef(tiny_config()).init(0)
    plain = _initial_loss_fn(w4)
    with_table, with_readout = _initial_loss_fn({**w4, **emb})(params), _initial_loss_fn({**w4, **out})(params)
    # the flag on == the same model with that matrix already quantized the way the flag does it
    table = formats.fake_quant(params["embed"], "int4", "per_channel", axis=(1,))  # one scale per token row
    unembed = formats.fake_quant(params["unembed"], "int4", "per_channel", axis=(0,))  # per output column
    assert with_table == pytest.approx(plain({**params, "embed": table}), abs=1e-6)
    assert with_readout == pytest.approx(plain({**params, "unembed": unembed}), abs=1e-6)
    assert abs(with_table - plain(params)) > 1e-4 and abs(with_readout - plain(params)) > 1e-4
    assert _initial_loss_fn({**emb, **out})(params) == _initial_loss_fn({})(params)  # no format: flags do nothing


def test_bad_format_on_the_command_line_is_one_line_and_exit_2(tmp_path):
    workdir = tmp_path / "run"
    cmd = [sys.executable, "-m", "maxscale.train", "--config=configs/tiny.py", "--config.quant.weights=int1"]
    out = subprocess.run(cmd + [f"--workdir={workdir}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "quant.weights='int1' is not supported" in out.stderr and not workdir.exists()


# ----------------------------------------------------------------------------------------------- error metrics


@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
def test_weight_errors_equal_an_independent_per_matrix_computation_in_every_moe_layout(dispatch):
    """quant/weights_rel_err of an MoE model with a dense first block, dense blocks between MoE blocks (every=2)
    and a shared expert is the mean, over every layer's hidden and expert matrix, of ||w - q(w)|| / ||w|| with
    q per output channel over the matrix's fan-in axes: computed here from the params alone."""
    moe = {"model.moe.num_experts": 4, "model.moe.num_active": 2, "model.moe.expert_ffn_size": 16}
    layout = {"model.depth": 5, "model.moe.first_dense": 1, "model.moe.every": 2, "model.moe.num_shared": 1}
    cfg = tiny_config(**moe, **layout, **{"model.moe.dispatch": dispatch, "quant.weights": "int4"})
    model = transformer.ModelDef(cfg, qat.context(cfg))
    params = model.init(0)
    tokens = jax.random.randint(jax.random.key(3), (2, 16), 0, 256)
    got = metrics.quant_errors_fn(model)(params, tokens)
    assert set(got) == {"quant/weights_rel_err"}
    errs = []
    for stack in ("blocks", "interleaved", "moe_blocks"):
        for name, w in params[stack].items():
            spec = model.specs[f"{stack}/{name}"]
            if spec.role not in ("hidden", "expert_in", "expert_out"):
                continue
            axes = tuple(spec.axes[1:].index(a) for a in spec.fan_in)  # the layer's slice: `layers` dropped
            for layer in np.asarray(w):
                q = formats.fake_quant(jnp.asarray(layer), "int4", "per_channel", axis=axes)
                errs.append(float(formats.relative_rms_error(layer, q)))
    assert len(errs) == 3 * 7 + 2 * (4 + 3 + 3)  # dense blocks: 7 matrices; MoE: attention, experts, shared
    assert float(got["quant/weights_rel_err"]) == pytest.approx(np.mean(errs), rel=1e-5)


def test_quant_errors_are_zero_at_16_bits_and_grow_as_bits_fall():
    tokens = jax.random.randint(jax.random.key(4), (2, 32), 0, 256)
    params = transformer.ModelDef(tiny_config(**ONE_LAYER)).init(0)
    errors = {}
    for bits in (16, 8, 4):
        fmt = {f"quant.{k}": f"int{bits}" for k in ("weights", "activations", "kv")}
        cfg = tiny_config(**ONE_LAYER, **fmt, **{"quant.whole_attention": True})
        model = transformer.ModelDef(cfg, qat.context(cfg))
        errors[bits] = {k: float(v) for k, v in metrics.quant_errors_fn(model)(params, tokens).items()}
    kinds = {f"quant/{k}_rel_err" for k in metrics.KINDS}
    assert set(errors[16]) == kinds
    for kind in kinds:
        assert errors[16][kind] < 1e-4 < errors[8][kind] < errors[4][kind] < 0.5, (kind, errors)
    assert metrics.quant_errors(transformer.ModelDef(tiny_config(**ONE_LAYER)), params, tokens) == {}
    w4 = tiny_config(**ONE_LAYER, **{"quant.weights": "int4"})
    only_w = metrics.quant_errors_fn(transformer.ModelDef(w4, qat.context(w4)))(params, tokens)
    assert set(only_w) == {"quant/weights_rel_err"}
    assert only_w["quant/weights_rel_err"] == pytest.approx(errors[4]["quant/weights_rel_err"], rel=1e-5)


def test_logged_steps_carry_the_quantization_error_per_kind(tmp_path, tiny_corpus):
    cfg = tiny_config(
        **{
            "train.steps": 4,
            "train.log_every": 2,
            "train.eval_steps": 0,
            "train.sample_tokens": 0,
            "quant.weights": "int4",
            "quant.activations": "int8",
            "quant.kv": "int4",
        }
    )
    loop.Trainer(cfg, str(tmp_path), mesh=one_device_mesh(cfg), corpus=tiny_corpus).run()
    logged = [r for r in metrics_lib.read_metrics(tmp_path) if "train/loss" in r]
    errs = {k: logged[-1][k] for k in ("quant/weights_rel_err", "quant/activations_rel_err", "quant/kv_rel_err")}
    assert 0.02 < errs["quant/weights_rel_err"] < 0.3 and errs["quant/activations_rel_err"] < errs["quant/kv_rel_err"]
