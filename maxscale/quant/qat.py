"""Quantized training: the quantizer the model's matmul entry point calls (maxscale/model/layers.py, `Quantizer`).

Fake quantization in the forward pass with a straight-through gradient (Kumar et al., "Scaling Laws for
Precision"): weights (P_w) and matmul inputs (P_a) of every hidden and expert matrix, optionally the embedding table,
the readout and the router; attention keys and values (P_kv), and with `quant.whole_attention` also the queries and
the attention probabilities. Scales follow each kind's granularity: per_channel shares a scale over the contracted
axes of the einsum (one per output feature of a weight), per_token one per row of an activation.
"""

from __future__ import annotations

import dataclasses

import jax
import ml_collections

from maxscale.errors import ConfigError
from maxscale.quant.formats import Format, contracted_axes, fake_quant, parse_format

ALWAYS = ("hidden", "expert_in", "expert_out")  # quantized whenever a format is set
OPTIONAL = {"embedding": "embeddings", "readout": "readout", "router": "router"}  # role -> quant.<field>


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

    @property
    def quantizes_kv(self) -> bool:
        return self.kv_fmt is not None

    def _q(self, x, fmt, granularity, axis):
        if fmt is None:
            return x
        return fake_quant(x, fmt, granularity, axis, self.block, asymmetric=self.asymmetric and fmt.kind == "int")

    def weights(self, w: jax.Array, eq: str, role: str) -> jax.Array:
        if role not in self.roles:
            return w
        return self._q(w, self.weights_fmt, self.weights_granularity, contracted_axes(eq, 1))

    def activations(self, x: jax.Array, eq: str, role: str) -> jax.Array:
        if role not in self.roles:
            return x
        return self._q(x, self.activations_fmt, self.activations_granularity, contracted_axes(eq, 0))

    def kv(self, x_BTGK: jax.Array) -> jax.Array:
        return self._q(x_BTGK, self.kv_fmt, self.kv_granularity, -1)

    def probs(self, p: jax.Array) -> jax.Array:
        """Attention probabilities [..., T, S] at the kv format, one scale per query row (per_token)."""
        return self._q(p, self.kv_fmt, "per_token" if self.kv_granularity != "per_tensor" else "per_tensor", -1)

    def table(self, table_VD: jax.Array) -> jax.Array:
        """The embedding table before the lookup: one scale per token row (per_channel over the width)."""
        if "embedding" not in self.roles:
            return table_VD
        return self._q(table_VD, self.weights_fmt, self.weights_granularity, (1,))


def make_quantizer(cfg: ml_collections.ConfigDict) -> FakeQuantizer | None:
    """The quantizer for a resolved config, or None when nothing is quantized (the model then runs unchanged)."""
    q = cfg.quant
    fmts = {kind: parse_format(q[kind], field=f"quant.{kind}") for kind in ("weights", "activations", "kv")}
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
