"""Tokenizes a corpus once into a token file (numpy memmap + JSON header) for `data.source=<out>.json`.

python tools/prepare_data.py --source=stdlib|FILE|DIR|GLOB --out=data/stdlib [--eval_fraction=0.02]
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from maxscale import config as config_lib  # noqa: E402
from maxscale import errors
from maxscale.launch import common as launch_common  # noqa: E402
from maxscale.train import data  # noqa: E402


def main(argv=None) -> int:
    parser = launch_common.OneLineArgumentParser(
        prog="prepare_data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", required=True, help="stdlib, a text file, a directory or a glob")
    parser.add_argument("--out", required=True, help="output prefix: writes OUT.json, OUT.train.bin, OUT.eval.bin")
    parser.add_argument("--eval_fraction", type=float, default=0.02)
    parser.add_argument("--max_bytes", type=int, default=0)
    args = parser.parse_args(argv)
    cfg = config_lib.defaults()
    cfg.data.update(source=args.source, eval_fraction=args.eval_fraction, max_bytes=args.max_bytes, seq_len=1)
    try:
        cfg = config_lib.resolve(cfg)
        header = data.write_token_file(cfg, args.out)
    except errors.ConfigError as e:
        print(f"prepare_data: error: {e}", file=sys.stderr)
        return errors.EXIT_USAGE
    print(
        f"wrote {args.out}.json: {header['train']['tokens']:,} train and {header['eval']['tokens']:,} eval "
        f"tokens ({header['dtype']}, vocab {header['vocab_size']})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
