"""The dense feed-forward branch: SwiGLU or GELU MLP. Shapes: B batch, T sequence, D width, F ffn size."""

from __future__ import annotations

import jax
import ml_collections

from maxscale.model.layers import Matmul, mean_abs
from maxscale.parameterization import ParamSpec


def specs(cfg: ml_collections.ConfigDict) -> dict[str, ParamSpec]:
    """The MLP parameters of one block, each with a leading `layers` axis."""
    L = ("layers",)
    out = {
        "w_up": ParamSpec("hidden", L + ("embed", "mlp"), ("embed",), "mlp_in"),
        "w_down": ParamSpec("hidden", L + ("mlp", "embed"), ("mlp",), "mlp_out"),
    }
    if cfg.model.mlp == "swiglu":
        out["w_gate"] = ParamSpec("hidden", L + ("embed", "mlp"), ("embed",), "mlp_in")
    return out


def apply(p: dict, h_BTD, cfg: ml_collections.ConfigDict, mm: Matmul, stats: dict | None = None):
    """MLP branch output [B, T, D] (before the residual multiplier)."""
    up_BTF = mm("btd,df->btf", h_BTD, p["w_up"], role="hidden", name="w_up")
    if cfg.model.mlp == "swiglu":
        act_BTF = jax.nn.silu(mm("btd,df->btf", h_BTD, p["w_gate"], role="hidden", name="w_gate")) * up_BTF
    else:
        act_BTF = jax.nn.gelu(up_BTF)
    out_BTD = mm("btf,fd->btd", act_BTF, p["w_down"], role="hidden", name="w_down")
    if stats is not None:
        stats["mlp"] = mean_abs(out_BTD)
    return out_BTD
