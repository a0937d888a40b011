#!/usr/bin/env python3
"""Generate (and submit) an sbatch script for a multi-process JAX job on SLURM.

  python launch/slurm.py --nodes=2 --gpus_per_node=8 --mode=per_node --dry-run \
      -- python -m maxscale.train --config=configs/base.py

The script exports MAXSCALE_* from SLURM variables inside srun (it does not rely
on JAX's SLURM auto-detection, which would pin each process to one GPU)."""

import sys

from maxscale.launch import commands

if __name__ == "__main__":
    sys.exit(commands.slurm_main(sys.argv[1:]))
