"""Text from any kept step of any run (dense or MoE, any tokenizer), with a KV cache (maxscale/model/decode.py).

  maxscale generate --run=DIR --prompt=TEXT [--max_tokens=64] [--temperature=0] [--top_k=0] [--top_p=1]
                    [--seed=0] [--step=S] [--json]
  (or python tools/generate.py ...)

Loads the run's resolved config.json and its newest committed checkpoint (or --step) on one device, encodes the
prompt with the run's tokenizer (data.tokenizer), and samples --max_tokens ids after it through the model's own
forward with a KV cache: --temperature 0 is greedy (argmax), else softmax sampling at that temperature, restricted
to the --top_k most likely ids (0: all) and the smallest set of probability >= --top_p (1: all); --seed fixes the
draw. MoE runs use their routing bias; capacity dispatch decodes dropless (decode.py). Prints the prompt and its
continuation, or with --json one object {"prompt", "tokens": [continuation ids], "text": the continuation}.
Errors (bad flag, missing run, config or checkpoint, empty prompt): one line on stderr, exit 2.
"""

from __future__ import annotations

import json

import numpy as np

from maxscale import cli
from maxscale.errors import ConfigError
from maxscale.model import decode
from maxscale.tools import ptq
from maxscale.train import tokenizers


def generate(run_dir: str, prompt: str, max_tokens: int, step: int | None = None, **sampling) -> dict:
    """{"prompt", "step", "tokens": continuation ids, "text": their decoding} for a run directory."""
    cfg = ptq.run_config(run_dir)
    tok = tokenizers.of_config(cfg)
    ids = np.asarray(tok.encode(prompt), np.int32)
    if ids.size == 0:
        raise ConfigError("--prompt is empty after tokenization; give at least one character")
    setup, step, state = ptq.checkpoint_state(run_dir, cfg, step)
    vocab = min(tok.vocab_size, cfg.model.vocab_size)
    out = decode.generate(
        setup.model, state["params"], ids[None], max_tokens, vocab=vocab, moe_bias=state.get("moe_bias"), **sampling
    )
    tokens = [int(t) for t in np.asarray(out)[0]]
    return {"prompt": prompt, "step": step, "tokens": tokens, "text": tok.decode(np.asarray(tokens, np.int32))}


@cli.command("generate")
def main(argv: list[str]) -> int:
    parser = cli.Parser("generate", __doc__)
    parser.add_argument("--run", required=True, help="a run directory (config.json and checkpoints/)")
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--max_tokens", type=int, default=64, help="how many tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top_k", type=int, default=0, help="sample among the k most likely ids (0 = all)")
    parser.add_argument("--top_p", type=float, default=1.0, help="nucleus: smallest set of probability >= p")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step", type=int, default=None, help="a kept checkpoint's step (default: the newest)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    a = parser.parse(argv)
    for flag, ok in (
        ("max_tokens", a.max_tokens >= 1),
        ("temperature", a.temperature >= 0),
        ("top_k", a.top_k >= 0),
        ("top_p", 0 < a.top_p <= 1),
    ):
        if not ok:
            raise ConfigError(f"--{flag}={getattr(a, flag)} is out of range; see --help")
    sampling = {"temperature": a.temperature, "top_k": a.top_k, "top_p": a.top_p, "seed": a.seed}
    result = generate(a.run, a.prompt, a.max_tokens, a.step, **sampling)
    print(json.dumps(result) if a.json else result["prompt"] + result["text"])
    return 0
