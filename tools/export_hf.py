"""Exports a run's checkpoint as a Hugging Face Llama model: config.json + model.safetensors + tokenizer files.

python tools/export_hf.py --run=runs/<id> [--step=S] --out=DIR [--dtype=float32|bfloat16]
  (the logic, and how each parameterization multiplier is folded in: maxscale/tools/export_hf.py; docs/data.md)
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from maxscale.tools import export_hf  # noqa: E402

if __name__ == "__main__":
    sys.exit(export_hf.main())
