"""Launchers (dry runs, a fake-srun run of the sbatch script, a real 2x2
multi-process CPU job). maxscale.parallel.distributed.initialize: test_distributed.py."""

import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from maxscale.launch import common as launch_common  # noqa: E402

# Env that would change what the launchers or initialize() do; removed from
# child processes and from the in-process initialize() tests.
_CLUSTER_ENV_PREFIXES = ("MAXSCALE_", "SLURM_", "TPU_", "MEGASCALE_", "JAX_", "XLA_FLAGS")


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(_CLUSTER_ENV_PREFIXES)}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def _run_launcher(script, *args, timeout=60, **env):
    return subprocess.run(
        [sys.executable, str(REPO / "launch" / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_clean_env(**env),
        cwd=REPO,
    )


# --- SLURM ---------------------------------------------------------------------


def test_slurm_dry_run_per_gpu_array():
    r = _run_launcher(
        "slurm.py",
        "--nodes=2",
        "--gpus_per_node=4",
        "--mode=per_gpu",
        "--array=3",
        "--partition=gpu",
        "--time=02:00:00",
        "--job_name=sweep",
        "--dry-run",
        "--",
        "python",
        "-m",
        "maxscale.train",
        "--config.seed={array_index}",
        "a b",
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    for expected in (
        "#SBATCH --job-name=sweep",
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=02:00:00",
        "#SBATCH --array=0-2",
        "#SBATCH --output=%x-%A_%a.out",
        'export MAXSCALE_LOCAL_DEVICE_IDS="$SLURM_LOCALID"',
        'export MAXSCALE_PROCESS_ID="$SLURM_PROCID"',
        'export MAXSCALE_NUM_PROCESSES="$SLURM_NTASKS"',
        "srun --nodes=2 --ntasks-per-node=4 --kill-on-bad-exit=1 bash -c maxscale_task || code=$?",
        "#SBATCH --requeue",
    ):
        assert expected in [l.strip() for l in lines], expected
    assert "exec python -m maxscale.train --config.seed=\"${SLURM_ARRAY_TASK_ID}\" 'a b'" in r.stdout
    assert 'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)' in r.stdout
    assert subprocess.run(["bash", "-n"], input=r.stdout, text=True).returncode == 0


def test_slurm_dry_run_per_node_writes_output(tmp_path):
    out = tmp_path / "job.sbatch"
    r = _run_launcher(
        "slurm.py",
        "--nodes=4",
        "--gpus_per_node=8",
        "--mode=per_node",
        "--port=12345",
        f"--output={out}",
        "--dry-run",
        "--",
        "python",
        "-m",
        "maxscale.train",
    )
    assert r.returncode == 0, r.stderr
    assert out.read_text() == r.stdout
    assert "#SBATCH --ntasks-per-node=1" in r.stdout
    assert "export MAXSCALE_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in r.stdout
    assert 'MAXSCALE_COORDINATOR_ADDRESS="${head_node}:12345"' in r.stdout
    assert "--array" not in r.stdout and "#SBATCH --output=%x-%j.out" in r.stdout


def test_slurm_array_placeholder_needs_array():
    r = _run_launcher("slurm.py", "--dry-run", "--", "python", "x.py", "--seed={array_index}")
    assert r.returncode == 2 and "--array" in r.stderr


def test_slurm_script_runs_under_fake_srun(tmp_path):
    """Executes the generated script with stub scontrol/srun: checks the quoting
    and that each task sees its own MAXSCALE_* values."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho node-a\necho node-b\n")
    (bin_dir / "srun").write_text(
        textwrap.dedent("""\
      #!/bin/bash
      nodes=1; tpn=1
      while [[ $1 == --* ]]; do
        case $1 in --nodes=*) nodes=${1#*=};; --ntasks-per-node=*) tpn=${1#*=};; esac; shift
      done
      n=$((nodes * tpn))
      for ((i = 0; i < n; i++)); do
        SLURM_PROCID=$i SLURM_LOCALID=$((i % tpn)) SLURM_NTASKS=$n "$@" || exit $?
      done
      """)
    )
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    probe = (
        "import os, sys; e = os.environ; print(e['MAXSCALE_PROCESS_ID'], e['MAXSCALE_NUM_PROCESSES'],"
        " e['MAXSCALE_COORDINATOR_ADDRESS'], e['MAXSCALE_LOCAL_DEVICE_IDS'], sys.argv[1:])"
    )
    script = launch_common.sbatch_script(
        [sys.executable, "-c", probe, "--seed={array_index}", "it's"], nodes=2, gpus_per_node=2, mode="per_gpu", array=4
    )
    (tmp_path / "job.sh").write_text(script)
    env = _clean_env(
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        SLURM_JOB_NODELIST="node-[a-b]",
        SLURM_JOB_ID="7",
        SLURM_ARRAY_TASK_ID="2",
    )
    r = subprocess.run(["bash", str(tmp_path / "job.sh")], capture_output=True, text=True, env=env, timeout=30)
    assert r.returncode == 0, r.stderr
    port = 61440 + 7
    assert r.stdout.splitlines() == [f"{i} 4 node-a:{port} {i % 2} ['--seed=2', \"it's\"]" for i in range(4)]


@pytest.mark.parametrize("child_code,requeued", [(75, True), (1, False), (0, False)])
def test_slurm_script_requeues_on_75_only(tmp_path, child_code, requeued):
    """Stand-in srun/scontrol: the job exits with its task's code and calls `scontrol requeue` only on 75."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "scontrol.log"
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\necho "$@" >> {log}\n[ "$1" = show ] && echo node-a\nexit 0\n')
    srun = '#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\nSLURM_PROCID=0 SLURM_NTASKS=1 "$@"\n'
    (bin_dir / "srun").write_text(srun)
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    script = launch_common.sbatch_script(
        [sys.executable, "-c", f"raise SystemExit({child_code})"], nodes=1, gpus_per_node=1
    )
    assert "#SBATCH --requeue" in script
    (tmp_path / "job.sh").write_text(script)
    env = _clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="node-a", SLURM_JOB_ID="42")
    r = subprocess.run(["bash", str(tmp_path / "job.sh")], capture_output=True, text=True, env=env, timeout=30)
    assert r.returncode == child_code, r.stderr
    assert ("requeue 42" in log.read_text()) == requeued


# --- Cloud TPU VM --------------------------------------------------------------


def test_tpu_vm_dry_run():
    r = _run_launcher(
        "tpu_vm.py",
        "--tpu_name=my-v5p",
        "--zone=us-east5-a",
        "--project=proj",
        "--worker=all",
        "--dry-run",
        "--",
        "python",
        "-m",
        "maxscale.train",
        "--config.name=a b",
    )
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip()
    assert line == (
        "gcloud compute tpus tpu-vm ssh my-v5p --zone=us-east5-a --project=proj --worker=all "
        "--command='python -m maxscale.train '\"'\"'--config.name=a b'\"'\"''"
    )
    argv = shlex.split(line)  # what a shell would pass to gcloud
    assert argv[-1] == "--command=python -m maxscale.train '--config.name=a b'"
    assert shlex.split(argv[-1].split("=", 1)[1]) == ["python", "-m", "maxscale.train", "--config.name=a b"]


def test_tpu_vm_setup_prepends_clone_and_install():
    argv = launch_common.tpu_vm_argv(
        ["python", "-m", "maxscale.train"], "t", "z", setup_repo="https://example.com/maxscale.git"
    )
    remote = argv[-1].removeprefix("--command=")
    assert remote.startswith(
        "(test -d maxscale || git clone https://example.com/maxscale.git maxscale)"
        " && cd maxscale && python3 -m pip install"
    )
    assert remote.endswith("&& python -m maxscale.train")
    assert "--project" not in " ".join(argv)


# --- Kubernetes ----------------------------------------------------------------


def _env_by_name(container):
    return {e["name"]: e for e in container["env"]}


def test_k8s_dry_run_gpu():
    r = _run_launcher(
        "k8s.py",
        "--name=lm-7b",
        "--image=ghcr.io/x/maxscale:1",
        "--num_processes=4",
        "--gpus_per_process=8",
        "--dry-run",
        "--",
        "python",
        "-m",
        "maxscale.train",
    )
    assert r.returncode == 0, r.stderr
    manifest = json.loads(r.stdout)
    service, job = manifest["items"]
    assert (service["kind"], job["kind"], job["apiVersion"]) == ("Service", "Job", "batch/v1")
    assert service["spec"]["clusterIP"] == "None"
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == 4
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == service["metadata"]["name"] == "lm-7b"
    assert service["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    (container,) = pod["containers"]
    assert container["command"] == ["python", "-m", "maxscale.train"]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 8}
    env = _env_by_name(container)
    assert env["MAXSCALE_COORDINATOR_ADDRESS"]["value"] == "lm-7b-0.lm-7b:8476"
    assert env["MAXSCALE_NUM_PROCESSES"]["value"] == "4"
    assert env["MAXSCALE_PROCESS_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    )


def test_k8s_tpu_selectors_and_bad_name():
    m = launch_common.k8s_manifest(
        ["python", "t.py"], "tpu-job", "img", 2, tpu_topology="2x2x2", tpu_accelerator="tpu-v5p-slice"
    )
    pod = m["items"][1]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {
        "cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
        "cloud.google.com/gke-tpu-topology": "2x2x2",
    }
    assert pod["containers"][0]["resources"]["limits"] == {"google.com/tpu": 4}
    with pytest.raises(ValueError, match="name="):
        launch_common.k8s_manifest(["x"], "Bad_Name", "img", 2)


# --- launch/local.py: real processes -------------------------------------------


def test_local_launcher_env_helpers():
    flags = launch_common.split_command(["--n=2", "--", "python", "--", "x"])
    assert flags == (["--n=2"], ["python", "--", "x"])
    from maxscale.launch import local as launch_local

    assert launch_local.merge_xla_flags("--xla_foo=1 --xla_force_host_platform_device_count=8", 2) == (
        "--xla_foo=1 --xla_force_host_platform_device_count=2"
    )
    env = launch_local.child_env({"XLA_FLAGS": "--a"}, "127.0.0.1:5", 3, 1, 4)
    assert (
        env["MAXSCALE_COORDINATOR_ADDRESS"],
        env["MAXSCALE_NUM_PROCESSES"],
        env["MAXSCALE_PROCESS_ID"],
        env["JAX_PLATFORMS"],
    ) == ("127.0.0.1:5", "3", "1", "cpu")
    assert env["XLA_FLAGS"] == "--a --xla_force_host_platform_device_count=4"


_COLLECTIVE_SCRIPT = """\
import json, os, pathlib, sys
import numpy as np
from maxscale.parallel import distributed
distributed.initialize()  # before any other JAX use
import jax, jax.numpy as jnp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

mesh = jax.make_mesh((jax.device_count(),), ("data",))
pid = jax.process_index()
# Process p holds elements [2p, 2p+1] of the global (4,) array [1, 2, 3, 4].
local = np.arange(2 * pid, 2 * pid + 2, dtype=np.float32) + 1
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local, (4,))
total = jax.jit(jnp.sum)(x)
ids = multihost_utils.process_allgather(np.int32(pid))
result = {"describe": distributed.describe(), "primary": distributed.is_primary(), "global_sum": float(total),
          "ids": ids.tolist(), "env_id": int(os.environ["MAXSCALE_PROCESS_ID"])}
# Each process writes its own file (whole, then renamed): the test reads results, not interleaved output lines.
out = pathlib.Path(sys.argv[1]) / f"p{pid}.json"
out.with_suffix(".tmp").write_text(json.dumps(result))
os.replace(out.with_suffix(".tmp"), out)
"""


def test_local_launcher_real_collective(tmp_path):
    """Two processes form one JAX job and run a real cross-process sum and allgather. Each child reports through its
    own file, so neither Gloo's log lines on the shared pipes nor a loaded machine's timing can hide a result."""
    script = tmp_path / "collective.py"
    script.write_text(_COLLECTIVE_SCRIPT)
    r = _run_launcher(
        "local.py",
        "--num_processes=2",
        "--devices_per_process=2",
        "--",
        sys.executable,
        str(script),
        str(tmp_path),
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    for i in range(2):
        got = json.loads((tmp_path / f"p{i}.json").read_text())
        assert got == {
            "describe": f"process {i}/2 | local devices 2 | global devices 4 | platform cpu",
            "primary": i == 0,
            "global_sum": 10.0,
            "ids": [0, 1],
            "env_id": i,
        }


def test_local_launcher_failure_stops_others(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text(
        textwrap.dedent("""\
      import os, sys, time
      if os.environ["MAXSCALE_PROCESS_ID"] == "1":
        print("failing", flush=True)
        sys.exit(3)
      time.sleep(60)
      """)
    )
    t0 = time.monotonic()
    r = _run_launcher("local.py", "--num_processes=2", "--", sys.executable, str(script), timeout=30)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "[p1] failing" in r.stdout
    assert time.monotonic() - t0 < 10  # p0 was terminated, not waited for


def test_local_launcher_kills_after_grace_and_forwards_sigterm(tmp_path):
    # Children ignore SIGTERM: the launcher must SIGKILL them after --grace_s.
    script = tmp_path / "stubborn.py"
    script.write_text(
        textwrap.dedent("""\
      import signal, time
      signal.signal(signal.SIGTERM, signal.SIG_IGN)
      print("ready", flush=True)
      time.sleep(60)
      """)
    )
    p = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "launch" / "local.py"),
            "--num_processes=2",
            "--grace_s=1",
            "--",
            sys.executable,
            str(script),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=_clean_env(),
        cwd=REPO,
    )
    seen = set()
    while len(seen) < 2:  # both children are up (and so are the launcher's handlers)
        line = p.stdout.readline()
        assert line, "launcher exited early"
        seen.add(line.split()[0])
    t0 = time.monotonic()
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=15) == 128 + signal.SIGTERM
    assert time.monotonic() - t0 < 8


def test_k8s_job_restarts_preempted_pods_and_fails_on_bad_input():
    job = launch_common.k8s_manifest(["python", "-m", "maxscale.train"], "run", "img", 2)["items"][1]["spec"]
    rules = job["podFailurePolicy"]["rules"]
    by_code = {tuple(r["onExitCodes"]["values"]): r["action"] for r in rules if "onExitCodes" in r}
    assert by_code == {(75,): "Ignore", (2,): "FailJob"} and job["backoffLimit"] == 0
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]} in rules
    assert job["template"]["spec"]["restartPolicy"] == "Never"  # required by podFailurePolicy


@pytest.mark.parametrize("codes,expected", [((75, 75, 0), 0), ((75, 1, 0), 1), ((3, 0), 3)])
def test_tpu_vm_restart_loop_reruns_on_75_only(tmp_path, codes, expected):
    """The remote command of --restart_on_preempt, run by bash with a stand-in that exits with the next code. Each
    case has a 0 after its last expected run, so a loop that also restarted on other codes would run it too."""
    script = tmp_path / "step.sh"
    script.write_text(
        f"n=$(cat {tmp_path}/n 2>/dev/null || echo 0); echo $((n+1)) > {tmp_path}/n\n"
        f"codes=({' '.join(map(str, codes))}); exit ${{codes[$n]}}\n"
    )
    argv = launch_common.tpu_vm_argv(["bash", str(script)], "t", "z", restart_on_preempt=True)
    remote = argv[-1].removeprefix("--command=").replace("sleep 10", "sleep 0")
    r = subprocess.run(["bash", "-c", remote], capture_output=True, text=True, timeout=30)
    runs = next(i for i, c in enumerate(codes) if c != 75) + 1  # every 75 reruns; the first other code stops
    assert int((tmp_path / "n").read_text()) == runs, r.stderr
    assert r.returncode == expected
    assert r.stderr.count("preempted (exit 75), restarting") == codes.count(75)
