"""Tokenizes a corpus once into a token file (numpy memmap + JSON header) for `data.source=<out>.json`.

python tools/prepare_data.py --source=stdlib|FILE|DIR|GLOB --out=data/corpus [--tokenizer=hf:tokenizer.json]
  (the logic, and every flag: maxscale/tools/prepare.py; docs/data.md)
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from maxscale.tools import prepare  # noqa: E402

if __name__ == "__main__":
    sys.exit(prepare.main())
