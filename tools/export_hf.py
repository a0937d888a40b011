#!/usr/bin/env python3
"""Exports a run's checkpoint as a Hugging Face Llama model: config.json + model.safetensors + tokenizer files.

python tools/export_hf.py --run=runs/<id> [--step=S] --out=DIR [--dtype=float32|bfloat16]
  (the logic, and how each parameterization multiplier is folded in: maxscale/tools/export_hf.py; docs/data.md)

The same command: `maxscale export ...` (maxscale/__main__.py).
"""

import sys

from maxscale.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
