"""Quantization-error metrics of a quantized-training run: how far each tensor kind sits from its quantized value.

`quant_errors(model, params, tokens_BT)` runs the model's one forward (`ModelDef.forward`, capture
"quant_errors": model/context.py's Recorder sees every tensor the run's quantizer changes, inside the scanned
layer stacks, dense and MoE alike) and returns the relative RMS error ||x - q(x)|| / ||x|| of every tensor the
quantizer changed, averaged per kind over the matrices / calls of that kind:

  quant/weights_rel_err       every quantized weight matrix, per layer (experts included; the embedding table /
                              readout when quant.embeddings / quant.readout are set)
  quant/activations_rel_err   every quantized matmul input
  quant/kv_rel_err            keys and values of every layer (and queries with quant.whole_attention)
  quant/probs_rel_err         attention probabilities (quant.whole_attention only)

Only the kinds the config quantizes appear ({} when nothing is). On an expert-parallel mesh the MoE layers of this
forward use the layer's own dispatch (XLA partitions it), so that nothing is recorded inside a shard_map body.
The trainer calls it on logged steps only (about the cost of one forward).
"""

from __future__ import annotations

import jax

from maxscale.model import transformer
from maxscale.model.context import QUANT_KINDS as KINDS  # noqa: F401 - the kinds, in the order they are logged


def quant_errors(model: transformer.ModelDef, params: dict, tokens_BT, moe_bias=None, qbits=None) -> dict:
    """{"quant/<kind>_rel_err": float32 scalar} for the kinds the model's quantizer changes; tokens_BT int32
    [B, T]; `moe_bias` the run's routing bias, `qbits` a pack member's traced widths."""
    if model.ctx.quantizer is None:
        return {}
    out = model.forward(params, tokens_BT, moe_bias=moe_bias, qbits=qbits, capture=("quant_errors",))
    return {f"quant/{kind}_rel_err": v for kind, v in out.captured["quant_errors"].items()}


def quant_errors_fn(model: transformer.ModelDef):
    """`quant_errors` of this model, jitted: f(params, tokens_BT, moe_bias=None) -> dict of scalars."""
    return jax.jit(lambda params, tokens_BT, moe_bias=None: quant_errors(model, params, tokens_BT, moe_bias))
