"""Logic behind the launchers in launch/: argv splitting, shell quoting, and
the builders of the SLURM script, the gcloud TPU VM command and the Kubernetes
manifest (maxscale/launch/commands.py parses the launchers' flags and prints or submits)."""

from __future__ import annotations

import json
import os
import re
import shlex
import string
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from maxscale.errors import ConfigError


def split_command(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Splits `[launcher flags...] -- command...` at the first '--'.

    A ConfigError (one line `<launcher>: error: ...`, exit 2) when there is no
    '--' or no command after it, since every launcher needs a command to run.
    """
    argv = list(argv)
    flags, command = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    if not command and not {"-h", "--help"} & set(flags):
        raise ConfigError("put the command to run after '--', e.g. ... -- python -m maxscale.train")
    return flags, command


def submit(argv: Sequence[str], stdin_text: str | None = None) -> int:
    """Runs a submission tool (sbatch, gcloud, kubectl); returns its exit code."""
    try:
        return subprocess.run(list(argv), input=stdin_text, text=True, check=False).returncode
    except FileNotFoundError:
        print(f"error: {argv[0]} not found on PATH; use --dry-run to print instead.", file=sys.stderr)
        return 127


def shell_join(argv: Sequence[str], variables: dict[str, str] | None = None) -> str:
    """shlex.join, except that each `{placeholder}` in `variables` becomes a
    double-quoted shell expansion, e.g. {'array_index': 'SLURM_ARRAY_TASK_ID'}
    turns '--seed={array_index}' into '--seed="${SLURM_ARRAY_TASK_ID}"'.
    The literal parts stay shlex-quoted, so the result is safe to paste into sh.
    """
    variables = variables or {}
    if not variables:
        return shlex.join(argv)
    pattern = re.compile("|".join(re.escape("{" + n + "}") for n in variables))
    words = []
    for arg in argv:
        pieces, pos = [], 0
        for m in pattern.finditer(arg):
            pieces.append(shlex.quote(arg[pos : m.start()]) if m.start() > pos else "")
            pieces.append('"${' + variables[m.group()[1:-1]] + '}"')
            pos = m.end()
        if not pieces:
            words.append(shlex.quote(arg))
            continue
        if pos < len(arg):
            pieces.append(shlex.quote(arg[pos:]))
        words.append("".join(pieces))
    return " ".join(words)


# --- XLA flags ----------------------------------------------------------------
# Compiler flags that matter for training throughput, set by the launchers (docs/performance.md). They come FIRST in
# XLA_FLAGS / LIBTPU_INIT_ARGS, so any flag the user sets in the job's environment comes later and wins (XLA keeps the
# last value of a repeated flag); MAXSCALE_XLA_DEFAULTS=0 in the launching environment leaves them out entirely.
# Every GPU flag here is accepted by jaxlib 0.10.2 (an unknown flag aborts the process at start).
GPU_XLA_FLAGS = (
    "--xla_gpu_enable_latency_hiding_scheduler=true",  # overlap collectives with compute (FSDP gathers, DP reduces)
    "--xla_gpu_enable_triton_gemm=false",  # cuBLAS for the matmuls
    # combine small collectives (one per layer and weight) into big ones: fewer launches, full bandwidth
    "--xla_gpu_all_reduce_combine_threshold_bytes=134217728",
    "--xla_gpu_all_gather_combine_threshold_bytes=134217728",
    "--xla_gpu_reduce_scatter_combine_threshold_bytes=67108864",
    "--xla_gpu_enable_all_gather_combine_by_dim=false",
    "--xla_gpu_enable_reduce_scatter_combine_by_dim=false",
    # start the next layer's all-gather / the previous layer's reduce-scatter inside the scan over layers
    "--xla_gpu_enable_pipelined_all_gather=true",
    "--xla_gpu_enable_pipelined_reduce_scatter=true",
    "--xla_gpu_enable_pipelined_all_reduce=true",
    "--xla_gpu_enable_while_loop_double_buffering=true",
)
TPU_LIBTPU_FLAGS = (  # MaxText's TPU v5 recipes: async collective fusion, data-parallel all-reduce overlap
    "--xla_tpu_enable_data_parallel_all_reduce_opt=true",
    "--xla_tpu_data_parallel_opt_different_sized_ops=true",
    "--xla_tpu_enable_async_collective_fusion=true",
    "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true",
    "--xla_tpu_enable_async_collective_fusion_multiple_steps=true",
    "--xla_tpu_overlap_compute_collective_tc=true",
    "--xla_enable_async_all_gather=true",
)


def xla_env(platform: str, environ: dict | None = None) -> dict[str, str]:
    """{variable: value} of the default compiler flags for `platform` ('gpu' or 'tpu'; else none), followed by the
    flags already in `environ` (default: this process's environment), which therefore win. Empty when this
    process has MAXSCALE_XLA_DEFAULTS=0."""
    environ = os.environ if environ is None else environ
    if os.environ.get("MAXSCALE_XLA_DEFAULTS", "1") == "0" or platform not in ("gpu", "tpu"):
        return {}
    name, flags = ("XLA_FLAGS", GPU_XLA_FLAGS) if platform == "gpu" else ("LIBTPU_INIT_ARGS", TPU_LIBTPU_FLAGS)
    return {name: " ".join([*flags, *environ.get(name, "").split()])}


def xla_exports(platform: str) -> str:
    """Shell lines exporting the default flags before the job's own (read when the job runs, so a user's
    XLA_FLAGS / LIBTPU_INIT_ARGS in the job environment come last and win)."""
    env = xla_env(platform, environ={})
    return "\n".join(f'export {k}="{v}${{{k}:+ ${k}}}"' for k, v in env.items())


# --- SLURM -------------------------------------------------------------------

SBATCH_TEMPLATE = Path(__file__).resolve().parents[2] / "launch" / "templates" / "sbatch.sh.tmpl"
# Default coordinator port: derived from the job id (like JAX's own SLURM
# detection) so two jobs sharing a head node, e.g. array tasks, don't collide.
JOB_ID_PORT = "$((61440 + SLURM_JOB_ID % 4096))"


def sbatch_script(
    command: Sequence[str],
    nodes: int,
    gpus_per_node: int,
    mode: str = "per_node",
    partition: str = "",
    time: str = "",
    job_name: str = "maxscale",
    array: int = 0,
    port: int = 0,
    template: Path = SBATCH_TEMPLATE,
) -> str:
    """The sbatch script text that runs `command` as one multi-process JAX job.

    mode 'per_node': one process per node owning all `gpus_per_node` GPUs;
    'per_gpu': one process per GPU. `array` > 0 makes a job array 0..array-1,
    and '{array_index}' in the command becomes $SLURM_ARRAY_TASK_ID.
    port 0: derived from SLURM_JOB_ID; else that fixed port.
    """
    if mode not in ("per_node", "per_gpu"):
        raise ValueError(f"mode={mode!r} must be 'per_node' or 'per_gpu'.")
    if nodes < 1 or gpus_per_node < 0 or array < 0:
        raise ValueError("nodes must be >= 1, gpus_per_node >= 0 and array >= 0.")
    if mode == "per_gpu" and gpus_per_node < 1:
        raise ValueError("mode=per_gpu needs gpus_per_node >= 1; use mode=per_node on CPU nodes.")
    if not array and any("{array_index}" in a for a in command):
        raise ValueError("the command uses {array_index}; pass --array=N to make a job array.")
    ntasks = gpus_per_node if mode == "per_gpu" else 1
    options = [f"#SBATCH --gpus-per-node={gpus_per_node}"] if gpus_per_node else []
    options += [f"#SBATCH --partition={partition}"] if partition else []
    options += [f"#SBATCH --time={time}"] if time else []
    options += [f"#SBATCH --array=0-{array - 1}"] if array else []
    if mode == "per_gpu":  # all GPUs of the node are visible to each task; pick one
        local_devices = 'export MAXSCALE_LOCAL_DEVICE_IDS="$SLURM_LOCALID"'
    elif gpus_per_node:
        local_devices = f"export MAXSCALE_LOCAL_DEVICE_IDS={','.join(map(str, range(gpus_per_node)))}"
    else:
        local_devices = ":  # CPU nodes: all local devices"
    if gpus_per_node and xla_exports("gpu"):  # compiler flags of GPU jobs, the user's XLA_FLAGS after them
        local_devices += "\n  " + xla_exports("gpu").replace("\n", "\n  ")
    return string.Template(Path(template).read_text()).substitute(
        job_name=job_name,
        nodes=nodes,
        ntasks_per_node=ntasks,
        sbatch_options="\n".join(options),
        log_file="%x-%A_%a.out" if array else "%x-%j.out",
        port=port or JOB_ID_PORT,
        local_devices=local_devices,
        command=shell_join(command, {"array_index": "SLURM_ARRAY_TASK_ID"}),
    )


# --- Cloud TPU VM --------------------------------------------------------------


def tpu_vm_argv(
    command: Sequence[str],
    tpu_name: str,
    zone: str,
    project: str = "",
    worker: str = "all",
    setup_repo: str = "",
    workdir: str = "",
    xla_flags: bool = False,
    restart_on_preempt: bool = False,
) -> list[str]:
    """argv of `gcloud compute tpus tpu-vm ssh` running `command` on the workers.

    restart_on_preempt: loop on each worker while the command exits 75 (stopped and saved after SIGTERM), so a
    maintenance event that signals the process resumes the run; any other exit code ends the loop with that code.

    setup_repo: a git URL; clones it into `workdir` (default 'maxscale') when
    missing and pip-installs it with jax[tpu] first. workdir: cd there first.
    xla_flags: export the default LIBTPU_INIT_ARGS (TPU_LIBTPU_FLAGS; the workers' own come after them) first.
    """
    remote = shell_join(command)
    if restart_on_preempt:  # 75 = stopped after saving on SIGTERM (maintenance events): run the command again
        remote = (
            f"while :; do {remote}; code=$?; [ $code -eq 75 ] || exit $code; "
            f"echo 'maxscale: preempted (exit 75), restarting' >&2; sleep 10; done"
        )
    if xla_flags and xla_exports("tpu"):
        remote = f"{xla_exports('tpu')} && {remote}"
    if setup_repo:
        workdir = workdir or "maxscale"
        d = shlex.quote(workdir)
        remote = (
            f"(test -d {d} || git clone {shlex.quote(setup_repo)} {d}) && cd {d} && "
            f'python3 -m pip install -q -e . "jax[tpu]" && {remote}'
        )
    elif workdir:
        remote = f"cd {shlex.quote(workdir)} && {remote}"
    argv = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", tpu_name, f"--zone={zone}"]
    argv += [f"--project={project}"] if project else []
    return argv + [f"--worker={worker}", f"--command={remote}"]


def display_argv(argv: Sequence[str]) -> str:
    """Shell-pasteable form of argv that keeps '--flag=value' readable:
    '--command=echo hi' prints as --command='echo hi', not '--command=echo hi'."""
    words = []
    for a in argv:
        flag, eq, value = a.partition("=")
        if eq and flag.startswith("--") and shlex.quote(flag) == flag:
            words.append(f"{flag}={shlex.quote(value)}")
        else:
            words.append(shlex.quote(a))
    return " ".join(words)


# --- Kubernetes ----------------------------------------------------------------

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def _exit_codes(*codes: int) -> dict:
    return {"containerName": "maxscale", "operator": "In", "values": list(codes)}


def k8s_manifest(
    command: Sequence[str],
    name: str,
    image: str,
    num_processes: int,
    gpus_per_process: int = 0,
    tpu_topology: str = "",
    tpu_accelerator: str = "",
    tpu_chips_per_process: int = 4,
    port: int = 8476,
) -> dict:
    """A v1 List: a headless Service plus an Indexed batch/v1 Job of
    `num_processes` pods; pod i is process i and pod 0 is the coordinator,
    reachable as <name>-0.<name>:<port> through the Service."""
    if not _DNS_LABEL.fullmatch(name) or len(name) > 50:
        raise ValueError(
            f"name={name!r} must be lowercase letters, digits and '-', at most 50 chars "
            "(pod hostnames are <name>-<index>)."
        )
    if num_processes < 1:
        raise ValueError(f"num_processes={num_processes} must be >= 1.")
    if tpu_topology and not tpu_accelerator:
        raise ValueError("tpu_topology needs tpu_accelerator, e.g. --tpu_accelerator=tpu-v5p-slice.")
    labels = {"app.kubernetes.io/name": "maxscale", "maxscale/job": name}
    pod_spec = _k8s_pod_spec(
        command,
        name,
        image,
        num_processes,
        gpus_per_process,
        tpu_topology,
        tpu_accelerator,
        tpu_chips_per_process,
        port,
    )
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "labels": labels},
        # Headless, and published before readiness so pod 0's DNS name resolves
        # while the other pods are still starting and retrying the connection.
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {"maxscale/job": name},
            "ports": [{"name": "coordinator", "port": port}],
        },
    }
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "completionMode": "Indexed",
            "completions": num_processes,
            "parallelism": num_processes,
            "backoffLimit": 0,  # one lost process stalls the collectives: fail the whole job
            # ... except a preemption: a pod that exits 75 (saved and stopped after SIGTERM) or is evicted by a
            # node drain/preemption is recreated without counting as a failure, and resumes from its checkpoint;
            # bad input (exit 2) fails the job at once (docs/launch.md, Kubernetes)
            "podFailurePolicy": {
                "rules": [
                    {"action": "Ignore", "onExitCodes": _exit_codes(75)},
                    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
                    {"action": "FailJob", "onExitCodes": _exit_codes(2)},
                ]
            },
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }
    return {"apiVersion": "v1", "kind": "List", "items": [service, job]}


def _k8s_pod_spec(
    command: Sequence[str],
    name: str,
    image: str,
    num_processes: int,
    gpus_per_process: int,
    tpu_topology: str,
    tpu_accelerator: str,
    tpu_chips_per_process: int,
    port: int,
) -> dict:
    """The pod of process i: the coordinator's address and the process id (the Job's completion index) in its
    environment, this environment's XLA flags, and its accelerators (TPU chips with the slice's node selector,
    or GPUs)."""
    env = [
        {"name": "MAXSCALE_COORDINATOR_ADDRESS", "value": f"{name}-0.{name}:{port}"},
        {"name": "MAXSCALE_NUM_PROCESSES", "value": str(num_processes)},
        {
            "name": "MAXSCALE_PROCESS_ID",
            "valueFrom": {
                "fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}
            },
        },
    ]
    platform = "tpu" if tpu_topology else "gpu" if gpus_per_process else ""
    env += [{"name": k, "value": v} for k, v in xla_env(platform).items()]  # this environment's flags win
    container = {
        "name": "maxscale",
        "image": image,
        "command": list(command),
        "env": env,
        "ports": [{"name": "coordinator", "containerPort": port}],
    }
    pod_spec: dict = {"subdomain": name, "restartPolicy": "Never", "containers": [container]}
    if tpu_topology:
        container["resources"] = {"limits": {"google.com/tpu": tpu_chips_per_process}}
        pod_spec["nodeSelector"] = {
            "cloud.google.com/gke-tpu-accelerator": tpu_accelerator,
            "cloud.google.com/gke-tpu-topology": tpu_topology,
        }
    elif gpus_per_process:
        container["resources"] = {"limits": {"nvidia.com/gpu": gpus_per_process}}
    return pod_spec


def k8s_yaml(manifest: dict) -> str:
    """The manifest as YAML; JSON is a subset of YAML, so no YAML library needed."""
    return json.dumps(manifest, indent=2) + "\n"
