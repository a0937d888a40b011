#!/usr/bin/env python3
"""Tokenizes a corpus once into a token file (numpy memmap + JSON header) for `data.source=<out>.json`.

python tools/prepare_data.py --source=stdlib|FILE|DIR|GLOB --out=data/corpus [--tokenizer=hf:tokenizer.json]
  (the logic, and every flag: maxscale/tools/prepare.py; docs/data.md)

The same command: `maxscale prepare ...` (maxscale/__main__.py).
"""

import sys

from maxscale.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
