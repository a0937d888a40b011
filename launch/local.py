#!/usr/bin/env python3
"""Run N processes of a command on this host as one multi-process JAX job.

  python launch/local.py --num_processes=2 --devices_per_process=2 -- python -m maxscale.train ...

Logic lives in maxscale/launch/local.py; this file only parses arguments."""

import sys

from maxscale.launch import commands

if __name__ == "__main__":
    sys.exit(commands.local_main(sys.argv[1:]))
