#!/usr/bin/env python3
"""Run N processes of a command on this host as one multi-process JAX job.

  python launch/local.py --num_processes=2 --devices_per_process=2 -- python -m maxscale.train ...

Logic lives in maxscale/launch/local.py; this file only parses arguments.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root

from maxscale.launch import common as launch_common  # noqa: E402
from maxscale.launch import local as launch_local  # noqa: E402


def main(argv=None) -> int:
    flags, command = launch_common.split_command(sys.argv[1:] if argv is None else argv)
    ap = launch_common.OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num_processes", type=int, default=2)
    ap.add_argument("--devices_per_process", type=int, default=1, help="fake CPU devices per process")
    ap.add_argument("--port", type=int, default=0, help="coordinator port; 0 picks a free one")
    ap.add_argument(
        "--grace_s",
        type=float,
        default=60.0,
        help="after forwarding SIGTERM/SIGINT (or stopping the others when one fails): seconds before SIGKILL; "
        "enough for the trainer to finish its step and save (it then exits 75)",
    )
    args = ap.parse_args(flags)
    return launch_local.run(command, args.num_processes, args.devices_per_process, args.port, args.grace_s)


if __name__ == "__main__":
    sys.exit(main())
