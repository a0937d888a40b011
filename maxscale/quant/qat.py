"""Quantized training: the quantizer the model's matmul entry point calls (maxscale/model/layers.py, `Quantizer`).

Fake quantization in the forward pass with a straight-through gradient (Kumar et al., "Scaling Laws for
Precision"): weights (P_w) and matmul inputs (P_a) of every hidden and expert matrix, optionally the embedding table,
the readout and the router; attention keys and values (P_kv), and with `quant.whole_attention` also the queries and
the attention probabilities. Scales follow each kind's granularity: per_channel shares a scale over the contracted
axes of the einsum (one per output feature of a weight), per_token one per row of an activation.

Vectorized runs (train/vectorized.py) may pack members that differ in the bit width of a kind (int3 vs int8, or
e4m3 vs e5m2: the same family). `member_bits(cfgs)` checks the pack and returns the differing widths as per-member
int32 arrays; a member's row reaches the quantizer through `FakeQuantizer.with_bits` (the model's
`Context.with_bits`, called by the update with the member's `qbits`), which then quantizes that kind with traced
widths (formats.py's quantizers take int32 scalars: one compilation for every member). Without it, and for kinds
whose format is the same in every member, the Python-constant format is used as in a single run, so single runs are
unchanged bit for bit.
"""

from __future__ import annotations

import dataclasses

import jax
import ml_collections
import numpy as np

from maxscale.errors import ConfigError
from maxscale.model import transformer
from maxscale.model.context import Context
from maxscale.quant.formats import Format, contracted_axes, fake_quant, fake_quant_float, fake_quant_int, parse_format

ALWAYS = ("hidden", "expert_in", "expert_out")  # quantized whenever a format is set
OPTIONAL = {"embedding": "embeddings", "readout": "readout", "router": "router"}  # role -> quant.<field>
KINDS = ("weights", "activations", "kv")


@dataclasses.dataclass(frozen=True)
class FakeQuantizer:
    weights_fmt: Format | None
    activations_fmt: Format | None
    kv_fmt: Format | None
    weights_granularity: str = "per_channel"
    activations_granularity: str = "per_tensor"
    kv_granularity: str = "per_token"
    block: int = 32
    roles: frozenset = frozenset(ALWAYS)
    whole_attention: bool = False
    asymmetric: bool = False
    traced: tuple = ()  # ((kind, int32 [1] bits or [2] exp/man bits), ...): widths that replace the formats' own

    @property
    def quantizes_kv(self) -> bool:
        return self.kv_fmt is not None

    def _q(self, x, kind, granularity, axis):
        fmt = getattr(self, f"{kind}_fmt")
        if fmt is None:
            return x
        asym = self.asymmetric and fmt.kind == "int"
        widths = dict(self.traced).get(kind)
        if widths is None:  # a Python-constant format: what a single run does
            return fake_quant(x, fmt, granularity, axis, self.block, asymmetric=asym)
        if fmt.kind == "int":  # match_constant: the bits of a single run at this member's constant width
            return fake_quant_int(x, widths[0], granularity, axis, self.block, asymmetric=asym, match_constant=True)
        return fake_quant_float(x, widths[0], widths[1], granularity, axis, self.block, match_constant=True)

    def weights(self, w: jax.Array, eq: str, role: str) -> jax.Array:
        if role not in self.roles:
            return w
        return self._q(w, "weights", self.weights_granularity, contracted_axes(eq, 1))

    def activations(self, x: jax.Array, eq: str, role: str) -> jax.Array:
        if role not in self.roles:
            return x
        return self._q(x, "activations", self.activations_granularity, contracted_axes(eq, 0))

    def kv(self, x_BTGK: jax.Array) -> jax.Array:
        return self._q(x_BTGK, "kv", self.kv_granularity, -1)

    def probs(self, p: jax.Array) -> jax.Array:
        """Attention probabilities [..., T, S] at the kv format, one scale per query row (per_token)."""
        return self._q(p, "kv", "per_token" if self.kv_granularity != "per_tensor" else "per_tensor", -1)

    def with_bits(self, qbits: dict) -> "FakeQuantizer":
        """This quantizer with the widths of the kinds in `qbits` ({kind: int32 [1] bits or [2] exponent, mantissa
        bits}: one member's row of `member_bits`) traced; kinds it does not quantize are ignored."""
        traced = tuple((k, w) for k, w in qbits.items() if getattr(self, f"{k}_fmt") is not None)
        return dataclasses.replace(self, traced=traced)

    def table(self, table_VD: jax.Array) -> jax.Array:
        """The embedding table before the lookup: one scale per token row (per_channel over the width)."""
        if "embedding" not in self.roles:
            return table_VD
        return self._q(table_VD, "weights", self.weights_granularity, (1,))


def make_quantizer(cfg: ml_collections.ConfigDict) -> FakeQuantizer | None:
    """The quantizer for a resolved config, or None when nothing is quantized (the model then runs unchanged)."""
    q = cfg.quant
    fmts = {kind: parse_format(q[kind], field=f"quant.{kind}") for kind in KINDS}
    if all(f is None for f in fmts.values()):
        return None
    if q.stochastic:
        raise ConfigError("quant.stochastic=true is not supported in training yet; use round to nearest (false)")
    roles = frozenset(ALWAYS) | {role for role, field in OPTIONAL.items() if q[field]}
    return FakeQuantizer(
        weights_fmt=fmts["weights"],
        activations_fmt=fmts["activations"],
        kv_fmt=fmts["kv"],
        weights_granularity=q.weights_granularity,
        activations_granularity=q.activations_granularity,
        kv_granularity=q.kv_granularity,
        block=q.block_size,
        roles=roles,
        whole_attention=q.whole_attention,
        asymmetric=q.asymmetric,
    )


def context(cfg: ml_collections.ConfigDict, mesh=None) -> Context:
    """The forward's Context for a run on `mesh` (model/context.py): its one quantizer, built here once."""
    return transformer.build_context(cfg, mesh, make_quantizer(cfg))


def family(fmt: Format | str | None) -> str:
    """ "none", "int" or "float": what members of a vectorized run must share for a quant.<kind> field."""
    fmt = parse_format(fmt) if fmt is None or isinstance(fmt, str) else fmt
    return "none" if fmt is None else fmt.kind


def member_bits(cfgs: list) -> dict[str, np.ndarray]:
    """For the members of a vectorized run: {kind: int32 [M, 1] bits (int) or [M, 2] exponent, mantissa bits
    (float)} for each kind whose format differs between members. A ConfigError (one line, naming the field) when
    members differ in quantization on vs off or in the format family (int vs float)."""
    out = {}
    for kind in KINDS:
        fmts = [parse_format(c.quant[kind], field=f"quant.{kind}") for c in cfgs]
        names = [f.name if f else "none" for f in fmts]
        for i, f in enumerate(fmts[1:], 1):
            a, b = family(fmts[0]), family(f)
            if a != b:
                why = "on vs off" if "none" in (a, b) else "an integer vs a float format"
                raise ConfigError(
                    f"vectorized run: member {i} differs from member 0 in quant.{kind} ({names[0]} vs {names[i]}): "
                    f"quantization {why} cannot differ within a pack; only the bit width within one family may"
                )
        if any(n != names[0] for n in names):
            cols = [(f.bits,) if f.kind == "int" else (f.exp_bits, f.man_bits) for f in fmts]
            out[kind] = np.asarray(cols, np.int32)
    return out
