#!/usr/bin/env python3
"""Run a multi-process JAX job on Kubernetes as an Indexed Job + headless Service.

  python launch/k8s.py --name=lm-7b --image=ghcr.io/me/maxscale:latest --num_processes=4 \
      --gpus_per_process=8 --dry-run -- python -m maxscale.train --config=configs/base.py

The manifest is JSON, which is valid YAML; without --dry-run it is piped to
`kubectl apply -f -`."""

import sys

from maxscale.launch import commands

if __name__ == "__main__":
    sys.exit(commands.k8s_main(sys.argv[1:]))
