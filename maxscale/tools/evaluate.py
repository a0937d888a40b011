"""Loss and bits per byte of a kept checkpoint on any text or token file, and `python tools/eval.py`.

  python tools/eval.py --run=DIR --data=FILE|DIR|GLOB|TOKENS.json [--step=S] [--split=auto] [--max_tokens=0]
                       [--batch_size=0] [--json]

The data is read with the run's tokenizer (`data.tokenizer` of its config.json; a token file must have been made
with the same one). --split: auto (a token file's eval split, all of a text source) | all | train | eval (the
document split of the trainer, by the run's data.eval_fraction). The loss is the mean next-token cross-entropy in
nats per token over non-overlapping windows of data.seq_len (each window reads seq_len + 1 tokens; every token after
the first is a target exactly once), so a checkpoint's loss does not depend on the batch size. Bits per byte =
loss / ln 2 x tokens / bytes, the bytes being the UTF-8 bytes the target tokens decode to, an end of document counting
as one: models with different tokenizers compare in bits per byte. For the byte tokenizer tokens = bytes, so bits per
byte = loss / ln 2. MoE runs also report each MoE layer's expert load on the data (the fraction of token-expert pairs
each expert receives: 1/E each at balance; Output.moe's moe_load) with the run's routing bias; one CPU device is
enough.
"""

from __future__ import annotations

import json
import math

import jax
import ml_collections
import numpy as np
import optax

from maxscale import cli
from maxscale.errors import ConfigError
from maxscale.tools import ptq
from maxscale.train import data as data_lib
from maxscale.train import tokenizers as tok_lib

SPLITS = ("auto", "all", "train", "eval")


def run_config(run_dir: str) -> ml_collections.ConfigDict:
    """The resolved config a run saved (dense or MoE); ConfigError (one line) if there is none."""
    return ptq.run_config(run_dir)


def load(run_dir: str, step: int | None, tokens: np.ndarray | None = None) -> ptq.Run:
    """The run's config and params (newest checkpoint or `step`) on one device, via ptq.load_run; `tokens` become
    its eval data (none: no data is read)."""
    cfg = run_config(run_dir)
    if tokens is None:
        tokens = np.zeros(cfg.data.seq_len + 1, np.int32)
    corpus = data_lib.Corpus(tokens, tokens, cfg.model.vocab_size, "tools")
    return ptq.load_run(run_dir, step, corpus=corpus)


def read_tokens(cfg: ml_collections.ConfigDict, source: str, split: str = "auto", max_bytes: int = 0) -> np.ndarray:
    """The token stream of `source` read with the run's tokenizer: one split, or all (train then eval)."""
    d = ml_collections.ConfigDict(cfg.data.to_dict())
    d.update(source=source, tokenizer=tok_lib.spec_of(cfg), max_bytes=max_bytes)
    corpus = data_lib.read_corpus(d)
    if corpus.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"--data={source}: its vocabulary ({corpus.vocab_size}) is larger than the model's")
    if split == "auto":
        split = "eval" if source.endswith(".json") else "all"
    if split == "all":
        return np.concatenate([np.asarray(corpus.train), np.asarray(corpus.eval)])
    return np.asarray(getattr(corpus, split))


def evaluate(run: ptq.Run, tokens: np.ndarray, batch_size: int = 0, max_tokens: int = 0) -> dict:
    """{loss (nats/token), bits_per_token, bits_per_byte, tokens, bytes, windows; MoE: expert_load [L_moe][E]} of
    the run's params on `tokens`."""
    cfg, setup = run.cfg, run.setup
    T = cfg.data.seq_len
    windows = (len(tokens) - 1) // T
    if max_tokens:
        windows = min(windows, max(max_tokens // T, 1))
    if windows < 1:
        raise ConfigError(f"--data has {len(tokens)} tokens, fewer than data.seq_len + 1 = {T + 1}; use more text")
    B = batch_size or cfg.train.batch_size

    @jax.jit
    def nll(params, tokens_BT1, bias):
        out = setup.model.forward(params, tokens_BT1[:, :-1], moe_bias=bias)
        ce_B = optax.softmax_cross_entropy_with_integer_labels(out.logits, tokens_BT1[:, 1:]).sum(-1)
        return ce_B, out.moe.get("moe_load")  # [L_moe, E] fraction of the batch's token-expert pairs, or None

    params = jax.device_put(run.params, jax.devices()[0])  # once, not per batch
    total, load = 0.0, 0.0
    for start in range(0, windows, B):
        idx = np.arange(start, min(start + B, windows))  # the last batch may be smaller: no padding rows routed
        rows = np.stack([np.asarray(tokens[i * T : i * T + T + 1], np.int32) for i in idx])
        ce_B, load_LE = nll(params, rows, run.moe_bias)
        total += float(np.asarray(ce_B).sum(dtype=np.float64))
        load = load + (0.0 if load_LE is None else np.asarray(load_LE, np.float64) * len(idx) / windows)
    n_tokens = windows * T
    n_bytes = tok_lib.num_bytes(tok_lib.of_config(cfg), tokens[1 : n_tokens + 1])
    loss = total / n_tokens
    return {
        "loss": loss,
        "bits_per_token": loss / math.log(2),
        "bits_per_byte": loss / math.log(2) * n_tokens / max(n_bytes, 1),
        "tokens": n_tokens,
        "bytes": n_bytes,
        "windows": windows,
        "seq_len": T,
        "tokenizer": tok_lib.spec_of(cfg),
        **({"expert_load": np.asarray(load).round(6).tolist()} if cfg.model.moe.num_experts else {}),
    }


def load_lines(load_LE) -> list[str]:
    """The per-expert load of each MoE layer, one line each (none for a dense model)."""
    if not load_LE:
        return []
    E = len(load_LE[0])
    lines = [f"expert load (fraction of token-expert pairs; {1 / E:.3f} each at balance), per MoE layer:"]
    for layer, row in enumerate(load_LE):
        lines.append(f"  moe layer {layer}: " + " ".join(f"{v:.3f}" for v in row) + f"  (max/mean {E * max(row):.2f})")
    return lines


@cli.command("eval")
def main(argv: list[str]) -> int:
    parser = cli.Parser("eval", __doc__)
    parser.add_argument("--run", required=True, help="a run directory (config.json and checkpoints/)")
    parser.add_argument("--data", required=True, help="a text file, directory or glob, or a token file's .json")
    parser.add_argument("--step", type=int, default=None, help="a kept checkpoint's step (default: the newest)")
    parser.add_argument("--split", default="auto", choices=SPLITS)
    parser.add_argument("--max_tokens", type=int, default=0, help="evaluate at most this many tokens (0 = all)")
    parser.add_argument("--max_bytes", type=int, default=0, help="read at most this many bytes of a text source")
    parser.add_argument("--batch_size", type=int, default=0, help="windows per forward pass (0 = train.batch_size)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse(argv)
    cfg = run_config(args.run)
    tokens = read_tokens(cfg, args.data, args.split, args.max_bytes)
    run = load(args.run, args.step, tokens)
    result = {"run": args.run, "step": run.step, "data": args.data, "split": args.split}
    result.update(evaluate(run, tokens, args.batch_size, args.max_tokens))
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{args.run} step {result['step']} on {args.data} ({result['split']}): loss {result['loss']:.4f} "
            f"nats/token, {result['bits_per_byte']:.4f} bits/byte "
            f"({result['tokens']:,} tokens, {result['bytes']:,} bytes)"
        )
        for line in load_lines(result.get("expert_load")):
            print(line)
    return 0
