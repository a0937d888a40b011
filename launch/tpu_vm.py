#!/usr/bin/env python3
"""Run a command on every worker of a Cloud TPU VM pod via gcloud ssh.

  python launch/tpu_vm.py --tpu_name=my-v5p --zone=us-east5-a --project=my-proj --dry-run \
      -- python -m maxscale.train --config=configs/base.py

JAX detects TPU pods by itself, so no MAXSCALE_* env is set; maxscale's
distributed.initialize() calls jax.distributed.initialize() with no arguments."""

import sys

from maxscale.launch import commands

if __name__ == "__main__":
    sys.exit(commands.tpu_vm_main(sys.argv[1:]))
