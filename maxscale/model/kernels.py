"""Attention kernels: activation x activation products, chosen by name in attention.IMPLEMENTATIONS.

These are the only einsums of maxscale/model outside the matmul entry point (layers.Matmul): they multiply
activations with activations (q.k, p.v), never a weight. Shapes: B batch, T queries, S keys, H query heads,
G key/value heads, R = H / G query heads per key/value head, K head dim.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def xla_attention(q_BTHK, k_BSGK, v_BSGK, scale: float, probs_hook: Callable | None = None):
    """jax.nn.dot_product_attention's XLA path (materialises the [B, H, T, S] logits)."""
    if probs_hook is not None:
        raise ValueError("the xla attention kernel cannot transform the probabilities; use 'explicit'")
    return jax.nn.dot_product_attention(q_BTHK, k_BSGK, v_BSGK, scale=scale, is_causal=True)


def explicit_attention(q_BTHK, k_BSGK, v_BSGK, scale: float, probs_hook: Callable | None = None):
    """Causal softmax attention written out, so `probs_hook` can transform the probabilities (quantization of the
    whole attention). Logits and softmax in float32; grouped-query heads without repeating k and v."""
    B, T, H, K = q_BTHK.shape
    G = k_BSGK.shape[2]
    q_BTGRK = q_BTHK.reshape(B, T, G, H // G, K)
    logits_BGRTS = jnp.einsum("btgrk,bsgk->bgrts", q_BTGRK, k_BSGK, preferred_element_type=jnp.float32) * scale
    causal_TS = jnp.tril(jnp.ones((T, k_BSGK.shape[1]), bool))
    logits_BGRTS = jnp.where(causal_TS, logits_BGRTS, -jnp.inf)
    probs_BGRTS = jax.nn.softmax(logits_BGRTS, axis=-1)
    if probs_hook is not None:
        probs_BGRTS = probs_hook(probs_BGRTS)
    out_BTGRK = jnp.einsum("bgrts,bsgk->btgrk", probs_BGRTS.astype(v_BSGK.dtype), v_BSGK)
    return out_BTGRK.reshape(B, T, H, K)


def logit_abs_mean(q_BTHK, k_BSGK, scale: float):
    """Mean |scale q.k| over the causal (query, key) pairs: the size of the pre-softmax attention logits."""
    B, T, H, K = q_BTHK.shape
    G = k_BSGK.shape[2]
    q_BTGRK = q_BTHK.reshape(B, T, G, H // G, K)
    logits_BGRTS = jnp.einsum("btgrk,bsgk->bgrts", q_BTGRK, k_BSGK, preferred_element_type=jnp.float32) * scale
    causal_TS = jnp.tril(jnp.ones((T, k_BSGK.shape[1]), jnp.float32))
    return (jnp.abs(logits_BGRTS) * causal_TS).sum() / (causal_TS.sum() * B * H)
