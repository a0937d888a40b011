"""Imports a Hugging Face Llama/Qwen3 checkpoint as a maxscale workdir with a step-0 checkpoint, to train on from.

python tools/import_hf.py --hf=DIR --out=WORKDIR [--config=FILE.py] [--config.<section>.<field>=<value> ...]
  (the logic, and what is refused: maxscale/tools/import_hf.py; docs/data.md)
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from maxscale.tools import import_hf  # noqa: E402

if __name__ == "__main__":
    sys.exit(import_hf.main())
