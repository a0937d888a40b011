#!/usr/bin/env python3
"""Run a multi-process JAX job on Kubernetes as an Indexed Job + headless Service.

  python launch/k8s.py --name=lm-7b --image=ghcr.io/me/maxscale:latest --num_processes=4 \
      --gpus_per_process=8 --dry-run -- python -m maxscale.train --config=configs/base.py

The manifest is JSON, which is valid YAML; without --dry-run it is piped to
`kubectl apply -f -`.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root

from maxscale.launch import common as launch_common  # noqa: E402


def main(argv=None) -> int:
    flags, command = launch_common.split_command(sys.argv[1:] if argv is None else argv)
    ap = launch_common.OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True, help="Job and Service name (DNS label)")
    ap.add_argument("--image", required=True)
    ap.add_argument("--num_processes", type=int, required=True, help="pods; one JAX process each")
    ap.add_argument("--gpus_per_process", type=int, default=0)
    ap.add_argument("--tpu_topology", default="", help="e.g. 2x2x2; adds GKE TPU node selectors")
    ap.add_argument("--tpu_accelerator", default="", help="e.g. tpu-v5p-slice (with --tpu_topology)")
    ap.add_argument("--tpu_chips_per_process", type=int, default=4)
    ap.add_argument("--port", type=int, default=8476, help="coordinator port on pod 0")
    ap.add_argument("--dry-run", action="store_true", help="print the manifest instead of applying it")
    args = ap.parse_args(flags)
    try:
        manifest = launch_common.k8s_manifest(
            command,
            args.name,
            args.image,
            args.num_processes,
            gpus_per_process=args.gpus_per_process,
            tpu_topology=args.tpu_topology,
            tpu_accelerator=args.tpu_accelerator,
            tpu_chips_per_process=args.tpu_chips_per_process,
            port=args.port,
        )
    except ValueError as e:
        ap.error(str(e))
    text = launch_common.k8s_yaml(manifest)
    if args.dry_run:
        print(text, end="")
        return 0
    return launch_common.submit(["kubectl", "apply", "-f", "-"], text)


if __name__ == "__main__":
    sys.exit(main())
