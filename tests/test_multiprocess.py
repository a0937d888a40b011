"""Training as 2 processes x 2 CPU devices (launch/local.py, gloo collectives) equals 1 process x 4 devices, and a
checkpoint written by 2 processes resumes in 1.

Both runs use the same mesh (data=2, fsdp=2), so in the 2-process run the fsdp shards of every parameter and the
batch rows really live in different processes, and the checkpoint holds shards written by each of them. The
schedule is constant after a 2-step warmup, so stopping at step 4 and resuming to 6 sees the same learning rates
as the uninterrupted run (`train.steps` sets the horizon of a decaying schedule).
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import xla_flags

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

COMMON = [
    "--config=configs/tiny.py",
    "--config.train.log_every=1",
    "--config.data.max_bytes=300000",
    "--config.train.eval_steps=0",
    "--config.train.sample_tokens=0",
    "--config.checkpoint.every=2",
    "--config.schedule.name=constant",
    "--config.schedule.warmup_steps=2",
    "--config.train.peak_flops=1e12",  # skips the matmul probe: MFU is not what this test checks
    "--config.mesh.data=2",
    "--config.mesh.fsdp=2",
]


def _env(**extra):
    """This environment without any cluster settings: the suite's compile flags with one device (the launcher sets
    its own count) and the run's compilation cache."""
    drop = ("MAXSCALE_", "SLURM_", "TPU_", "MEGASCALE_", "JAX_", "XLA_FLAGS")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop) or "CACHE" in k}  # keep the compile cache
    return {**env, "PYTHONPATH": str(REPO), "XLA_FLAGS": xla_flags(1), **extra}


def train_one_process(workdir, steps, *extra):
    """1 process x 4 simulated devices."""
    cmd = [
        sys.executable,
        "-m",
        "maxscale.train",
        *COMMON,
        f"--workdir={workdir}",
        f"--config.train.steps={steps}",
        *extra,
    ]
    env = _env(XLA_FLAGS=xla_flags(4), JAX_PLATFORMS="cpu")
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def two_process_command(workdir, steps) -> list[str]:
    """2 processes x 2 simulated devices each, one global mesh of 4, through launch/local.py."""
    launcher = [sys.executable, "launch/local.py", "--num_processes=2", "--devices_per_process=2", "--"]
    train = [sys.executable, "-m", "maxscale.train", *COMMON, f"--workdir={workdir}", f"--config.train.steps={steps}"]
    return launcher + train


def train_two_processes(workdir, steps):
    cmd = two_process_command(workdir, steps)
    r = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def losses(workdir) -> dict[int, float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh]
    out = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
    assert len(out) == sum("train/loss" in r for r in rows), "a step was logged twice: two writers?"
    return out


@pytest.fixture(scope="module")
def one_process_6_steps(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("one_process")
    train_one_process(workdir, 6)
    return losses(workdir)


@pytest.fixture(scope="module")
def two_processes_4_steps(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("two_processes")
    return workdir, train_two_processes(workdir, 4)


def test_two_processes_match_one_process_and_only_process_0_writes(one_process_6_steps, two_processes_4_steps):
    workdir, run = two_processes_4_steps
    got = losses(workdir)
    assert sorted(got) == [1, 2, 3, 4]
    np.testing.assert_allclose([got[s] for s in range(1, 5)], [one_process_6_steps[s] for s in range(1, 5)], rtol=1e-5)
    assert got[4] < got[1] - 0.5  # it trained, not just agreed

    # metrics, config and TensorBoard: one writer (process 0); progress lines: process 0 only
    assert sorted(os.listdir(workdir)) == ["checkpoints", "config.json", "metrics.jsonl", "tensorboard"]
    assert len(os.listdir(workdir / "tensorboard")) == 1
    lines = run.stdout.splitlines()
    assert "[p0] step 4/4" in "\n".join(lines)
    assert not any(line.startswith("[p1]") and ("step " in line or "maxscale:" in line) for line in lines)

    # orbax multi-host save: each process wrote its own shards into the same step directory
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
    state_dir = workdir / "checkpoints" / "4" / "state"
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(state_dir))


def test_checkpoint_of_two_processes_resumes_in_one(one_process_6_steps, two_processes_4_steps):
    workdir, _ = two_processes_4_steps
    run = train_one_process(workdir, 6)
    assert "resumed from" in run.stdout and "at step 4" in run.stdout
    got = losses(workdir)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]  # 1-4 by two processes, 5-6 by one
    np.testing.assert_allclose([got[5], got[6]], [one_process_6_steps[5], one_process_6_steps[6]], rtol=1e-5)


def test_mesh_that_replicates_the_batch_across_processes_is_refused(tmp_path):
    """Each process loads only its rows, so a mesh whose batch axes do not split over the processes (here all
    of the mesh is tensor) would need rows no process loaded: one line, exit 2, before anything is written."""
    cmd = [
        sys.executable,
        "launch/local.py",
        "--num_processes=2",
        "--devices_per_process=2",
        "--",
        sys.executable,
        "-m",
        "maxscale.train",
        *COMMON,
        f"--workdir={tmp_path / 'run'}",
        "--config.mesh.data=1",
        "--config.mesh.fsdp=1",
        "--config.mesh.tensor=4",
    ]
    r = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "must split evenly over the 2 processes" in r.stderr
    assert not (tmp_path / "run").exists()


def test_sigterm_to_the_launcher_exits_75_and_the_rerun_continues_the_same_run(tmp_path, one_process_6_steps):
    """A scheduler preempts a 2-process job by signalling the launcher: the children save, the job exits 75 (the
    code to requeue on), no process is left, and the same command resumes: every step equals the uninterrupted run."""
    workdir = tmp_path / "run"
    cmd = two_process_command(workdir, 6)
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # wait until training is under way
        if "[p0] step 2/6" in line or "[p0] step  2/6" in line:
            break
    proc.send_signal(signal.SIGTERM)
    out = proc.stdout.read()
    assert proc.wait(timeout=120) == 75, out
    ps = subprocess.run(["pgrep", "-f", str(workdir)], capture_output=True, text=True)
    assert ps.stdout.strip() == "", "a child outlived the launcher"
    stopped = max(losses(workdir))
    assert 2 <= stopped < 6, out
    r = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    got = losses(workdir)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([got[s] for s in got], [one_process_6_steps[s] for s in got], rtol=1e-5)
