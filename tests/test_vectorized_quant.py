"""Vectorized quantized training (train/vectorized.py, quant/qat.py): members that differ in the bit width of
quant.weights / activations / kv (one format family) train as one compiled program with the widths traced, and each
equals its run alone; pack_key keeps bit widths together and families and granularities apart; on vs off and int vs
float are refused with one line naming the field."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import one_device_mesh
from test_vectorized import STEPS, cfg_of, losses

from maxscale.errors import ConfigError
from maxscale.quant import qat
from maxscale.train import loop, vectorized

ERRS = ("quant/weights_rel_err", "quant/activations_rel_err", "quant/kv_rel_err")
# lr 2e-3 (as tests/test_qat.py): at the tiny config's 1e-2 a quantized run turns a float32 rounding difference (a
# traced LR, a batched matmul) into a flipped quantization level and 1e-5 within 20 steps, with or without traced
# widths (a pack of W4A8 members that differ only in LR does the same); at 2e-3 members stay within 2e-6.
STABLE = {"optimizer.lr": 2e-3}


def _quantize(cfg, kind, x, bits=None):
    q = qat.make_quantizer(cfg)
    q = q.with_bits(bits) if bits else q
    return q.kv(x) if kind == "kv" else getattr(q, kind)(x, "td,df->tf", "hidden")  # x as w [d, f] or as x [t, d]


def _traced(cfg, kind, bits, x):
    return _quantize(cfg, kind, x, bits)


@pytest.mark.parametrize(
    "kind, members",
    [
        ("weights", [{"quant.weights": f"int{b}"} for b in (2, 3, 4, 6, 8, 16)]),
        ("activations", [{"quant.activations": f"int{b}", "quant.asymmetric": True} for b in (3, 5, 7)]),
        ("kv", [{"quant.kv": f, "quant.kv_granularity": "per_block"} for f in ("e4m3", "e5m2", "e2m1", "e3m4")]),
    ],
)
def test_traced_widths_quantize_bit_for_bit_as_constant_widths(kind, members):
    """The quantizer with per-member traced widths (vmapped) gives each member the bits of its constant format."""
    x = jax.random.normal(jax.random.key(0), (48, 80), jnp.float32) * 3
    cfgs = [cfg_of(**m) for m in members]
    bits = qat.member_bits(cfgs)
    assert list(bits) == [kind]
    got = jax.jit(jax.vmap(functools.partial(_traced, cfgs[0], kind), in_axes=(0, None)))(bits, x)
    for i, cfg in enumerate(cfgs):
        want = jax.jit(functools.partial(_quantize, cfg, kind))(x)
        np.testing.assert_array_equal(np.asarray(got[i]), np.asarray(want), f"{kind} member {i}")


def test_members_with_different_bit_widths_equal_their_runs_alone(tmp_path, tiny_corpus):
    members = [  # weights and activations: int widths; kv: float formats (exponent and mantissa widths traced)
        {"quant.weights": "int4", "quant.activations": "int8", "quant.kv": "e4m3"},
        {"quant.weights": "int8", "quant.activations": "int6", "quant.kv": "e5m2", "optimizer.lr": 3e-3},
    ]
    cfgs = [cfg_of(**{**STABLE, **m}) for m in members]
    dirs = [str(tmp_path / f"m{i}") for i in range(len(cfgs))]
    mesh = one_device_mesh(cfgs[0])
    run = vectorized.VectorizedRun(cfgs, dirs, str(tmp_path / "pack"), mesh=mesh, corpus=tiny_corpus)
    assert {k: v.tolist() for k, v in run.qbits.items()} == {
        "weights": [[4], [8]],
        "activations": [[8], [6]],
        "kv": [[4, 3], [5, 2]],
    }
    loop.train_pack(run, log=lambda line: None)
    finals = []
    for i, cfg in enumerate(cfgs):
        assert qat.make_quantizer(cfg).traced == ()  # a single run keeps its Python-constant formats
        loop.Trainer(cfg, str(tmp_path / f"alone{i}"), mesh=one_device_mesh(cfg), corpus=tiny_corpus).run()
        a, v = losses(tmp_path / f"alone{i}"), losses(dirs[i])
        assert sorted(a) == sorted(v) == list(range(1, STEPS + 1)), i
        np.testing.assert_allclose([v[s] for s in a], [a[s] for s in a], rtol=1e-5, err_msg=str(i))
        ev_a, ev_v = losses(tmp_path / f"alone{i}", "eval/loss"), losses(dirs[i], "eval/loss")
        np.testing.assert_allclose(ev_v[STEPS], ev_a[STEPS], rtol=1e-5)
        for key in ERRS:  # the quantization errors a single run logs (a diagnostic: a flipped level moves it 1e-4)
            a, v = losses(tmp_path / f"alone{i}", key), losses(dirs[i], key)
            assert sorted(a) == sorted(v) and a, key
            np.testing.assert_allclose([v[s] for s in a], [a[s] for s in a], rtol=2e-3, err_msg=f"{i} {key}")
        finals.append(losses(dirs[i], "quant/weights_rel_err")[STEPS])
    assert finals[0] > 4 * finals[1]  # int4 vs int8 weights: each member really ran at its own width


def test_pack_key_keeps_bit_widths_together_and_families_apart():
    key = lambda **kw: vectorized.pack_key(cfg_of(**kw))  # noqa: E731
    w = "quant.weights"
    assert key(**{w: "int3"}) == key(**{w: "int4"}) == key(**{w: "int8"})
    assert key(**{w: "e4m3"}) == key(**{w: "e5m2"}) == key(**{w: "e2m1"})
    a, kv = "quant.activations", "quant.kv"
    assert key(**{a: "int4", kv: "e4m3"}) == key(**{a: "int6", kv: "e3m4"})
    assert len({key(), key(**{w: "int4"}), key(**{w: "e4m3"})}) == 3  # off, int, float
    assert key(**{w: "int4"}) != key(**{w: "int4", "quant.weights_granularity": "per_tensor"})
    assert key(**{w: "int4"}) != key(**{w: "int8", "quant.asymmetric": True})
    assert key(**{w: "int4"}) != key(**{"quant.activations": "int4"})
    runs = [{"config": cfg_of(**{w: b})} for b in ("int3", "none", "int8", "e4m3", "int4", "e5m2")]
    groups = vectorized.packs(runs, 8, log=lambda line: None)
    assert [[r["config"].quant.weights for r in g] for g in groups] == [
        ["int3", "int8", "int4"],
        ["none"],
        ["e4m3", "e5m2"],
    ]
    vectorized.check_members([cfg_of(**{w: b}) for b in ("int3", "int8")])  # no error


@pytest.mark.parametrize(
    "field, a, b, why",
    [
        ("quant.weights", "none", "int4", "on vs off"),
        ("quant.activations", "int8", "none", "on vs off"),
        ("quant.kv", "int4", "e4m3", "an integer vs a float format"),
    ],
)
def test_refusals_name_the_field(field, a, b, why):
    with pytest.raises(ConfigError, match=f"member 1 differs from member 0 in {field} \\({a} vs {b}\\): quantiz") as e:
        vectorized.check_members([cfg_of(**{field: a}), cfg_of(**{field: b})])
    assert "\n" not in str(e.value) and why in str(e.value)


def test_granularity_may_not_differ():
    w4 = {"quant.weights": "int4"}
    with pytest.raises(ConfigError, match="quant.weights_granularity .*not vectorizable"):
        vectorized.check_members([cfg_of(**w4), cfg_of(**w4, **{"quant.weights_granularity": "per_tensor"})])
