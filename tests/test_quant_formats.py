"""Fake quantization: the float emulator against ml_dtypes bit for bit, integer levels, STE, traced bits,
granularities, format parsing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from maxscale.errors import ConfigError
from maxscale.quant import formats as F


def _twin_dtype(name):
    return np.dtype(getattr(ml_dtypes, name, None) or name)


def _grid(dt):
    """Every finite value of a <= 16-bit dtype, sorted, without duplicates (+-0 collapse)."""
    nbits = 8 * dt.itemsize if dt.itemsize > 1 else {"float4": 4, "float6": 6}.get(dt.name[:6], 8)
    codes = np.arange(2**nbits, dtype=np.uint16 if dt.itemsize == 2 else np.uint8)
    vals = codes.view(dt).astype(np.float32)
    return np.unique(vals[np.isfinite(vals)])


_raw = jax.jit(F.fake_quant_float, static_argnames=("exp_bits", "man_bits", "scaled"))
# Jitted once per configuration: eager mode would compile each of the many small ops separately (slow on 2 cores).
_fq = jax.jit(
    F.fake_quant,
    static_argnames=("fmt", "granularity", "axis", "block", "asymmetric", "stochastic", "scaled", "straight_through"),
)
_absmax = jax.jit(F.group_absmax, static_argnames=("granularity", "axis", "block"))


def fq(x, fmt, granularity="per_tensor", axis=-1, block=32, **kw):
    return _fq(x, fmt, granularity, axis if isinstance(axis, int) else tuple(axis), block, **kw)


def absmax(x, granularity="per_tensor", axis=-1, block=32):
    return _absmax(x, granularity, axis if isinstance(axis, int) else tuple(axis), block)


@pytest.mark.parametrize("name", sorted(F.TWINS))
def test_unscaled_float_matches_ml_dtypes_bit_for_bit(name):
    """Ml_dtypes gives inf/NaN past max for some formats (and fn formats wrap differently), so the reference is
    np.clip(x, -max, max).astype(dtype): saturation is what the emulator promises."""
    dt = _twin_dtype(F.TWINS[name])
    fmt = F.parse_format(name)
    fmax = F.format_max(fmt)
    assert fmax == float(ml_dtypes.finfo(dt).max)
    grid = _grid(dt)
    tiny = float(grid[grid > 0].min())  # the smallest subnormal
    rng = np.random.default_rng(0)
    mags = np.exp(rng.uniform(np.log(tiny / 8), np.log(fmax * 8), 10_000))
    ties = (grid[1:] + grid[:-1]) / 2  # exact midpoints: round-half-to-even decides them
    x = np.concatenate(
        [
            rng.choice([-1.0, 1.0], mags.size) * mags,
            grid,
            ties,
            np.nextafter(ties, np.inf),
            np.nextafter(ties, -np.inf),
            [0.0, -0.0, fmax, -fmax, fmax * 1.01, -1e30, 1e30, np.inf, -np.inf],
        ]
    ).astype(np.float32)
    want = np.clip(x, -fmax, fmax).astype(dt).astype(np.float32)
    got = np.asarray(_raw(jnp.asarray(x), exp_bits=fmt.exp_bits, man_bits=fmt.man_bits, scaled=False))
    bad = want.view(np.uint32) != got.view(np.uint32)
    assert not bad.any(), f"{name}: {bad.sum()} mismatches, e.g. x={x[bad][:3]} want={want[bad][:3]} got={got[bad][:3]}"
    assert np.signbit(got[x.size - 8]) and not np.signbit(got[x.size - 9])  # -0 stays -0, +0 stays +0
    assert np.all(np.isfinite(got))
    assert np.isnan(np.asarray(fq(np.float32(np.nan), fmt, scaled=False)))


def test_formats_without_twin_follow_the_rule():
    """The paper's E2M0 / E3M0 (fn: all exponent codes finite, no subnormals beyond 0 with m0) and a >= 9-bit one."""

    def values(fmt, hi):
        return np.unique(np.abs(np.asarray(fq(np.linspace(-hi, hi, 20_001, dtype=np.float32), fmt, scaled=False))))

    np.testing.assert_array_equal(values("e2m0", 10), [0, 1, 2, 4])
    np.testing.assert_array_equal(values("e3m0", 40), [0, 0.25, 0.5, 1, 2, 4, 8, 16])
    np.testing.assert_array_equal(values("e2m1", 10), [0, 0.5, 1, 1.5, 2, 3, 4, 6])
    assert F.format_max("e4m1") == 384.0 and F.format_convention("e4m1") == "fn"  # 2^8 * 1.5
    assert F.format_max("e4m2") == 448.0 and F.format_max("e3m0") == 16.0
    assert F.format_max("e5m6") == 2.0**15 * (2 - 2**-6) and F.format_convention("e5m6") == "ieee"
    assert F.format_convention("e4m3") == "fn-nan" and F.format_convention("e5m2") == "ieee"


def _normal(seed, shape):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_scaled_float_maps_absmax_to_format_max():
    x = _normal(0, (16, 64)) * np.float32(1e-3)
    q = np.asarray(fq(x, "e4m3", "per_token"))
    np.testing.assert_allclose(np.abs(q).max(axis=1), np.abs(x).max(axis=1), rtol=1e-6)
    assert float(F.relative_rms_error(x, q)) < 0.04  # 3 mantissa bits: ~2^-4 relative spacing
    assert float(F.relative_rms_error(x, fq(x, "e4m3", scaled=False))) > 0.5  # unscaled: mostly 0


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_int_levels_and_straight_through_gradient(bits):
    x, c = _normal(bits, (64, 96)), _normal(99, (64, 96))
    levels = np.unique(np.asarray(fq(x, f"int{bits}", "per_tensor")))
    assert len(levels) <= 2**bits
    assert len(levels) >= min(2**bits - 2, 200)  # all levels but Q_n (and maybe -Q_p) occur
    step = np.abs(x).max() / (2 ** (bits - 1) - 1)
    np.testing.assert_allclose(levels / step, np.round(levels / step), atol=1e-4)  # multiples of absmax / Q_p
    grad = jax.grad(lambda x: jnp.sum(fq(x, f"int{bits}", "per_channel", axis=0) * c))(x)
    np.testing.assert_array_equal(np.asarray(grad), c)
    grad = jax.grad(lambda x: jnp.sum(fq(x, "e2m1", "per_block", axis=1) * c))(x)
    np.testing.assert_array_equal(np.asarray(grad), c)


def test_traced_bits_compile_once_and_match_static_bits():
    traces = []

    @jax.jit
    def quant(x, bits, e, m):
        traces.append(1)  # runs only while tracing
        return F.fake_quant_int(x, bits, "per_channel", axis=0), F.fake_quant_float(x, e, m, "per_token")

    # XLA simplifies x / (amax / Q_p) differently once Q_p is a constant, so traced and constant bits may differ
    # in the last ulp of the dequantized value; the integer codes must agree exactly.
    x = _normal(1, (128, 32))
    for bits in range(3, 9):
        got, _ = quant(x, np.int32(bits), np.int32(4), np.int32(3))
        want = fq(x, f"int{bits}", "per_channel", axis=0)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)
        step = np.abs(x).max(0) / (2 ** (bits - 1) - 1)
        np.testing.assert_array_equal(np.round(np.asarray(got) / step), np.round(np.asarray(want) / step))
        assert np.abs(np.round(np.asarray(got) / step)).max() == 2 ** (bits - 1) - 1  # the bits really changed
    for e, m in [(2, 0), (3, 0), (4, 1), (3, 2), (4, 2), (5, 2), (4, 3), (5, 6)]:
        _, got = quant(x, np.int32(4), np.int32(e), np.int32(m))
        np.testing.assert_allclose(np.asarray(got), np.asarray(fq(x, f"e{e}m{m}", "per_token")), rtol=1e-6)
    assert len(traces) == 1


def test_int_error_falls_with_bits_and_zero_groups_stay_zero():
    x = _normal(2, (256, 128))
    errs = [float(F.relative_rms_error(x, fq(x, f"int{b}", "per_channel", axis=0))) for b in range(3, 9)]
    assert all(b < 0.6 * a for a, b in zip(errs, errs[1:])), errs  # each bit roughly halves the error
    z = np.zeros((8, 4), np.float32)
    z[:, 1] = np.arange(8)
    for fmt in ("int4", "e4m3", "e2m0"):
        q = np.asarray(fq(z, fmt, "per_channel", axis=0))
        assert np.all(np.isfinite(q)) and np.all(q[:, [0, 2, 3]] == 0)
    np.testing.assert_array_equal(np.asarray(fq(np.zeros(5, np.float32), "int3", asymmetric=True)), 0)


def test_granularity_scale_counts():
    x = _normal(3, (64, 128))
    assert absmax(x, "per_tensor").size == 1
    assert absmax(x, "per_channel", axis=0).shape == (1, 128)
    assert absmax(x, "per_block", axis=1, block=32).shape == (64, 4)
    assert len(np.unique(np.asarray(absmax(x, "per_block", axis=1, block=32)))) == 64 * 4
    assert len(np.unique(np.asarray(absmax(_normal(4, (4, 16, 32)), "per_token")))) == 64
    axes = F.contracted_axes("btd,dhk->bthk", 1)
    assert axes == (0,) and F.contracted_axes("btd,dhk->bthk", 0) == (2,)
    assert absmax(_normal(5, (32, 4, 8)), "per_channel", axis=axes).shape == (1, 4, 8)
    assert F.contracted_axes("bthk,hkd->btd", 1) == (0, 1) and F.contracted_axes("...hk,hkd", 0) == (-2, -1)
    assert F.contracted_axes("bthk,bshk->bhts", 1) == (3,) and F.contracted_axes("ij,jk", 0) == (1,)
    # Each per_block group is quantized on its own: block 0 of the result depends only on block 0 of x.
    q = np.asarray(fq(x, "int4", "per_block", axis=1, block=32))
    np.testing.assert_array_equal(q[:, :32], np.asarray(fq(x[:, :32], "int4", "per_token")))
    # A ragged last block (40 = 32 + 8) is edge-padded: its scale is the max of its 8 real values.
    r = x[:, :40]
    np.testing.assert_array_equal(
        np.asarray(absmax(r, "per_block", axis=1, block=32))[:, 1], np.abs(r[:, 32:]).max(axis=1)
    )
    assert fq(r, "int4", "per_block", axis=1, block=32).shape == (64, 40)


def test_asymmetric_and_stochastic_int():
    u = np.random.default_rng(6).uniform(size=4096).astype(np.float32)  # all positive: symmetric wastes half
    sym = float(F.relative_rms_error(u, fq(u, "int4")))
    asym_q = fq(u, "int4", asymmetric=True)
    assert len(np.unique(np.asarray(asym_q))) <= 16
    assert float(F.relative_rms_error(u, asym_q)) < 0.6 * sym
    x = _normal(7, (256,))
    sample = jax.jit(jax.vmap(lambda k: F.fake_quant(x, "int3", stochastic=True, key=k)))
    qs = np.asarray(sample(jax.random.split(jax.random.key(8), 2000)))
    step = np.abs(x).max() / 3
    assert np.abs(qs.mean(0) - x).max() / step < 0.08  # unbiased; round-to-nearest is off by up to 0.5 step
    assert np.abs(np.asarray(fq(x, "int3")) - x).max() / step > 0.4
    with pytest.raises(ValueError, match="key"):
        fq(x, "int3", stochastic=True)


def test_parse_format():
    good = ["int2", "int8", "int16", "e2m0", "e3m0", "e2m1", "e4m1", "e3m2", "e4m2", "e4m3", "e5m2", "e5m6", "e3m4"]
    for s in good + ["e7m8", "e1m1"]:
        fmt = F.parse_format(s)
        assert fmt.name == s and F.parse_format(fmt.name) == fmt
    assert F.parse_format("none") is None and F.parse_format(None) is None
    assert F.parse_format("INT8").bits == 8 and F.parse_format("e4m3").kind == "float"
    for s in ["int1", "int17", "e0m3", "fp8", "e9m9", "e1m0", "e8m7", "e4m12", "int", "", "e4m3 x"]:
        with pytest.raises(ConfigError) as info:
            F.parse_format(s, field="quant.weights")
        msg = str(info.value)
        assert "\n" not in msg and msg.startswith(f"quant.weights={s!r}") and "int<b>" in msg and "e<x>m<y>" in msg
    with pytest.raises(ConfigError, match="^quant format 'int1' is not supported"):
        F.parse_format("int1")
    np.testing.assert_array_equal(F.fake_quant(np.arange(3.0), "none"), np.arange(3.0))
