"""Quantization-error metrics of a quantized-training run: how far each tensor kind sits from its quantized value.

`quant_errors(cfg, params, tokens_BT)` runs the model's forward once, layer by layer (maxscale/quant/calibrate.py),
with the run's own quantizer wrapped in an observer, and returns the relative RMS error ||x - q(x)|| / ||x|| of
every tensor the quantizer changed, averaged per kind over the matrices / calls of that kind:

  quant/weights_rel_err       every quantized weight matrix, per layer (and the embedding table / readout when
                              quant.embeddings / quant.readout are set)
  quant/activations_rel_err   every quantized matmul input
  quant/kv_rel_err            keys and values of every layer (and queries with quant.whole_attention)
  quant/probs_rel_err         attention probabilities (quant.whole_attention only)

Only the kinds the config quantizes appear ({} when nothing is). Jittable with cfg closed over; the trainer calls
it on logged steps only (one unrolled forward costs about a forward pass and compiles depth copies of the block).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections

from maxscale.quant import calibrate, qat
from maxscale.quant.formats import relative_rms_error

KINDS = ("weights", "activations", "kv", "probs")


def quant_errors(cfg: ml_collections.ConfigDict, params: dict, tokens_BT) -> dict[str, jax.Array]:
    """{"quant/<kind>_rel_err": float32 scalar} for the kinds cfg's quantizer changes; tokens_BT int32 [B, T]."""
    quantizer = qat.make_quantizer(cfg)
    if quantizer is None:
        return {}
    errors: dict[str, list] = {kind: [] for kind in KINDS}

    def record(kind, x, x_hat):
        errors[kind].append(relative_rms_error(x, x_hat))

    calibrate.unrolled_logits(cfg, params, tokens_BT, calibrate.Observer(inner=quantizer, on_quantize=record))
    return {f"quant/{kind}_rel_err": jnp.mean(jnp.stack(v)) for kind, v in errors.items() if v}


def quant_errors_fn(cfg: ml_collections.ConfigDict):
    """`quant_errors` compiled for this config: f(params, tokens_BT) -> dict of scalars."""
    return jax.jit(functools.partial(quant_errors, cfg))
