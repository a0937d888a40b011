"""Post-training weight quantization (RTN or GPTQ) of a model's params: the math; `maxscale.tools.ptq` is the
command line (`python tools/ptq.py`) that loads a run, quantizes and evaluates it.

Quantizes the weights of every hidden matrix of every block (wq wk wv wo w_up w_gate w_down, shared experts) and of
every routed expert, each expert's matrix on its own (per-expert scales; GPTQ against the X^T X of the rows routed
to that expert, model/context.py's Recorder); norms and routers stay, optionally the embedding table (RTN, one scale
per token row: a lookup has no input to calibrate) and the readout. GPTQ (maxscale/quant/gptq.py) runs layer by
layer as in Frantar et al.: layer l's Hessians H = 2 X^T X / n come from the inputs of its matrices (X of wo is the
attention output [heads*head_dim], of w_down the MLP hidden), computed by the model's forward on calibration batches
through the already-quantized layers < l (quant/calibrate.py).
Float formats by bits: 3 e2m0, 4 e3m0, 5 e3m1, 6 e3m2, 7 e4m2, 8 e5m2, 12 e5m6 (one sign bit, scaled per group).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp

from maxscale.errors import ConfigError
from maxscale.model import transformer
from maxscale.model.context import EXPERT_ROLES
from maxscale.parameterization import ParamSpec
from maxscale.quant import calibrate, gptq
from maxscale.quant.formats import Format, float_format, int_format

METHODS = ("rtn", "gptq")
GRANULARITIES = ("per_channel", "per_tensor", "per_block")
# Bits -> ExMy with one sign bit: Kumar et al.'s float formats where their bit count adds up (E2M0, E3M0, E3M2,
# E4M2, E5M2, E5M6); their 5-bit "E4M1" has 6 bits, so 5 bits is E3M1 here.
FLOAT_FORMATS = {3: (2, 0), 4: (3, 0), 5: (3, 1), 6: (3, 2), 7: (4, 2), 8: (5, 2), 12: (5, 6)}
RESULT_FILE = "ptq.json"
ENTRY_KEY = ("bits", "method", "format", "granularity", "group_size", "step", "embeddings", "calib_batches")


@dataclasses.dataclass(frozen=True)
class Spec:
    """One post-training quantization: `bits` of `format` ("int" | "float") with `method` ("rtn" | "gptq")."""

    bits: int
    method: str = "gptq"
    format: str = "int"
    granularity: str = "per_channel"
    group_size: int = 128
    embeddings: bool = False
    calib_batches: int = 8
    damp: float = 0.01
    block_size: int = 128

    @property
    def fmt(self) -> Format:
        if self.format == "int":
            if not 2 <= self.bits <= 16:
                raise ConfigError(f"--bits={self.bits}: integer formats have 2..16 bits")
            return int_format(self.bits)
        if self.bits not in FLOAT_FORMATS:
            raise ConfigError(f"--format=float has no {self.bits}-bit format; use bits in {sorted(FLOAT_FORMATS)}")
        return float_format(*FLOAT_FORMATS[self.bits])


# ------------------------------------------------------------------------------------------------- quantizing


def _quantize(w, layout: ParamSpec, spec: Spec, h_II=None):
    """One layer's weight (contracted over `layout.fan_in`), RTN (h_II None) or GPTQ against h_II; same shape and
    dtype."""
    w_IO = calibrate.weight_to_IO(jnp.asarray(w), layout)
    if h_II is None:
        q_IO = gptq.rtn_quantize(w_IO, spec.fmt, spec.granularity, spec.group_size)
    else:
        q_IO = gptq.gptq_quantize(
            w_IO, h_II, spec.fmt, spec.granularity, spec.block_size, spec.damp, group_size=spec.group_size
        )
    return calibrate.weight_from_IO(q_IO, layout, w.shape).astype(w.dtype)


def quantize_params(model: transformer.ModelDef, params: dict, spec: Spec, calib_BT1: Sequence, moe_bias=None) -> dict:
    """A copy of `params` with every hidden matrix of every block (and with spec.embeddings the table and readout)
    quantized, layer by layer in depth order. calib_BT1: training batches int32 [B, T+1] (GPTQ only; the last token
    of each row is dropped); each layer's Hessians come from the model's forward with the layers before it already
    quantized, and every routed expert's matrices, expert by expert (each calibrated on the rows routed to it)."""
    cal = calibrate.Calibrator(model)
    params = jax.tree.map(jnp.asarray, params)
    tokens = [jnp.asarray(t)[:, :-1] for t in calib_BT1] if spec.method == "gptq" else []
    specs = model.spec_tree()
    for stack, i in calibrate.depth_order(model.cfg):
        hessians = cal.hessians(params, tokens, moe_bias).get(stack, {})
        layer = dict(params[stack])
        for name, ps in specs[stack].items():
            h = hessians[name][i] if name in hessians else None
            if ps.role == "hidden":
                layer[name] = layer[name].at[i].set(_quantize(layer[name][i], ps, spec, h))
            elif ps.role in EXPERT_ROLES:
                layer[name] = layer[name].at[i].set(_quantize_experts(layer[name][i], ps, spec, h))
        params = {**params, stack: layer}
    if spec.embeddings:
        params = _quantize_embeddings(model, params, spec, cal, tokens, moe_bias)
    return params


def _quantize_experts(w_E, layout: ParamSpec, spec: Spec, h_EII=None):
    """One layer's routed experts [E, ...]: each expert's matrix on its own (contracted over `layout.fan_in`), GPTQ
    against its own Hessian (the rows routed to it) or RTN; an expert no calibration row reached gets RTN."""
    one = dataclasses.replace(layout, axes=tuple(a for a in layout.axes if a != "experts"))
    out = []
    for e in range(w_E.shape[0]):
        h = None if h_EII is None or not float(jnp.trace(h_EII[e])) else h_EII[e]
        out.append(_quantize(w_E[e], one, spec, h))
    return jnp.stack(out)


TABLE = ParamSpec("embedding", ("vocab", "embed"), ("embed",))  # a lookup's layout: one scale per token row


def _quantize_embeddings(model, params: dict, spec: Spec, cal, tokens: list, moe_bias) -> dict:
    """The table per token row (RTN); an untied readout with GPTQ on the final hidden state when calibrating."""
    out = dict(params)
    out["embed"] = _quantize(params["embed"], TABLE, spec)
    if not model.cfg.model.tie_embeddings:
        h_DD = cal.hessians(params, tokens, moe_bias).get("top", {}).get("unembed")
        out["unembed"] = _quantize(params["unembed"], model.specs["unembed"], spec, h_DD)
    return out
