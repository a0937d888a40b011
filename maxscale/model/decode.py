"""Autoregressive generation with a KV cache, through the model's one forward (`ModelDef.forward(cache=...)`).

The prompt runs once (prefill: its keys and values written into the cache), then each new token is one forward of
a single position against the cache, inside one `jax.lax.scan` (no Python per token): the work per token is one
position's, not the whole prefix's. Keys and values are stored as the training forward computes them (after the
run's kv quantization, when it has one). Sampling: `temperature` 0 is greedy (argmax); otherwise softmax of
logits / temperature, restricted to the `top_k` most likely ids (0: all) and to the smallest set whose
probability reaches `top_p` (1: all). Ids at or past `vocab` (the tokenizer's size; the model's vocabulary may be
padded) are never produced.

MoE runs route each token as the training forward does, with one exception: `capacity` dispatch, whose drops
depend on how many tokens share a forward, decodes with `dropless` routing (the same experts and weights; no
token dropped), so a token's output does not depend on the batch it is decoded with.

Shapes: B batch, P prompt length, N new tokens, S = P + N cache positions, G key/value heads, K head dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections

from maxscale.model import transformer


@functools.lru_cache(maxsize=8)
def decoding_model(model: transformer.ModelDef) -> transformer.ModelDef:
    """`model` as decoding runs it: capacity MoE dispatch becomes dropless (see the module doc); else itself."""
    cfg = model.cfg
    if not transformer.is_moe(cfg) or cfg.model.moe.dispatch != "capacity":
        return model
    dropless = ml_collections.ConfigDict(cfg.to_dict())
    dropless.model.moe.dispatch = "dropless"
    return transformer.ModelDef(dropless, model.ctx)


def init_cache(cfg: ml_collections.ConfigDict, batch: int, length: int, dtype=jnp.float32) -> dict:
    """An empty KV cache: {stack: {"k", "v": zeros [layers of the stack, B, S, G, K]}}."""
    m = cfg.model
    shape = lambda layers: (layers, batch, length, m.num_kv_heads, m.head_dim)  # noqa: E731
    return {
        stack: {"k": jnp.zeros(shape(n), dtype), "v": jnp.zeros(shape(n), dtype)}
        for stack, n in transformer.stack_depths(cfg).items()
    }


def sample(logits_BV, key, temperature: float, top_k: int, top_p: float, vocab: int):
    """Next ids [B] from float32 logits [B, V] (see the module doc); static temperature, top_k, top_p, vocab."""
    logits_BV = jnp.where(jnp.arange(logits_BV.shape[-1]) < vocab, logits_BV.astype(jnp.float32), -jnp.inf)
    if temperature == 0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV / temperature
    if top_k:
        kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    if top_p < 1.0:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV  # probability of the ids ranked above each one
        cutoff_B1 = jnp.min(jnp.where(before_BV < top_p, sorted_BV, jnp.inf), axis=-1, keepdims=True)
        logits_BV = jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)
    return jax.random.categorical(key, logits_BV).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5, 6, 7))
def _generate(model, params, prompt_BP, new: int, temperature: float, top_k: int, top_p: float, vocab: int, key, bias):
    B, P = prompt_BP.shape
    cache = init_cache(model.cfg, B, P + new, model.ctx.dtype)
    out = model.forward(params, prompt_BP, moe_bias=bias, cache=cache, pos=0)
    keys = jax.random.split(key, new)
    first_B = sample(out.logits[:, -1], keys[0], temperature, top_k, top_p, vocab)

    def step(carry, key):
        ids_B, cache, pos = carry
        out = model.forward(params, ids_B[:, None], moe_bias=bias, cache=cache, pos=pos)
        nxt_B = sample(out.logits[:, -1], key, temperature, top_k, top_p, vocab)
        return (nxt_B, out.cache, pos + 1), ids_B

    (last_B, _, _), ids_NB = jax.lax.scan(step, (first_B, out.cache, jnp.int32(P)), keys[1:])
    return jnp.concatenate([ids_NB.T, last_B[:, None]], axis=1)


def generate(
    model: transformer.ModelDef,
    params: dict,
    prompt_BP,
    new: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    vocab: int | None = None,
    moe_bias=None,
) -> jax.Array:
    """int32 [B, new]: the ids sampled after each prompt row (int32 [B, P], P >= 1), one compiled program."""
    if new < 1:
        return jnp.zeros((prompt_BP.shape[0], 0), jnp.int32)
    vocab = model.cfg.model.vocab_size if vocab is None else vocab
    args = (new, float(temperature), int(top_k), float(top_p), int(vocab))
    bias = moe_bias
    if transformer.is_moe(model.cfg) and bias is None:
        bias = jnp.zeros((transformer.stack_depths(model.cfg)["moe_blocks"], model.cfg.model.moe.num_experts))
    return _generate(
        decoding_model(model), params, jnp.asarray(prompt_BP, jnp.int32), *args, jax.random.key(seed), bias
    )
