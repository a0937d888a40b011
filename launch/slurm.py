#!/usr/bin/env python3
"""Generate (and submit) an sbatch script for a multi-process JAX job on SLURM.

  python launch/slurm.py --nodes=2 --gpus_per_node=8 --mode=per_node --dry-run \
      -- python -m maxscale.train --config=configs/base.py

The script exports MAXSCALE_* from SLURM variables inside srun (it does not rely
on JAX's SLURM auto-detection, which would pin each process to one GPU).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root

from maxscale.launch import common as launch_common  # noqa: E402


def main(argv=None) -> int:
    flags, command = launch_common.split_command(sys.argv[1:] if argv is None else argv)
    ap = launch_common.OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpus_per_node", type=int, default=8)
    ap.add_argument(
        "--mode",
        choices=("per_node", "per_gpu"),
        default="per_node",
        help="one process per node owning all its GPUs, or one process per GPU",
    )
    ap.add_argument("--partition", default="")
    ap.add_argument("--time", default="", help="e.g. 24:00:00")
    ap.add_argument("--job_name", default="maxscale")
    ap.add_argument(
        "--array",
        type=int,
        default=0,
        help="job array of N tasks; {array_index} in the command becomes $SLURM_ARRAY_TASK_ID",
    )
    ap.add_argument("--port", type=int, default=0, help="coordinator port; 0 derives it from SLURM_JOB_ID")
    ap.add_argument("--output", default="", help="write the script to this file")
    ap.add_argument("--dry-run", action="store_true", help="print the script instead of calling sbatch")
    args = ap.parse_args(flags)
    try:
        script = launch_common.sbatch_script(
            command,
            nodes=args.nodes,
            gpus_per_node=args.gpus_per_node,
            mode=args.mode,
            partition=args.partition,
            time=args.time,
            job_name=args.job_name,
            array=args.array,
            port=args.port,
        )
    except ValueError as e:
        ap.error(str(e))
    if args.output:
        with open(args.output, "w") as f:
            f.write(script)
    if args.dry_run:
        print(script, end="")
        return 0
    return launch_common.submit(["sbatch", args.output] if args.output else ["sbatch"], None if args.output else script)


if __name__ == "__main__":
    sys.exit(main())
