"""Sampling text from a model with a sliding window of seq_len tokens (one compiled loop)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from maxscale.train import tokenizers
from maxscale.train.step import Setup


def generate(
    setup: Setup, params, prompt: str, num_tokens: int, seed: int = 0, temperature: float = 0.8, moe_bias=None
) -> str:
    """Samples `num_tokens` tokens after `prompt` with a window of seq_len tokens (one compiled loop), encoding and
    decoding with the run's tokenizer (`data.tokenizer`); ids past the tokenizer's vocabulary (padding) are never
    sampled. `moe_bias`: the run's MoE routing bias (state["moe_bias"]); None for dense models."""
    tok = tokenizers.of_config(setup.cfg)
    T = setup.cfg.data.seq_len
    prompt_ids = np.asarray(tok.encode(prompt), np.int32)
    ids = prompt_ids[-T:]
    window = np.full((T,), tok.eos_id, np.int32)
    window[T - len(ids) :] = ids
    vocab = min(tok.vocab_size, setup.cfg.model.vocab_size)

    @jax.jit
    def run(params, window, key, moe_bias):
        def body(carry, key):
            window = carry
            logits = setup.model.apply(params, window[None], moe_bias=moe_bias)[0, -1, :vocab]
            nxt = jax.random.categorical(key, logits / temperature).astype(jnp.int32)
            return jnp.concatenate([window[1:], nxt[None]]), nxt

        _, out = jax.lax.scan(body, window, jax.random.split(key, num_tokens))
        return out

    out = run(params, jnp.asarray(window), jax.random.key(seed), moe_bias)
    out = np.asarray(jax.device_get(out))
    return tok.decode(np.concatenate([prompt_ids, out]))  # one decode: pieces join as the tokenizer joins them
