"""Attention kernels: activation x activation products, chosen by name in attention.IMPLEMENTATIONS.

These are the only einsums of maxscale/model outside the matmul entry point (layers.Matmul): they multiply
activations with activations (q.k, p.v), never a weight. Shapes: B batch, T queries, S keys, H query heads,
G key/value heads, R = H / G query heads per key/value head, K head dim.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp


def xla_attention(q_BTHK, k_BSGK, v_BSGK, scale: float, probs_hook: Callable | None = None):
    """jax.nn.dot_product_attention's XLA path (materialises the [B, H, T, S] logits)."""
    if probs_hook is not None:
        raise ValueError("the xla attention kernel cannot transform the probabilities; use 'explicit'")
    return jax.nn.dot_product_attention(q_BTHK, k_BSGK, v_BSGK, scale=scale, is_causal=True)


def explicit_attention(q_BTHK, k_BSGK, v_BSGK, scale: float, probs_hook: Callable | None = None, q_offset=0):
    """Causal softmax attention written out, so `probs_hook` can transform the probabilities (quantization of the
    whole attention). Logits and softmax in float32; grouped-query heads without repeating k and v. `q_offset`: the
    position of the first query among the S keys (decoding with a KV cache: query t sees keys s <= q_offset + t;
    0 with T = S is the plain causal mask)."""
    B, T, H, K = q_BTHK.shape
    G, S = k_BSGK.shape[2], k_BSGK.shape[1]
    q_BTGRK = q_BTHK.reshape(B, T, G, H // G, K)
    logits_BGRTS = jnp.einsum("btgrk,bsgk->bgrts", q_BTGRK, k_BSGK, preferred_element_type=jnp.float32) * scale
    causal_TS = jnp.arange(S)[None, :] <= q_offset + jnp.arange(T)[:, None]
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


# ----------------------------------------------------------------------------------------------------------------
# Fused kernels of the accelerators: cuDNN flash attention (NVIDIA GPUs) and Pallas splash attention (TPUs).


def cudnn_attention(q_BTHK, k_BSGK, v_BSGK, scale: float, probs_hook: Callable | None = None):
    """cuDNN's fused flash attention (NVIDIA GPUs; bfloat16/float16 operands, head dim a multiple of 8 up to 256).
    Grouped-query heads go to cuDNN as they are; batch and head sharding are partitioned by XLA."""
    if probs_hook is not None:
        raise ValueError("the cudnn attention kernel cannot transform the probabilities; use 'explicit'")
    return jax.nn.dot_product_attention(q_BTHK, k_BSGK, v_BSGK, scale=scale, is_causal=True, implementation="cudnn")


def splash_attention(
    q_BTHK, k_BSGK, v_BSGK, scale: float, probs_hook: Callable | None = None, *, block: int = 512, interpret=False
):
    """TPU Pallas splash attention (causal mask, blocks of up to `block` positions dividing T, multiples of 128;
    grouped-query heads native). Pallas kernels are not partitioned by XLA: under a mesh, `attention.attend` runs
    this per shard. `interpret`: run the kernel in the Pallas interpreter (CPU tests)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    if probs_hook is not None:
        raise ValueError("the splash attention kernel cannot transform the probabilities; use 'explicit'")
    T, H = q_BTHK.shape[1], q_BTHK.shape[2]
    b = min(block, T)
    while T % b:  # the largest power-of-two fraction of `block` dividing T (T a multiple of 128: b >= 128)
        b //= 2
    sizes = sk.BlockSizes(
        block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b, block_kv_dkv_compute=b,
        block_q_dq=b, block_kv_dq=b,
    )  # fmt: skip
    mask = sm.MultiHeadMask([sm.CausalMask((T, k_BSGK.shape[1]))] * H)
    kernel = sk.make_splash_mha(mask=mask, head_shards=1, q_seq_shards=1, block_sizes=sizes, interpret=interpret)
    heads_first = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731 - [B, T, H, K] <-> [B, H, T, K]
    q_BHTK = heads_first(q_BTHK * jnp.asarray(scale, q_BTHK.dtype))  # the kernel does not scale the logits
    return heads_first(jax.vmap(kernel)(q_BHTK, heads_first(k_BSGK), heads_first(v_BSGK)))


# ----------------------------------------------------------------------------------------------------------------
# Chunked (blockwise, online-softmax) attention in plain JAX: memory O(T x chunk), never [T, T]. Any backend.
#
# Blocks of C positions: queries [n, B, C, G, R, K], keys and values [n, B, C, G, K]. Query block i attends to key
# blocks 0..i (the causal mask only bites on the diagonal block; blocks above it are skipped, not masked). The
# forward keeps, per query, the running max m, sum l and the weighted values (flash attention); it saves only the
# output and the log-sum-exp per query. The backward recomputes each block's probabilities from them: one pass over
# query blocks for dq, one over key blocks for dk and dv (no scatter-adds), as FlashAttention-2 does.


def chunked_attention(q_BTHK, k_BSGK, v_BSGK, scale: float, probs_hook: Callable | None = None, *, chunk: int = 512):
    """Causal attention in blocks of `chunk` positions (a sequence that is not a multiple is padded at the end)."""
    if probs_hook is not None:
        raise ValueError("the chunked attention kernel cannot transform the probabilities; use 'explicit'")
    B, T, H, K = q_BTHK.shape
    G = k_BSGK.shape[2]
    C = min(chunk, T)
    pad = -T % C
    if pad:  # padded keys come after every real query, so the causal mask hides them; padded queries are dropped
        widen = lambda x: jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))  # noqa: E731
        q_BTHK, k_BSGK, v_BSGK = widen(q_BTHK), widen(k_BSGK), widen(v_BSGK)
    n = (T + pad) // C
    q_nBCGRK = q_BTHK.reshape(B, n, C, G, H // G, K).swapaxes(0, 1)
    k_nBCGK, v_nBCGK = (x.reshape(B, n, C, G, K).swapaxes(0, 1) for x in (k_BSGK, v_BSGK))
    out_nBCGRK = _flash(q_nBCGRK, k_nBCGK, v_nBCGK, float(scale))
    return out_nBCGRK.swapaxes(0, 1).reshape(B, n * C, H, K)[:, :T]


def _block_logits(q_BCGRK, k_BCGK, i, j, scale: float):
    """Scaled logits [B, G, R, C, C] of query block i against key block j (float32), causal mask applied."""
    s = jnp.einsum("bcgrk,bsgk->bgrcs", q_BCGRK, k_BCGK, preferred_element_type=jnp.float32) * scale
    C = q_BCGRK.shape[1]
    pos = jnp.arange(C)
    visible_CS = (j * C + pos)[None, :] <= (i * C + pos)[:, None]
    return jnp.where(visible_CS, s, -jnp.inf)


def _flash_forward(q_nBCGRK, k_nBCGK, v_nBCGK, scale: float):
    n, B, C, G, R, K = q_nBCGRK.shape

    def query_block(_, xs):
        i, q_BCGRK = xs

        def key_block(j, carry):
            m_BGRC, l_BGRC, acc_BGRCK = carry
            s = _block_logits(q_BCGRK, k_nBCGK[j], i, j, scale)
            m_new = jnp.maximum(m_BGRC, s.max(-1))
            p = jnp.exp(s - m_new[..., None])
            correction = jnp.exp(m_BGRC - m_new)
            v_BCGK = v_nBCGK[j]
            pv = jnp.einsum("bgrcs,bsgk->bgrck", p.astype(v_BCGK.dtype), v_BCGK, preferred_element_type=jnp.float32)
            return m_new, l_BGRC * correction + p.sum(-1), acc_BGRCK * correction[..., None] + pv

        init = (
            jnp.full((B, G, R, C), -jnp.inf, jnp.float32),
            jnp.zeros((B, G, R, C), jnp.float32),
            jnp.zeros((B, G, R, C, K), jnp.float32),
        )
        m, l, acc = jax.lax.fori_loop(0, i + 1, key_block, init)  # key 0 is visible to every query: l > 0
        out_BCGRK = (acc / l[..., None]).transpose(0, 3, 1, 2, 4).astype(q_BCGRK.dtype)
        return None, (out_BCGRK, m + jnp.log(l))

    _, (out, lse_nBGRC) = jax.lax.scan(query_block, None, (jnp.arange(n), q_nBCGRK))
    return out, lse_nBGRC


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _flash(q_nBCGRK, k_nBCGK, v_nBCGK, scale: float):
    return _flash_forward(q_nBCGRK, k_nBCGK, v_nBCGK, scale)[0]


def _flash_fwd(q, k, v, scale):
    out, lse = _flash_forward(q, k, v, scale)
    return out, (q, k, v, out, lse)


def _flash_bwd(scale, res, dout_nBCGRK):
    q, k, v, out, lse = res
    n = q.shape[0]
    # D = rowsum(dout * out) = sum_s p ds/dp terms: the softmax backward's per-query constant
    delta_nBGRC = jnp.einsum("nbcgrk,nbcgrk->nbgrc", dout_nBCGRK.astype(jnp.float32), out.astype(jnp.float32))

    def probs_and_dlogits(i, j, q_BCGRK, k_BCGK, v_BCGK, do_BCGRK, lse_BGRC, delta_BGRC):
        p = jnp.exp(_block_logits(q_BCGRK, k_BCGK, i, j, scale) - lse_BGRC[..., None])
        dp = jnp.einsum("bcgrk,bsgk->bgrcs", do_BCGRK, v_BCGK, preferred_element_type=jnp.float32)
        return p, p * (dp - delta_BGRC[..., None])

    def dq_block(_, xs):
        i, q_BCGRK, do_BCGRK, lse_BGRC, delta_BGRC = xs

        def key_block(j, dq):
            _, ds = probs_and_dlogits(i, j, q_BCGRK, k[j], v[j], do_BCGRK, lse_BGRC, delta_BGRC)
            return dq + jnp.einsum("bgrcs,bsgk->bcgrk", ds.astype(k.dtype), k[j], preferred_element_type=jnp.float32)

        dq = jax.lax.fori_loop(0, i + 1, key_block, jnp.zeros(q_BCGRK.shape, jnp.float32))
        return None, (dq * scale).astype(q.dtype)

    def dkv_block(_, xs):
        j, k_BCGK, v_BCGK = xs

        def query_block(i, carry):
            dk, dv = carry
            p, ds = probs_and_dlogits(i, j, q[i], k_BCGK, v_BCGK, dout_nBCGRK[i], lse[i], delta_nBGRC[i])
            dv = dv + jnp.einsum(
                "bgrcs,bcgrk->bsgk", p.astype(v.dtype), dout_nBCGRK[i], preferred_element_type=jnp.float32
            )
            dk = dk + jnp.einsum("bgrcs,bcgrk->bsgk", ds.astype(q.dtype), q[i], preferred_element_type=jnp.float32)
            return dk, dv

        zeros = jnp.zeros(k_BCGK.shape, jnp.float32)
        dk, dv = jax.lax.fori_loop(j, n, query_block, (zeros, zeros))  # query blocks at or after key block j
        return None, ((dk * scale).astype(k.dtype), dv.astype(v.dtype))

    steps = jnp.arange(n)
    _, dq = jax.lax.scan(dq_block, None, (steps, q, dout_nBCGRK, lse, delta_nBGRC))
    _, (dk, dv) = jax.lax.scan(dkv_block, None, (steps, k, v))
    return dq, dk, dv


_flash.defvjp(_flash_fwd, _flash_bwd)
