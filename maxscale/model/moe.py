"""The mixture-of-experts feed-forward branch: parameters, routing, balance statistics, the bias update, dispatch.

Shapes: B batch, T tokens (B*T flattened for routing), D width, E routed experts, K active experts per token,
M expert hidden size, F shared-expert hidden size (num_shared * shared_ffn_size).

Model (Jiang, Bordelon, Pehlevan, Hanin 2026; docs/moe.md):
    out = sum_{j<K} w_j(h) Expert_{e_j(h)}(h) + SharedMLP(h)
    e(h) = top-K(score(h W_router) + stop_gradient(b))        -- the bias b chooses WHICH experts ...
    w_j  = combine(score_{e_j}(h))                            -- ... but never the weights (pre-bias scores)
with score sigmoid (paper) or softmax, combine mean_k (w = score / K: the paper) or renorm (w = score / sum: Mixtral).

Conventions:
- `load_E` is the fraction of the T*K token-expert pairs sent to each expert: it sums to 1, 1/E each at balance,
  and max_load = E * max(load_E) (max over mean). The paper's Load_i (fraction of tokens; sums to K) is K * load_E
  and its kappa = K / E, so its rule b -= eta (Load - kappa) is `update_bias(..., rule="linear", num_active=K)`.
- aux_loss = E * sum_i f_i P_i with f_i = load_E (counts / (T*K): Switch's top-1 fraction divided by K) and P_i the
  mean over tokens of the FULL softmax of the router logits over all E experts, also under sigmoid scoring (a
  sigmoid has no sum-to-one mean; the softmax of the same logits ranks experts identically). It equals 1 when
  either f or P is uniform, for any E, K. Only P carries a gradient.
- z_loss = mean_t (logsumexp_i logits_ti)^2 ((log E)^2 at zero logits); router_entropy = mean_t H(softmax(logits_t)).

All matmuls go through `mm` (maxscale.model.layers.Matmul); routing runs in float32.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from maxscale.errors import ConfigError
from maxscale.model import moe_dispatch
from maxscale.model.layers import Matmul, mean_abs
from maxscale.model.moe_config import CHOICES, MoEConfig  # noqa: F401  (MoEConfig is part of this module's API)
from maxscale.model.moe_dispatch import (  # noqa: F401  (public: the expert-parallel paths)
    capacity_dispatch_ep,
    dropless_dispatch_ep,
)
from maxscale.parameterization import ParamSpec

SCORES: dict[str, Callable] = {"sigmoid": jax.nn.sigmoid, "softmax": lambda x: jax.nn.softmax(x, axis=-1)}

COMBINES: dict[str, Callable] = {
    "mean_k": lambda s_TK: s_TK / s_TK.shape[-1],  # (1/K) sum_j g_j E_j: the paper
    "renorm": lambda s_TK: s_TK / s_TK.sum(-1, keepdims=True),  # weights sum to 1: Mixtral
}

# (p, h_TD, weights_TK, experts_TK, moe, mm) -> (y_TD, dropped_fraction); see moe_dispatch.py
DISPATCH: dict[str, Callable] = {
    "dropless": moe_dispatch.dropless,
    "capacity": moe_dispatch.capacity,
    "dense": moe_dispatch.dense,
}

# The config validates names against moe_config.CHOICES (it cannot import these tables: dispatch imports it).
assert {k: tuple(v) for k, v in (("score", SCORES), ("combine", COMBINES), ("dispatch", DISPATCH))} == {
    k: CHOICES[k] for k in ("score", "combine", "dispatch")
}


def axis_sizes(moe: MoEConfig) -> dict[str, int]:
    """Sizes of the logical axes the MoE parameters add (for the parameterization's `sizes`)."""
    return {"experts": moe.num_experts, "expert_mlp": moe.expert_ffn_size, "shared_mlp": moe.shared_size}


def specs(moe: MoEConfig) -> dict[str, ParamSpec]:
    """The MoE parameters of one block, each with a leading `layers` axis. The `experts` axis is never fan-in:
    each expert is its own D -> M -> D map, so its init must not shrink with E."""
    L = ("layers",)
    out = {
        "router": ParamSpec("router", L + ("embed", "experts"), ("embed",)),
        "w_up_e": ParamSpec("expert_in", L + ("experts", "embed", "expert_mlp"), ("embed",)),
        "w_down_e": ParamSpec("expert_out", L + ("experts", "expert_mlp", "embed"), ("expert_mlp",)),
    }
    if moe.mlp == "swiglu":
        out["w_gate_e"] = ParamSpec("expert_in", L + ("experts", "embed", "expert_mlp"), ("embed",))
    if moe.num_shared:
        out["w_up_s"] = ParamSpec("hidden", L + ("embed", "shared_mlp"), ("embed",), "mlp_in")
        out["w_down_s"] = ParamSpec("hidden", L + ("shared_mlp", "embed"), ("shared_mlp",), "mlp_out")
        if moe.mlp == "swiglu":
            out["w_gate_s"] = ParamSpec("hidden", L + ("embed", "shared_mlp"), ("embed",), "mlp_in")
    return out


def route(h_TD, w_router_DE, bias_E, moe: MoEConfig, mm: Matmul):
    """Top-K routing in float32. Returns (weights_TK, experts_TK, stats):
    weights_TK: float32 combine weights (the pre-bias scores of the chosen experts, /K or renormalised);
    experts_TK: int32 expert ids, distinct per token; stats: dict of routing statistics (see the module doc)."""
    E, K = moe.num_experts, moe.num_active
    # float32 operands, not only a float32 result: top-K decisions flip on bf16 rounding of near-tied logits
    router_mm = dataclasses.replace(mm, dtype=jnp.float32)
    logits_TE = router_mm("td,de->te", h_TD, w_router_DE, role="router", name="router", out_dtype=jnp.float32)
    scores_TE = SCORES[moe.score](logits_TE)
    bias_E = jnp.zeros((E,), jnp.float32) if bias_E is None else bias_E.astype(jnp.float32)
    _, experts_TK = jax.lax.top_k(scores_TE + jax.lax.stop_gradient(bias_E), K)
    weights_TK = COMBINES[moe.combine](jnp.take_along_axis(scores_TE, experts_TK, axis=-1))
    return weights_TK, experts_TK.astype(jnp.int32), routing_stats(logits_TE, experts_TK, E)


def routing_stats(logits_TE, experts_TK, num_experts: int) -> dict:
    """load_E [E] (fraction of pairs per expert, sums to 1), max_load (max/mean), aux_loss (1 at balance),
    z_loss, router_entropy; all float32. Only aux_loss and z_loss carry gradients (to the router)."""
    E = num_experts
    load_E = jnp.bincount(experts_TK.reshape(-1), length=E).astype(jnp.float32) / experts_TK.size
    logp_TE = jax.nn.log_softmax(logits_TE, axis=-1)
    prob_E = jnp.exp(logp_TE).mean(0)
    lse_T = jax.nn.logsumexp(logits_TE, axis=-1)
    return {
        "load_E": load_E,
        "max_load": E * load_E.max(),
        "aux_loss": E * (load_E * prob_E).sum(),
        "z_loss": (lse_T * lse_T).mean(),
        "router_entropy": -(jnp.exp(logp_TE) * logp_TE).sum(-1).mean(),
        "router_logits": jnp.abs(logits_TE).mean(),  # coordinate checks: mean |router logit|
    }


def shared_experts(p: dict, h_TD, moe: MoEConfig, mm: Matmul):
    """The shared experts: one dense MLP of hidden size num_shared * shared_ffn_size on every token [T, D]."""
    mm_in = lambda name: mm("td,df->tf", h_TD, p[name], role="hidden", name=name)  # noqa: E731
    act_TF = moe_dispatch.ACTIVATIONS[moe.mlp](mm_in("w_up_s"), lambda: mm_in("w_gate_s"))
    return mm("tf,fd->td", act_TF, p["w_down_s"], role="hidden", name="w_down_s")


def apply(
    p: dict,
    h_BTD,
    moe: MoEConfig,
    mm: Matmul,
    bias_E=None,
    stats: dict | None = None,
    dispatch: Callable | None = None,
):
    """MoE branch output [B, T, D] (before the residual multiplier) for this layer's params `p`.

    `bias_E` is the balance bias (not a parameter; None = zeros). `dispatch` overrides DISPATCH[moe.dispatch], e.g.
    functools.partial(capacity_dispatch_ep, mesh=mesh). When `stats` is a dict it receives, as float32 scalars
    unless noted: moe (mean |out|), moe_load [E], moe_max_load, moe_aux_loss, moe_z_loss, moe_router_entropy,
    moe_dropped_fraction (of the B*T*K pairs; 0 unless capacity). The caller weights the two losses."""
    B, T, D = h_BTD.shape
    h_TD = h_BTD.reshape(B * T, D)
    weights_TK, experts_TK, route_stats = route(h_TD, p["router"], bias_E, moe, mm)
    y_TD, dropped = (dispatch or DISPATCH[moe.dispatch])(p, h_TD, weights_TK, experts_TK, moe, mm)
    if stats is not None:  # coordinate checks: the combine weights and the routed experts' output
        stats["moe_gates"] = weights_TK.sum(-1).mean()  # per token: mean score (mean_k) or 1 (renorm); Theta(1)
        stats["moe_experts"] = mean_abs(y_TD)
    if moe.num_shared:
        y_TD = y_TD + shared_experts(p, h_TD, moe, mm).astype(jnp.float32)
    out_BTD = y_TD.reshape(B, T, D).astype(h_BTD.dtype)
    if stats is not None:
        stats["moe"] = mean_abs(out_BTD)
        stats.update({f"moe_{k.removesuffix('_E')}": v for k, v in route_stats.items()})
        stats["moe_dropped_fraction"] = jnp.asarray(dropped, jnp.float32)
    return out_BTD


# ---------------------------------------------------------------------------------------------------------------
# balance bias: updated after each optimizer step, outside the gradients (the caller stores b beside the params).


def _linear(bias_E, load_E, rate, num_active):
    # the paper's Eq. 2: b_i -= eta (Load_i - kappa), Load_i = K * load_i (fraction of tokens), kappa = K / E
    E = load_E.shape[-1]
    return bias_E - rate * num_active * (load_E - 1.0 / E)


def _sign(bias_E, load_E, rate, num_active):
    # DeepSeek-V3 / MaxText: b_i += gamma * sign(mean load - load_i); invariant to the load's normalisation
    return bias_E + rate * jnp.sign(load_E.mean(-1, keepdims=True) - load_E)


BIAS_RULES: dict[str, Callable] = {"linear": _linear, "sign": _sign}


def update_bias(bias_E, load_E, rate, rule: str = "linear", *, num_active: int):
    """The balance-bias step: returns the new float32 bias [E] (pure; no gradient).

    `load_E` is the fraction of token-expert pairs per expert (sums to 1, as in the stats; average it over the
    data-parallel shards and, if wanted, the layers first). linear: b -= rate * K * (load - 1/E), which is the
    paper's b -= eta_b (Load - kappa) with Load = K * load (fraction of tokens, sums to K) and kappa = K/E, so
    `rate` is the paper's eta_b. sign: b += rate * sign(1/E - load) (DeepSeek). `num_active` is K."""
    if rule not in BIAS_RULES:
        raise ConfigError(f"model.moe.bias_rule={rule!r}: choose one of {', '.join(BIAS_RULES)}")
    load_E = jax.lax.stop_gradient(jnp.asarray(load_E, jnp.float32))
    return BIAS_RULES[rule](jnp.asarray(bias_E, jnp.float32), load_E, rate, num_active)
