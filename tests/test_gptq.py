"""GPTQ: beats round-to-nearest on correlated inputs, matches a plain NumPy port of the reference loop, reduces to
RTN for an identity Hessian, handles dead inputs, ragged blocks, act_order and stacked layers."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from maxscale.quant import formats as F
from maxscale.quant import gptq as G

N, I, O = 2048, 128, 64


def _problem(seed=0, n=N, i=I, o=O):
    """Correlated calibration inputs X = Z M (M far from identity) and a Gaussian weight w_IO."""
    rng = np.random.default_rng(seed)
    m = rng.standard_normal((i, i)) / np.sqrt(i) + 0.3 * np.eye(i)
    x_NI = (rng.standard_normal((n, i)) @ m).astype(np.float32)
    return x_NI, rng.standard_normal((i, o)).astype(np.float32)


def _output_error(x_NI, w_IO, w_hat_IO):
    """||X W - X W_hat||_F / ||X W||_F, in float64."""
    x, w, w_hat = (np.asarray(a, np.float64) for a in (x_NI, w_IO, w_hat_IO))
    return np.linalg.norm(x @ (w - w_hat)) / np.linalg.norm(x @ w)


def _reference_gptq(w_IO, h_II, bits, damp=0.01):
    """Frantar et al.'s loop without lazy batching, float64, per-channel symmetric int (Q_p = 2^(b-1) - 1)."""
    w, h = np.array(w_IO, np.float64), np.array(h_II, np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[dead] = 0.0
    q_p = 2 ** (bits - 1) - 1
    step = np.abs(w).max(0) / q_p
    h += damp * np.mean(np.diag(h)) * np.eye(len(h))
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    q_IO = np.zeros_like(w)
    for i in range(len(w)):
        q_IO[i] = np.clip(np.round(w[i] / step), -q_p - 1, q_p) * step
        err = (w[i] - q_IO[i]) / u[i, i]
        w[i:] -= np.outer(u[i, i:], err)
    return q_IO


def _code_mismatch(got_IO, want_IO, w_IO, bits=4):
    """Fraction of entries whose integer codes differ (float32 vs float64 steps differ in the last ulp)."""
    step = np.abs(np.asarray(w_IO, np.float64)).max(0) / (2 ** (bits - 1) - 1)
    return np.mean(np.round(np.asarray(got_IO, np.float64) / step) != np.round(want_IO / step))


@pytest.fixture(scope="module")
def problem():
    x_NI, w_IO = _problem()
    return x_NI, w_IO, np.asarray(G.hessian_from_inputs(x_NI))


def test_hessian_from_inputs(problem):
    x_NI, _, h = problem
    np.testing.assert_allclose(h, 2 * x_NI.T.astype(np.float64) @ x_NI / N, rtol=2e-5, atol=1e-5)
    h3 = np.asarray(G.hessian_from_inputs(x_NI.reshape(16, N // 16, I)))  # [B, T, I] flattens to N rows
    np.testing.assert_allclose(h3, h, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fmt", ["int3", "int4", "e2m1"])
def test_gptq_beats_round_to_nearest(problem, fmt):
    x_NI, w_IO, h = problem
    rtn = _output_error(x_NI, w_IO, G.rtn_quantize(w_IO, fmt))
    gptq = _output_error(x_NI, w_IO, G.gptq_quantize(w_IO, h, fmt))
    ordered = _output_error(x_NI, w_IO, G.gptq_quantize(w_IO, h, fmt, act_order=True, block_size=32))
    assert gptq < 0.9 * rtn, (gptq, rtn)
    assert ordered < 0.9 * rtn, (ordered, rtn)
    assert rtn > 0.05  # the comparison is not between two negligible errors


def test_eight_bits_is_nearly_lossless(problem):
    x_NI, w_IO, h = problem
    assert _output_error(x_NI, w_IO, G.rtn_quantize(w_IO, "int8")) < 1e-2
    assert _output_error(x_NI, w_IO, G.gptq_quantize(w_IO, h, "int8")) < 1e-2


def test_matches_reference_loop_and_blocking_is_exact(problem):
    """Lazy batches change only float32 summation order: a handful of near-tie roundings may flip, no more."""
    x_NI, w_IO, h = problem
    want = _reference_gptq(w_IO, h, bits=4)
    for block_size in (128, 16, 48):  # 48: 128 = 2 * 48 + 32, the last block is padded
        got = np.asarray(G.gptq_quantize(w_IO, h, "int4", block_size=block_size))
        assert _code_mismatch(got, want, w_IO) < 0.002
        np.testing.assert_allclose(_output_error(x_NI, w_IO, got), _output_error(x_NI, w_IO, want), rtol=0.01)
    # Integer codes: every result is a multiple of the per-channel step and within the int4 range.
    codes = got / (np.abs(w_IO).max(0) / 7)
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)
    assert codes.min() >= -8 - 1e-3 and codes.max() <= 7 + 1e-3


def test_identity_hessian_is_round_to_nearest(problem):
    """A diagonal H (uncorrelated inputs) leaves no error to feed back: GPTQ must reduce to RTN, in any order."""
    _, w_IO, _ = problem
    diag = np.diag(np.random.default_rng(3).uniform(0.5, 2.0, I)).astype(np.float32)
    cases = [
        ("int4", "per_channel", False, np.eye(I)),
        ("int4", "per_channel", True, diag),
        ("e4m3", "per_tensor", False, np.eye(I)),
        ("int3", "per_block", True, diag),
    ]
    for fmt, gran, act_order, h in cases:
        rtn = np.asarray(G.rtn_quantize(w_IO, fmt, gran, group_size=32))
        got = G.gptq_quantize(w_IO, h.astype(np.float32), fmt, gran, act_order=act_order, group_size=32)
        # rtol 1e-6: XLA may fold the step arithmetic differently in the two programs (an ulp); a different
        # rounding decision would be off by a whole step (>= 1/127 relative).
        np.testing.assert_allclose(np.asarray(got), rtn, rtol=1e-6, atol=0)
    rtn = np.asarray(G.rtn_quantize(w_IO, "int4"))
    np.testing.assert_allclose(rtn, np.asarray(F.fake_quant(w_IO, "int4", "per_channel", axis=0)), rtol=1e-6, atol=0)


def test_dtype_shape_dead_inputs_and_stacked(problem):
    x_NI, w_IO, _ = problem
    x_NI = x_NI.copy()
    x_NI[:, [3, 50]] = 0.0  # two inputs never fire
    h = np.asarray(G.hessian_from_inputs(x_NI))
    got = G.gptq_quantize(jnp.asarray(w_IO, jnp.bfloat16), h, "int4")
    assert got.shape == (I, O) and got.dtype == jnp.bfloat16
    got = np.asarray(G.gptq_quantize(w_IO, h, "int4"))
    assert got.dtype == np.float32 and np.all(np.isfinite(got))
    assert np.all(got[[3, 50]] == 0)
    assert _code_mismatch(got, _reference_gptq(w_IO, h, bits=4), w_IO) < 0.002

    x2, w2 = _problem(seed=1)
    h2 = np.asarray(G.hessian_from_inputs(x2))
    w_LIO, h_LII = np.stack([w_IO, w2]), np.stack([h, h2])
    stacked = np.asarray(G.gptq_quantize_stacked(w_LIO, h_LII, "int3", block_size=32))
    for layer in range(2):
        one = np.asarray(G.gptq_quantize(w_LIO[layer], h_LII[layer], "int3", block_size=32))
        np.testing.assert_allclose(stacked[layer], one, rtol=1e-6, atol=1e-6)
