#!/usr/bin/env python3
"""Run a command on every worker of a Cloud TPU VM pod via gcloud ssh.

  python launch/tpu_vm.py --tpu_name=my-v5p --zone=us-east5-a --project=my-proj --dry-run \
      -- python -m maxscale.train --config=configs/base.py

JAX detects TPU pods by itself, so no MAXSCALE_* env is set; maxscale's
distributed.initialize() calls jax.distributed.initialize() with no arguments.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root

from maxscale.launch import common as launch_common  # noqa: E402


def main(argv=None) -> int:
    flags, command = launch_common.split_command(sys.argv[1:] if argv is None else argv)
    ap = launch_common.OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tpu_name", required=True)
    ap.add_argument("--zone", required=True)
    ap.add_argument("--project", default="", help="default: gcloud's configured project")
    ap.add_argument("--worker", default="all", help="'all' runs on every host, as multi-host JAX needs")
    ap.add_argument(
        "--setup", action="store_true", help="first clone --repo_url into --workdir (if missing) and pip install it"
    )
    ap.add_argument("--repo_url", default="", help="git URL cloned by --setup")
    ap.add_argument("--workdir", default="", help="cd here before the command (--setup default: maxscale)")
    ap.add_argument(
        "--restart_on_preempt",
        action="store_true",
        help="rerun the command on each worker while it exits 75 (stopped and saved after SIGTERM)",
    )
    ap.add_argument("--dry-run", action="store_true", help="print the gcloud command instead of running it")
    args = ap.parse_args(flags)
    if args.setup and not args.repo_url:
        ap.error("--setup needs --repo_url")
    argv = launch_common.tpu_vm_argv(
        command,
        args.tpu_name,
        args.zone,
        args.project,
        args.worker,
        setup_repo=args.repo_url if args.setup else "",
        workdir=args.workdir,
        restart_on_preempt=args.restart_on_preempt,
    )
    if args.dry_run:
        print(launch_common.display_argv(argv))
        return 0
    return launch_common.submit(argv)


if __name__ == "__main__":
    sys.exit(main())
