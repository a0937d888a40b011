"""Fake quantization in float32: symmetric-absmax integers and ExMy floats, with a straight-through gradient.

Formats are written `none`, `int<b>` (2 <= b <= 16) or `e<x>m<y>` (1 sign bit, 1 <= x <= 7 exponent bits, y >= 0
mantissa bits, 3 <= 1+x+y <= 16). Every quantizer computes in float32 and returns x's dtype; the forward value is
the quantized value and the gradient w.r.t. x is the identity (scales get no gradient), as in Kumar et al.

Integers (Kumar et al. appendix D): Q_p = 2^(b-1) - 1, Q_n = -2^(b-1), step = absmax / Q_p,
x_hat = step * clamp(round(x / step), Q_n, Q_p) with round-half-to-even. `bits` may be a traced int32 scalar, so one
compiled step serves a whole bit-width sweep. Optional: asymmetric (min/max with a zero point, 2^b levels, the range
always includes 0) and stochastic rounding. With a Python-constant width XLA rewrites amax / Q_p as amax * (1 / Q_p)
(the reciprocal rounded to float32), which can differ from the true quotient in the last ulp; `match_constant=True`
computes that product with a traced width, so a traced width gives the constant width's result bit for bit (the
members of a vectorized run, train/vectorized.py, equal their runs alone). Likewise for floats' amax / format_max.

Floats: IEEE-like, bias 2^(x-1) - 1, subnormals, round-half-to-even, saturation at the largest finite value (finite
inputs never give inf/NaN; NaN stays NaN). The emulation is exact in float32 because x <= 7 keeps every value of
every format (down to the smallest subnormal, 2^-70 for e7m8) in float32's normal range: XLA on CPU flushes float32
subnormals to zero, so e8 formats (bfloat16-like) could not be emulated exactly and are refused. The only thing a
format's convention changes is its largest finite value, `format_max` (the rounding grid is the same):
  - "fn" (no inf/NaN, every exponent code finite): max = 2^(bias+1) (2 - 2^-y).
  - "fn-nan" (OCP e4m3fn: top exponent finite except mantissa all ones = NaN): max = 2^(bias+1) (2 - 2^(1-y)).
  - "ieee" (top exponent code reserved for inf/NaN): max = 2^bias (2 - 2^-y).
Rule: e4m3 is fn-nan and e5m2, e3m4 are ieee (their ml_dtypes twins float8_e4m3fn, float8_e5m2, float8_e3m4);
every other format of <= 8 bits, and every e1 format, is fn; other formats of >= 9 bits are ieee. The fn default
matches ml_dtypes' float4_e2m1fn, float6_e2m3fn, float6_e3m2fn and the OCP MX sub-byte formats (tiny formats spend
no codes on inf/NaN; the paper's E2M0..E4M2 live there); the ieee default for >= 9 bits matches float16 (e5m10).
`TWINS` lists the twins; tests compare against all of them bit for bit.
Float formats are applied after a per-group scale that maps the group's absmax to `format_max` (the usual fp8
practice); `scaled=False` is the raw saturating cast. Exponent and mantissa bits may be traced int32 scalars.

Granularity (`axis` = the contracted axis or axes of the matmul the tensor feeds; `contracted_axes` reads them off
an einsum equation): per_tensor (one scale), per_channel and per_token (one scale per index of the axes NOT in
`axis`: for a weight that is the output channel, for an activation the token; the two names are the same
reduction), per_block (MX-style groups of `block` consecutive values along the last contracted axis; a ragged last
block is padded by repeating the edge value, which changes no group's absmax/min/max, and the padding is dropped).
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from maxscale.model.context import relative_rms_error  # noqa: F401 - one definition, re-exported
from maxscale.quant.spec import (  # noqa: F401 - the names and their parsing live in the config layer (no JAX)
    MAX_EXP_BITS,
    Format,
    float_format,
    int_format,
    parse_format,
)

GRANULARITIES = ("per_tensor", "per_channel", "per_token", "per_block")

IEEE, FN, FN_NAN = 0, 1, 2
CONVENTION_NAMES = {IEEE: "ieee", FN: "fn", FN_NAN: "fn-nan"}
# Formats whose convention differs from the default rule (<= 8 bits or e1: fn; otherwise ieee).
_EXCEPTIONS = {(4, 3): FN_NAN, (5, 2): IEEE, (3, 4): IEEE}
# Format name -> the numpy / ml_dtypes dtype it must match bit for bit when unscaled.
TWINS = {
    "e4m3": "float8_e4m3fn",
    "e5m2": "float8_e5m2",
    "e3m4": "float8_e3m4",
    "e2m1": "float4_e2m1fn",
    "e2m3": "float6_e2m3fn",
    "e3m2": "float6_e3m2fn",
    "e5m10": "float16",
}


def _as_format(fmt: Format | str | None) -> Format | None:
    return parse_format(fmt) if fmt is None or isinstance(fmt, str) else fmt


# ----------------------------------------------------------------------------------------------- float emulation


def _convention(exp_bits, man_bits):
    """The convention code (IEEE / FN / FN_NAN) as an int32 array; works for Python ints and traced scalars."""
    e, m = jnp.asarray(exp_bits, jnp.int32), jnp.asarray(man_bits, jnp.int32)
    code = jnp.where((1 + e + m >= 9) & (e >= 2), IEEE, FN)
    for (te, tm), c in _EXCEPTIONS.items():
        code = jnp.where((e == te) & (m == tm), c, code)
    return code


def _float_params(exp_bits, man_bits):
    """(emin, max): the smallest normal exponent (int32) and the largest finite value (float32), exact."""
    e, m = jnp.asarray(exp_bits, jnp.int32), jnp.asarray(man_bits, jnp.int32)
    bias = jnp.left_shift(jnp.int32(1), e - 1) - 1
    code = _convention(e, m)
    emax = bias + (code != IEEE).astype(jnp.int32)
    top = 2.0 - jnp.ldexp(jnp.float32(1.0), jnp.where(code == FN_NAN, 1 - m, -m))  # largest significand, exact
    return 1 - bias, jnp.ldexp(top, emax)


def format_max(fmt: Format | str) -> float:
    """Largest finite value of a float format (448 for e4m3); for int<b> the largest level Q_p = 2^(b-1) - 1."""
    fmt = _as_format(fmt)
    if fmt.kind == "int":
        return float(2 ** (fmt.bits - 1) - 1)
    return float(_float_params(fmt.exp_bits, fmt.man_bits)[1])


def format_convention(fmt: Format | str) -> str:
    """The convention of a float format: "ieee", "fn" or "fn-nan" (see the module docstring)."""
    fmt = _as_format(fmt)
    return CONVENTION_NAMES[int(_convention(fmt.exp_bits, fmt.man_bits))]


def _float_round(x_f32, exp_bits, man_bits):
    """Round float32 values to the format's grid (nearest, ties to even), saturating at +-max. Elementwise."""
    emin, fmax = _float_params(exp_bits, man_bits)
    ax = jnp.minimum(jnp.abs(x_f32), fmax)  # max is a grid point, so rounding a clipped value never exceeds it
    _, ex = jnp.frexp(ax)  # ax = f 2^ex with f in [0.5, 1): the binade exponent is ex - 1
    k = jnp.maximum(ex - 1, emin) - jnp.asarray(man_bits, jnp.int32)  # log2 of the spacing; emin floor = subnormals
    r = jnp.ldexp(jnp.round(jnp.ldexp(ax, -k)), k)  # scaling by powers of two is exact; jnp.round is half-to-even
    return jnp.where(jnp.isnan(x_f32), x_f32, jnp.copysign(r, x_f32))


# ------------------------------------------------------------------------------------------------------ grouping


def _normalize_axes(ndim: int, axis: int | Sequence[int]) -> tuple[int, ...]:
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(f"axis {a} is out of range for a tensor of rank {ndim}")
    return tuple(sorted({a % ndim for a in axes}))


def _grouped_view(x, granularity: str, axis, block: int) -> tuple[jax.Array, tuple[int, ...], Callable]:
    """(view, reduce_axes, unview): each group is one slice of `view` over `reduce_axes`; unview(view) -> x's shape."""
    if granularity == "per_tensor":
        return x, tuple(range(x.ndim)), lambda y: y
    axes = _normalize_axes(x.ndim, axis)
    if granularity in ("per_channel", "per_token"):
        return x, axes, lambda y: y
    if granularity != "per_block":
        raise ValueError(f"granularity {granularity!r} is not one of {', '.join(GRANULARITIES)}")
    if block < 1:
        raise ValueError(f"block={block} must be >= 1")
    a = axes[-1]
    n = x.shape[a]
    nb = -(-n // block)
    padded = x
    if nb * block != n:  # edge padding repeats a real value, so no group's absmax/min/max changes
        padded = jnp.pad(x, [(0, 0)] * a + [(0, nb * block - n)] + [(0, 0)] * (x.ndim - a - 1), mode="edge")
    view = padded.reshape(x.shape[:a] + (nb, block) + x.shape[a + 1 :])
    return view, (a + 1,), lambda y: jax.lax.slice_in_dim(y.reshape(padded.shape), 0, n, axis=a)


def group_absmax(x, granularity: str = "per_tensor", axis: int | Sequence[int] = -1, block: int = 32) -> jax.Array:
    """max|x| per group, float32. Shape: x's with reduced axes kept as 1, except per_block, where the blocked
    axis has size ceil(n / block) (one entry per block). Its size is the number of scales."""
    view, red, _ = _grouped_view(jnp.asarray(x, jnp.float32), granularity, axis, block)
    amax = jnp.max(jnp.abs(view), axis=red, keepdims=True)
    return amax.squeeze(red) if granularity == "per_block" else amax


# ---------------------------------------------------------------------------------------------- the quantizers


@jax.custom_jvp
def _straight_through(x, q):
    return q


@_straight_through.defjvp
def _straight_through_jvp(primals, tangents):
    # Forward value is q exactly (x + stop_gradient(q - x) would round and break bit-exactness); d/dx is identity.
    return primals[1], tangents[0]


def _int_levels(bits):
    q_p = (jnp.left_shift(jnp.int32(1), jnp.asarray(bits, jnp.int32) - 1) - 1).astype(jnp.float32)
    return -q_p - 1.0, q_p


def _round(v, stochastic: bool, key):
    if not stochastic:
        return jnp.round(v)
    if key is None:
        raise ValueError("stochastic rounding needs a PRNG key: pass key=jax.random.key(...)")
    return jnp.floor(v + jax.random.uniform(key, v.shape, jnp.float32))


def _over(a, q, match_constant: bool):
    """a / q; match_constant: a * (1 / q), the form XLA gives a / q when q is a compile-time constant."""
    return a * (1.0 / q) if match_constant else a / q


def _int_sym(x, amax, bits, stochastic=False, key=None, match_constant=False):
    q_n, q_p = _int_levels(bits)
    step = jnp.where(amax > 0, _over(amax, q_p, match_constant), 1.0)  # an all-zero group stays zero, not 0/0
    return jnp.clip(_round(x / step, stochastic, key), q_n, q_p) * step


def _int_asym(x, lo, hi, bits, stochastic=False, key=None, match_constant=False):
    levels = (jnp.left_shift(jnp.int32(1), jnp.asarray(bits, jnp.int32)) - 1).astype(jnp.float32)
    lo, hi = jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)  # keep 0 exactly representable
    scale = jnp.where(hi > lo, _over(hi - lo, levels, match_constant), 1.0)
    zero = jnp.round(-lo / scale)
    return (jnp.clip(_round(x / scale, stochastic, key) + zero, 0.0, levels) - zero) * scale


def _float_scaled(x, amax, exp_bits, man_bits, match_constant=False):
    fmax = _float_params(exp_bits, man_bits)[1]
    scale = jnp.where(amax > 0, _over(amax, fmax, match_constant), 1.0)
    return _float_round(x / scale, exp_bits, man_bits) * scale


def fake_quant_int(
    x,
    bits,
    granularity: str = "per_tensor",
    axis: int | Sequence[int] = -1,
    block: int = 32,
    *,
    asymmetric: bool = False,
    stochastic: bool = False,
    key=None,
    straight_through: bool = True,
    match_constant: bool = False,
):
    """Integer fake quant of x (any shape). `bits` (2..16) may be a traced int32 scalar (with match_constant: the
    result of the same Python-constant bits, bit for bit). Returns x's shape/dtype."""
    xf = jnp.asarray(x).astype(jnp.float32)
    view, red, unview = _grouped_view(xf, granularity, axis, block)
    if asymmetric:
        lo, hi = jnp.min(view, axis=red, keepdims=True), jnp.max(view, axis=red, keepdims=True)
        q = _int_asym(view, lo, hi, bits, stochastic, key, match_constant)
    else:
        amax = jnp.max(jnp.abs(view), axis=red, keepdims=True)
        q = _int_sym(view, amax, bits, stochastic, key, match_constant)
    q = jax.lax.stop_gradient(unview(q).astype(jnp.asarray(x).dtype))
    return _straight_through(x, q) if straight_through else q


def fake_quant_float(
    x,
    exp_bits,
    man_bits,
    granularity: str = "per_tensor",
    axis: int | Sequence[int] = -1,
    block: int = 32,
    *,
    scaled: bool = True,
    straight_through: bool = True,
    match_constant: bool = False,
):
    """ExMy fake quant of x (any shape). exp_bits/man_bits may be Python ints or traced int32 scalars (the
    emulation is exact either way; the caller guarantees a valid format; match_constant: the scale as with Python
    ints, bit for bit). scaled=False: raw saturating cast, no scale (granularity unused). Returns x's shape/dtype."""
    xf = jnp.asarray(x).astype(jnp.float32)
    if scaled:
        view, red, unview = _grouped_view(xf, granularity, axis, block)
        amax = jnp.max(jnp.abs(view), axis=red, keepdims=True)
        q = unview(_float_scaled(view, amax, exp_bits, man_bits, match_constant))
    else:
        q = _float_round(xf, exp_bits, man_bits)
    q = jax.lax.stop_gradient(q.astype(jnp.asarray(x).dtype))
    return _straight_through(x, q) if straight_through else q


def fake_quant(
    x,
    fmt: Format | str | None,
    granularity: str = "per_tensor",
    axis: int | Sequence[int] = -1,
    block: int = 32,
    *,
    asymmetric: bool = False,
    stochastic: bool = False,
    key=None,
    scaled: bool = True,
    straight_through: bool = True,
):
    """Fake-quantize x in format `fmt` (None / "none": x unchanged). `axis`: the contracted axis or axes of the
    matmul x feeds, e.g. `contracted_axes("btd,dhk->bthk", 1)` for the weight. asymmetric/stochastic: int only;
    scaled: float only. Forward value quantized, gradient w.r.t. x identity."""
    fmt = _as_format(fmt)
    if fmt is None:
        return x
    if fmt.kind == "int":
        return fake_quant_int(
            x,
            fmt.bits,
            granularity,
            axis,
            block,
            asymmetric=asymmetric,
            stochastic=stochastic,
            key=key,
            straight_through=straight_through,
        )
    if asymmetric or stochastic:
        raise ValueError(f"{fmt.name}: asymmetric and stochastic rounding apply to integer formats only")
    return fake_quant_float(
        x, fmt.exp_bits, fmt.man_bits, granularity, axis, block, scaled=scaled, straight_through=straight_through
    )


def quantize_with_absmax(x, fmt: Format | str, absmax):
    """Symmetric quantization of x (float32) given a precomputed absmax broadcastable to x (int: step = absmax/Q_p;
    float: scale = absmax/format_max). No gradient trick; GPTQ uses it with scales fixed before its loop."""
    fmt = _as_format(fmt)
    if fmt.kind == "int":
        return quantize_int_with_absmax(x, absmax, fmt.bits)
    return quantize_float_with_absmax(x, absmax, fmt.exp_bits, fmt.man_bits)


def quantize_int_with_absmax(x, absmax, bits):
    """`quantize_with_absmax` for int<bits>; bits may be a traced int32 scalar."""
    return _int_sym(jnp.asarray(x, jnp.float32), absmax, bits)


def quantize_float_with_absmax(x, absmax, exp_bits, man_bits):
    """`quantize_with_absmax` for e<exp_bits>m<man_bits>; both may be traced int32 scalars."""
    return _float_scaled(jnp.asarray(x, jnp.float32), absmax, exp_bits, man_bits)


# --------------------------------------------------------------------------------------------------------- helpers


def contracted_axes(eq: str, operand_index: int) -> tuple[int, ...]:
    """Axes of operand `operand_index` that an einsum `eq` sums over (its letters absent from the output).
    "btd,dhk->bthk": operand 0 -> (2,), operand 1 -> (0,). Letters after "..." are given as negative axes."""
    eq = eq.replace(" ", "")
    inputs, arrow, out = eq.partition("->")
    operands = inputs.split(",")
    if not 0 <= operand_index < len(operands):
        raise ValueError(f"einsum {eq!r} has {len(operands)} operands; operand_index={operand_index} is out of range")
    if not arrow:  # implicit output: the letters used exactly once
        letters = inputs.replace(",", "").replace(".", "")
        out = "".join(c for c in letters if letters.count(c) == 1)
    op = operands[operand_index]
    before, dots, after = op.partition("...")
    axes = [i for i, c in enumerate(before) if c not in out]
    if dots:
        axes += [j - len(after) for j, c in enumerate(after) if c not in out]
    return tuple(axes)
