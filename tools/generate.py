#!/usr/bin/env python3
"""Text from any kept step of any run, with a KV cache (maxscale/tools/generate.py).

python tools/generate.py --run=runs/<id> --prompt=TEXT [--max_tokens=64] [--temperature=0] [--top_k=0] [--top_p=1]
                         [--seed=0] [--step=S] [--json]

The same command: `maxscale generate ...` (maxscale/__main__.py).
"""

import sys

from maxscale.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
