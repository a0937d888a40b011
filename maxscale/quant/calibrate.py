"""Calibration for post-training quantization, through the model's one forward pass.

GPTQ needs, for every hidden matrix of every layer, the second moment X^T X of its input. The model's forward
reports them (`ModelDef.forward(capture=("moments",))`: model/context.py's Recorder sees each named matrix's input
at the matmul entry point, inside the scanned layer stacks), per stack and layer, so dense models and every MoE
layout (`first_dense`, `every`, shared experts) are calibrated by the code that trains them; a routed expert's
moments are [E, I, I], each over the rows routed to that expert (dense dispatch is calibrated as dropless). GPTQ
quantizes layer by layer in depth order (`depth_order`), each layer's moments taken with the layers before it
already quantized (Frantar et al.), which costs one forward per layer and calibration batch.

Shapes: I a matrix's input (contracted) features, O its output features. A weight in its stored layout (e.g. wo
[H, K, D]) maps to w_IO [I, O] with `weight_to_IO`, its contracted axes being its ParamSpec's `fan_in` (in the
order the activation holds them), and back with `weight_from_IO`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections

from maxscale.model import transformer
from maxscale.parameterization import ParamSpec


def _layout(spec: ParamSpec) -> tuple[list[int], list[int]]:
    """(contracted, kept) axis positions of one layer's slice of a weight (the `layers` axis dropped)."""
    axes = [a for a in spec.axes if a != "layers"]
    contracted = [axes.index(a) for a in spec.fan_in]
    return contracted, [i for i in range(len(axes)) if i not in contracted]


def weight_to_IO(w, spec: ParamSpec) -> jax.Array:
    """One layer's weight -> [I, O]: contracted axes (spec.fan_in, in order) first, then the rest."""
    contracted, kept = _layout(spec)
    n_in = math.prod(w.shape[i] for i in contracted)
    return jnp.transpose(w, contracted + kept).reshape(n_in, -1)


def weight_from_IO(w_IO, spec: ParamSpec, shape: tuple[int, ...]) -> jax.Array:
    """Inverse of `weight_to_IO` for a weight of `shape`."""
    contracted, kept = _layout(spec)
    perm = contracted + kept
    w_t = jnp.reshape(w_IO, [shape[i] for i in perm])
    return jnp.transpose(w_t, [perm.index(i) for i in range(len(shape))])


def depth_order(cfg: ml_collections.ConfigDict) -> list[tuple[str, int]]:
    """(stack, layer within the stack) of every block in depth order: the `blocks` stack, then per MoE group its
    `every - 1` `interleaved` blocks and its `moe_blocks` block."""
    depths = transformer.stack_depths(cfg)
    order = [("blocks", i) for i in range(depths.get("blocks", 0))]
    per = cfg.model.moe.every - 1 if "interleaved" in depths else 0
    for g in range(depths.get("moe_blocks", 0)):
        order += [("interleaved", g * per + j) for j in range(per)] + [("moe_blocks", g)]
    return order


class Calibrator:
    """The second moments of every hidden matrix's input, from the model's forward, jitted once per model."""

    def __init__(self, model: transformer.ModelDef):
        if model.cfg.model.moe.dispatch == "dense":  # every expert sees every token there; calibrate on the routed
            cfg = ml_collections.ConfigDict(model.cfg.to_dict())
            cfg.model.moe.dispatch = "dropless"  # the same function, each expert's matmuls on its own rows
            model = transformer.ModelDef(cfg, model.ctx)
        self.model = model
        capture = ("moments",)
        self._moments = jax.jit(
            lambda params, tokens_BT, bias: model.forward(params, tokens_BT, moe_bias=bias, capture=capture).captured[
                "moments"
            ]
        )

    def hessians(self, params: dict, batches_BT: list, moe_bias=None) -> dict:
        """{stack: {name: H [L, I, I]}, "top": {readout name: H [D, D]}}: H = 2 X^T X / n over all batches' rows
        ({} without batches)."""
        if not batches_BT:
            return {}
        total = None
        for tokens_BT in batches_BT:
            m = self._moments(params, tokens_BT, moe_bias)
            total = m if total is None else jax.tree.map(jnp.add, total, m)
        rows = sum(t.shape[0] * t.shape[1] for t in batches_BT)
        return jax.tree.map(lambda v: 2.0 * v / rows, total)
