#!/usr/bin/env python3
"""Imports a Hugging Face Llama/Qwen3 checkpoint as a maxscale workdir with a step-0 checkpoint, to train on from.

python tools/import_hf.py --hf=DIR --out=WORKDIR [--config=FILE.py] [--config.<section>.<field>=<value> ...]
  (the logic, and what is refused: maxscale/tools/import_hf.py; docs/data.md)

The same command: `maxscale import ...` (maxscale/__main__.py).
"""

import sys

from maxscale.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["import", *sys.argv[1:]]))
