"""A full disk during a save (docs/reliability.md section 3): real processes, real write failures.

A run is killed during its second persistent save (fault point persistent_save@2: checkpoint 4 committed, 8 not),
then resumed where writes fail: under RLIMIT_FSIZE (EFBIG, the same path through orbax and tensorstore as ENOSPC) and,
where a user and mount namespace can be made, on a tmpfs too small for checkpoint 8 (ENOSPC, a real full disk). The
run must stop with one line naming the checkpoint directory, the OS error and the fix, exit 74, checkpoint 4 intact
(its manifest verifies) and nothing that looks like a step 8; the same command without the limit then resumes from
4 and ends bitwise equal to the uninterrupted run.
"""

import os
import shutil
import signal
import subprocess
import sys

import pytest
from conftest import ROOT, xla_flags

from maxscale import errors
from maxscale.tools import chaos, chaos_moments
from maxscale.train import checkpoint, faults

# saves at 4, 8 and 12 (no local tier), evals at 6 and 12
ARGS = [
    f"--config={os.path.join(ROOT, 'configs', 'tiny.py')}",
    *chaos_moments.MOMENT_OVERRIDES,
    "--config.checkpoint.local_every=0",
]
LIMIT = 256 << 10  # bytes per file: above metrics.jsonl, config.json and compiled-code cache entries, below the
# checkpoint's array data file (about 1 MB)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(environment of the children, records and final state of the uninterrupted run)."""
    env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS=xla_flags(1))
    env.pop(faults.FAULT_ENV, None)
    workdir = str(tmp_path_factory.mktemp("reference"))
    r = subprocess.run(_command(workdir), env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return env, chaos.read_records(workdir), chaos.final_state(workdir)


def _command(workdir: str) -> list[str]:
    return [sys.executable, "-m", "maxscale.train", *ARGS, f"--workdir={workdir}"]


def _killed_at_the_second_save(workdir: str, env: dict) -> None:
    r = subprocess.run(_command(workdir), env=dict(env, MAXSCALE_FAULT="persistent_save@2"), capture_output=True)
    assert r.returncode == -signal.SIGKILL and checkpoint.committed_steps(os.path.join(workdir, "checkpoints")) == [4]


def _check_failed_save(stderr: str, listing: list[str], cause: str, ckpt_dir: str) -> None:
    """One error line (all of stderr), naming the directory, the step that is intact, the OS error and the fix;
    nothing in the checkpoint directory that looks like a step 8."""
    errors_said = [line for line in stderr.splitlines() if line.startswith("maxscale.train: error:")]
    assert errors_said == stderr.strip().splitlines(), stderr[-3000:]  # that line is all of stderr (orbax_quiet)
    assert errors_said[0] == (
        f"maxscale.train: error: saving the checkpoint at step 8 in {ckpt_dir} failed ({cause}); the checkpoint at "
        "step 4 is intact; fix the cause (disk space, permissions) and rerun the same command to resume"
    )
    assert "4" in listing and all(name == "4" or name.startswith("8.orbax-checkpoint-tmp") for name in listing), listing


def _check_resumed_exactly(workdir: str, stdout: str, reference) -> None:
    _, ref_records, (ref_step, ref_state) = reference
    assert f"resumed from {workdir}/checkpoints at step 4" in stdout
    records = chaos.read_records(workdir)
    assert records.keys() == ref_records.keys() and chaos.compare_records(records, ref_records)[1] == []
    step, state = chaos.final_state(workdir)
    assert step == ref_step == 12 and chaos.same_state(state, ref_state)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["12", "8"]  # the tmp leftover is cleaned


@pytest.mark.slow
def test_a_file_size_limit_during_a_save_stops_with_one_line_and_the_rerun_resumes_exactly(tmp_path, reference):
    env, ref_records, _ = reference
    workdir = str(tmp_path / "run")
    ckpt_dir = os.path.join(workdir, "checkpoints")
    _killed_at_the_second_save(workdir, env)

    # The child ignores SIGXFSZ, limits itself and execs the trainer (no preexec_fn: fork in a threaded process), so
    # writes past LIMIT fail with EFBIG instead of killing the process.
    limited = [
        sys.executable,
        "-c",
        f"import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({LIMIT}, {LIMIT})); "
        "os.execv(sys.executable, sys.argv[1:])",
        *_command(workdir),
    ]
    # The limit holds for every file the process writes: it reads the run's compilation cache but writes no entry
    # (one over LIMIT would add jax's warning to stderr; a program compiled under 0.1 s before may take longer now).
    no_cache_writes = dict(env, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="1e9")
    r = subprocess.run(limited, env=no_cache_writes, capture_output=True, text=True, timeout=600)
    assert r.returncode == errors.EXIT_CHECKPOINT == 74, r.stderr[-3000:]
    _check_failed_save(r.stderr, os.listdir(ckpt_dir), "OSError: [Errno 27] File too large", ckpt_dir)
    checkpoint.verify_manifest(os.path.join(ckpt_dir, "4"))  # the previous checkpoint, every byte as hashed
    assert chaos.compare_records(chaos.read_records(workdir), ref_records)[1] == []  # what it logged is right

    r = subprocess.run(_command(workdir), env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    _check_resumed_exactly(workdir, r.stdout, reference)


def _namespaces_work() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = "d=$(mktemp -d) && mount -t tmpfs -o size=1m tmpfs $d && umount $d && rmdir $d"
    return subprocess.run(["unshare", "-rm", "sh", "-c", probe], capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _namespaces_work(), reason="cannot mount a tmpfs in a user and mount namespace here")
def test_a_full_tmpfs_during_a_save_stops_with_one_line_and_the_rerun_resumes_exactly(tmp_path, reference):
    """The three attempts run in one mount namespace, on a tmpfs mounted over <workdir>/checkpoints: 2 MiB (checkpoint
    4 is about 1.3 MiB, so 8 cannot be written beside it), then remounted at 64 MiB for the rerun. The checkpoints
    are copied out before the namespace ends."""
    env, ref_records, _ = reference
    workdir = str(tmp_path / "run")
    ckpt_dir = os.path.join(workdir, "checkpoints")
    py = " ".join(_command(workdir))
    script = f"""
        mkdir -p {ckpt_dir} && mount -t tmpfs -o size=2m tmpfs {ckpt_dir} || exit 90
        MAXSCALE_FAULT=persistent_save@2 {py} > {tmp_path}/1.out 2> {tmp_path}/1.err; echo $? > {tmp_path}/1.rc
        {py} > {tmp_path}/2.out 2> {tmp_path}/2.err; echo $? > {tmp_path}/2.rc
        ls {ckpt_dir} > {tmp_path}/2.ls; cp -a {ckpt_dir}/4 {tmp_path}/4-after-full
        mount -o remount,size=64m {ckpt_dir} || exit 91
        {py} > {tmp_path}/3.out 2> {tmp_path}/3.err; echo $? > {tmp_path}/3.rc
        cp -a {ckpt_dir} {tmp_path}/saved && umount {ckpt_dir} && cp -a {tmp_path}/saved/. {ckpt_dir}/
    """
    r = subprocess.run(["unshare", "-rm", "bash", "-c", script], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr

    def read(name: str) -> str:
        return (tmp_path / name).read_text()

    assert read("1.rc").strip() == str(128 + signal.SIGKILL)
    assert read("2.rc").strip() == "74", read("2.err")[-3000:]
    _check_failed_save(read("2.err"), read("2.ls").split(), "OSError: [Errno 28] No space left on device", ckpt_dir)
    checkpoint.verify_manifest(str(tmp_path / "4-after-full"))
    assert read("3.rc").strip() == "0", read("3.err")[-3000:]
    _check_resumed_exactly(workdir, read("3.out"), reference)


def test_the_sibling_writes_of_a_failed_save_say_nothing_more():
    """A full disk fails every fragment write of a save at once: orbax raises one, and asyncio reports the others
    as `_GatheringFuture exception was never retrieved` when they are collected (seen once in a fresh-clone run of
    the test above, 30 lines after the one-line error). Those records are dropped when the exception was raised in
    orbax; the same message for anything else still passes."""
    import logging

    from maxscale.train import orbax_quiet

    def record_of(filename: str) -> logging.LogRecord:
        code = compile("raise ValueError('OUT_OF_RANGE: Error writing step/0: File too large')", filename, "exec")
        try:
            exec(code, {})
        except ValueError:
            exc_info = sys.exc_info()
        text = "_GatheringFuture exception was never retrieved\nfuture: <_GatheringFuture finished exception=...>"
        return logging.LogRecord("asyncio", logging.ERROR, "base_events.py", 1, text, None, exc_info)

    quiet = orbax_quiet._LostTask()
    site = os.path.join("site-packages", "orbax", "checkpoint", "_src", "serialization", "serialization.py")
    assert not quiet.filter(record_of(site))
    assert quiet.filter(record_of(os.path.join("site-packages", "mylib", "io.py")))
    other = logging.LogRecord("asyncio", logging.ERROR, "x.py", 1, "Unclosed client session", None, None)
    assert quiet.filter(other)
