"""Causal self-attention: its parameters, the projections, and THE attention-kernel entry point.

Shapes: B batch, T sequence, D width, H query heads, G key/value heads (grouped-query attention), K head dim.
`attend` is the one call of an attention kernel; implementations are chosen from `IMPLEMENTATIONS` by name
(`model.attention_impl`), each a small function tested against the plain XLA one.
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
import ml_collections

from maxscale.model import kernels
from maxscale.model.layers import Matmul, mean_abs, norm, rope
from maxscale.parameterization import ParamSpec


def specs(cfg: ml_collections.ConfigDict) -> dict[str, ParamSpec]:
    """The attention parameters of one block, each with a leading `layers` axis."""
    L = ("layers",)
    out = {
        "wq": ParamSpec("hidden", L + ("embed", "heads", "head_dim"), ("embed",)),
        "wk": ParamSpec("hidden", L + ("embed", "kv_heads", "head_dim"), ("embed",)),
        "wv": ParamSpec("hidden", L + ("embed", "kv_heads", "head_dim"), ("embed",)),
        "wo": ParamSpec("hidden", L + ("heads", "head_dim", "embed"), ("heads", "head_dim")),
    }
    if cfg.model.qk_norm:
        out["q_norm"] = ParamSpec("norm", L + ("head_dim",), ())
        out["k_norm"] = ParamSpec("norm", L + ("head_dim",), ())
    return out


IMPLEMENTATIONS: dict[str, Callable] = {"xla": kernels.xla_attention, "explicit": kernels.explicit_attention}


def attend(q_BTHK, k_BTGK, v_BTGK, *, scale: float, impl: str = "xla", probs_hook: Callable | None = None):
    """Causal softmax(scale q.k) v with H query heads sharing G key/value heads; returns [B, T, H, K].
    `probs_hook` transforms the attention probabilities (only kernels that form them explicitly take one)."""
    return IMPLEMENTATIONS[impl](q_BTHK, k_BTGK, v_BTGK, scale, probs_hook)


def apply(p: dict, h_BTD, cfg: ml_collections.ConfigDict, mults: dict, mm: Matmul, stats: dict | None = None):
    """Attention branch output [B, T, D] (before the residual multiplier) for this layer's params `p`.
    When `stats` is a dict, mean |.| of intermediate values are added to it (coordinate checks)."""
    m = cfg.model
    q_BTHK = mm("btd,dhk->bthk", h_BTD, p["wq"], role="hidden")
    k_BTGK = mm("btd,dgk->btgk", h_BTD, p["wk"], role="hidden")
    v_BTGK = mm("btd,dgk->btgk", h_BTD, p["wv"], role="hidden")
    if m.qk_norm:
        q_BTHK = norm(q_BTHK, p["q_norm"], None, "rmsnorm", m.norm_eps)
        k_BTGK = norm(k_BTGK, p["k_norm"], None, "rmsnorm", m.norm_eps)
    q_BTHK, k_BTGK = rope(q_BTHK, m.rope_theta), rope(k_BTGK, m.rope_theta)
    impl, probs_hook = "xla", None
    quant = mm.quantizer
    if quant is not None and quant.quantizes_kv:  # P_kv: keys and values as the attention kernel reads them
        k_BTGK, v_BTGK = quant.kv(k_BTGK), quant.kv(v_BTGK)
        if quant.whole_attention:  # the paper's "whole attention": queries and probabilities too
            q_BTHK, impl, probs_hook = quant.kv(q_BTHK), "explicit", quant.probs
    att_BTHK = attend(q_BTHK, k_BTGK, v_BTGK, scale=mults["attn_scale"], impl=impl, probs_hook=probs_hook)
    out_BTD = mm("bthk,hkd->btd", att_BTHK, p["wo"], role="hidden")
    if stats is not None:
        stats["attn"] = mean_abs(out_BTD)
        stats["attn_logits"] = kernels.logit_abs_mean(q_BTHK, k_BTGK, mults["attn_scale"])
        # the first sequence's queries and keys (each query head with its key head): coordinate checks form the
        # learned part of the logits, scale (q_t - q_0).(k_t - k_0), across training steps
        k_BTHK = jnp.repeat(k_BTGK, q_BTHK.shape[2] // k_BTGK.shape[2], axis=2)
        stats["qk_probe"] = jnp.stack([q_BTHK[0], k_BTHK[0]]).astype(jnp.float32)  # [2, T, H, K]
        stats["attn_mix"] = mean_abs(att_BTHK)  # softmax(.) v, before the output projection
    return out_BTD
