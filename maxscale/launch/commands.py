"""The launchers' command lines (`maxscale launch-local|launch-slurm|launch-k8s|launch-tpu-vm`, launch/*.py): each
parses its own flags before `--` and hands the command after it to maxscale/launch/common.py or local.py."""

from __future__ import annotations

from maxscale import cli
from maxscale.launch import common as launch_common

LOCAL_DOC = """Run N processes of a command on this host as one multi-process JAX job.

  maxscale launch-local --num_processes=2 --devices_per_process=2 -- python -m maxscale.train ...
  (or python launch/local.py ...; the logic: maxscale/launch/local.py)
"""

SLURM_DOC = """Generate (and submit) an sbatch script for a multi-process JAX job on SLURM.

  maxscale launch-slurm --nodes=2 --gpus_per_node=8 --mode=per_node --dry-run \\
      -- python -m maxscale.train --config=configs/base.py

The script exports MAXSCALE_* from SLURM variables inside srun (it does not rely
on JAX's SLURM auto-detection, which would pin each process to one GPU).
"""

K8S_DOC = """Run a multi-process JAX job on Kubernetes as an Indexed Job + headless Service.

  maxscale launch-k8s --name=lm-7b --image=ghcr.io/me/maxscale:latest --num_processes=4 \\
      --gpus_per_process=8 --dry-run -- python -m maxscale.train --config=configs/base.py

The manifest is JSON, which is valid YAML; without --dry-run it is piped to
`kubectl apply -f -`.
"""

TPU_VM_DOC = """Run a command on every worker of a Cloud TPU VM pod via gcloud ssh.

  maxscale launch-tpu-vm --tpu_name=my-v5p --zone=us-east5-a --project=my-proj --dry-run \\
      -- python -m maxscale.train --config=configs/base.py

JAX detects TPU pods by itself, so no MAXSCALE_* env is set; maxscale's
distributed.initialize() calls jax.distributed.initialize() with no arguments.
"""


@cli.command("launch/local.py")
def local_main(argv: list[str]) -> int:
    from maxscale.launch import local as launch_local

    flags, command = launch_common.split_command(argv)
    ap = cli.Parser("launch/local.py", LOCAL_DOC)
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
    args = ap.parse(flags)
    return launch_local.run(command, args.num_processes, args.devices_per_process, args.port, args.grace_s)


@cli.command("launch/slurm.py")
def slurm_main(argv: list[str]) -> int:
    flags, command = launch_common.split_command(argv)
    ap = cli.Parser("launch/slurm.py", SLURM_DOC)
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
    args = ap.parse(flags)
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


@cli.command("launch/k8s.py")
def k8s_main(argv: list[str]) -> int:
    flags, command = launch_common.split_command(argv)
    ap = cli.Parser("launch/k8s.py", K8S_DOC)
    ap.add_argument("--name", required=True, help="Job and Service name (DNS label)")
    ap.add_argument("--image", required=True)
    ap.add_argument("--num_processes", type=int, required=True, help="pods; one JAX process each")
    ap.add_argument("--gpus_per_process", type=int, default=0)
    ap.add_argument("--tpu_topology", default="", help="e.g. 2x2x2; adds GKE TPU node selectors")
    ap.add_argument("--tpu_accelerator", default="", help="e.g. tpu-v5p-slice (with --tpu_topology)")
    ap.add_argument("--tpu_chips_per_process", type=int, default=4)
    ap.add_argument("--port", type=int, default=8476, help="coordinator port on pod 0")
    ap.add_argument("--dry-run", action="store_true", help="print the manifest instead of applying it")
    args = ap.parse(flags)
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


@cli.command("launch/tpu_vm.py")
def tpu_vm_main(argv: list[str]) -> int:
    flags, command = launch_common.split_command(argv)
    ap = cli.Parser("launch/tpu_vm.py", TPU_VM_DOC)
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
    args = ap.parse(flags)
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
