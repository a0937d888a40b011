"""The trainer's text sample at the end of a run: the model's decoding with a KV cache (model/decode.py)."""

from __future__ import annotations

import numpy as np

from maxscale.model import decode
from maxscale.train import tokenizers
from maxscale.train.step import Setup


def generate(
    setup: Setup, params, prompt: str, num_tokens: int, seed: int = 0, temperature: float = 0.8, moe_bias=None
) -> str:
    """`prompt` and `num_tokens` tokens sampled after it at `temperature`, encoded and decoded with the run's
    tokenizer (`data.tokenizer`); ids past the tokenizer's vocabulary (padding) are never sampled. The prompt's last
    data.seq_len ids are kept (an empty prompt starts from the end-of-text id). `moe_bias`: the run's MoE routing
    bias (state["moe_bias"]); None for dense models."""
    tok = tokenizers.of_config(setup.cfg)
    prompt_ids = np.asarray(tok.encode(prompt), np.int32)
    ids = prompt_ids[-setup.cfg.data.seq_len :] if prompt_ids.size else np.asarray([tok.eos_id], np.int32)
    vocab = min(tok.vocab_size, setup.cfg.model.vocab_size)
    kw = {"temperature": temperature, "seed": seed, "vocab": vocab, "moe_bias": moe_bias}
    out = np.asarray(decode.generate(setup.model, params, ids[None], num_tokens, **kw))[0]
    return tok.decode(np.concatenate([prompt_ids, out]))  # one decode: pieces join as the tokenizer joins them
