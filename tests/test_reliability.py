"""Reliability guarantees (docs/reliability.md): exact resume, preemption, corrupted checkpoints, failed saves,
topology changes, non-finite steps, loss spikes, and the chaos tool.

In-process runs share one compiled Setup per program (runs then take about a second); the subprocess cases at the
end share a JAX compilation cache.
"""

import contextlib
import errno
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import ROOT, one_device_mesh, tiny_config, xla_flags

from maxscale import errors
from maxscale.parallel import sharding
from maxscale.tools import chaos
from maxscale.train import checkpoint as ckpt_lib
from maxscale.train import data as data_lib
from maxscale.train import faults, loop
from maxscale.train import step as step_lib

BASE = {
    "train.steps": 24,
    "train.log_every": 1,
    "checkpoint.every": 4,
    "checkpoint.max_to_keep": 2,
    "train.eval_every": 12,
    "train.eval_steps": 1,
    "train.sample_tokens": 0,
}
_SETUPS = {}


def make_trainer(workdir, corpus, mesh=None, **overrides):
    """A Trainer on BASE + overrides; runs of the same program share one Setup (compiled once per module)."""
    cfg = tiny_config(**{**BASE, **overrides})
    mesh = mesh if mesh is not None else one_device_mesh(cfg)
    key = (cfg.train.debug_nan_at_step, tuple(d.id for d in mesh.devices.flat), tuple(mesh.shape.items()))
    if key not in _SETUPS:
        _SETUPS[key] = step_lib.Setup.build(cfg, mesh)
    return loop.Trainer(cfg, str(workdir), corpus=corpus, setup=_SETUPS[key])


def host(state):
    return jax.tree.map(np.asarray, jax.device_get(state))


@contextlib.contextmanager
def before_step(trainer, hook):
    """Calls hook(n) before the n-th train step (n = 1, 2, ...) of the runs inside the block."""
    original, calls = trainer.setup.train_step, [0]

    def wrapped(state, batch):
        calls[0] += 1
        hook(calls[0])
        return original(state, batch)

    trainer.setup.train_step = wrapped
    try:
        yield
    finally:
        trainer.setup.train_step = original


class Crash(Exception):
    pass


def crash_at(n):
    def hook(call):
        if call == n:
            raise Crash

    return hook


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_corpus):
    """An uninterrupted 24-step run: (workdir, metrics records, final state)."""
    workdir = tmp_path_factory.mktemp("reference")
    result = make_trainer(workdir, tiny_corpus).run()
    return workdir, chaos.read_records(str(workdir)), host(result["state"])


def assert_same_run(workdir, result, reference):
    _, records, state = reference
    got = chaos.read_records(str(workdir))
    assert got == records  # every step logged once, bit for bit (timing fields aside), eval included
    assert chaos.same_state(host(result["state"]), state)


# ----------------------------------------------------------------------------------------------------------------
# 1. Exact resume


def test_crashes_and_a_sigterm_resume_to_a_bitwise_identical_run(tmp_path, tiny_corpus, reference, capfd):
    trainer = make_trainer(tmp_path, tiny_corpus)
    with before_step(trainer, crash_at(7)), pytest.raises(Crash):  # steps 1-6 ran; checkpoint 4
        trainer.run()
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 7, "train/lo')  # a line torn by the kill
    trainer = make_trainer(tmp_path, tiny_corpus)
    with before_step(trainer, crash_at(9)), pytest.raises(Crash):  # resumed at 4, steps 5-12 ran; checkpoint 12
        trainer.run()
    assert ckpt_lib.committed_steps(str(tmp_path / "checkpoints")) == [8, 12]
    trainer = make_trainer(tmp_path, tiny_corpus)
    with before_step(trainer, lambda n: n == 3 and signal.raise_signal(signal.SIGTERM)):
        result = trainer.run()  # the signal arrives before step 15: step 15 finishes, is saved, the run stops
    assert result["preempted"] and result["step"] == 15
    assert ckpt_lib.committed_steps(str(tmp_path / "checkpoints")) == [12, 15]
    assert "SIGTERM: stopped after step 15 with checkpoint 15 committed" in capfd.readouterr().out
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are put back

    # Data neither repeated nor skipped: the saved iterator is at the batch of the saved step.
    it = iter(data_lib.train_dataset(tiny_corpus, trainer.cfg))
    ckpt = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"), trainer.cfg, read_only=True)
    ckpt.restore(15, trainer.setup.abstract_state(), it)
    ckpt.close()
    assert it.get_state()["next_index"] == 15

    result = make_trainer(tmp_path, tiny_corpus).run()
    assert_same_run(tmp_path, result, reference)
    assert ckpt_lib.committed_steps(str(tmp_path / "checkpoints")) == [20, 24]  # max_to_keep=2, nothing else
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["20", "24"]
    assert os.path.exists(tmp_path / "checkpoints" / "24" / ckpt_lib.MANIFEST)

    # The same command once more: the run is complete, nothing changes, and it reports the run's final numbers
    # (once "final train/loss nan": the values came only from steps this process ran).
    again = make_trainer(tmp_path, tiny_corpus).run()
    assert again["train/loss"] == result["train/loss"] and again["eval/loss"] == result["eval/loss"]
    assert_same_run(tmp_path, again, reference)


def test_rewind_metrics_keeps_one_run(tmp_path):
    lines = [json.dumps({"step": s, "train/loss": 1.0 / s}) for s in (1, 2, 3, 4)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 5, "tra')
    kept = faults.rewind_metrics(str(tmp_path), 2)
    assert [r["step"] for r in kept] == [1, 2]
    assert (tmp_path / "metrics.jsonl").read_text() == "\n".join(lines[:2]) + "\n"
    assert faults.rewind_metrics(str(tmp_path), 0) == [] and (tmp_path / "metrics.jsonl").read_text() == ""


# ----------------------------------------------------------------------------------------------------------------
# 3. Corruption and failed saves


def _largest(pattern):
    return max(glob.glob(pattern, recursive=True), key=os.path.getsize)


def _flip_bytes(step_dir):
    path = _largest(f"{step_dir}/state/**/d/*")
    with open(path, "r+b") as fh:
        fh.seek(os.path.getsize(path) // 2)
        byte = fh.read(1)[0]
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte ^ 0xFF]))


def _truncate_unhashed(step_dir):
    os.remove(f"{step_dir}/{ckpt_lib.MANIFEST}")  # killed between commit and hashing: only orbax's reads check it
    path = _largest(f"{step_dir}/state/**/d/*")
    os.truncate(path, os.path.getsize(path) // 2)


def _empty_item_unhashed(step_dir):
    os.remove(f"{step_dir}/{ckpt_lib.MANIFEST}")
    os.truncate(f"{step_dir}/data/metadata", 0)


def _half_written(step_dir):
    # A save killed before its commit: orbax's tmp directory, never renamed; the step itself is absent.
    tmp = f"{step_dir}.orbax-checkpoint-tmp"
    shutil.copytree(step_dir, tmp)
    shutil.rmtree(f"{tmp}/state")
    shutil.rmtree(step_dir)


# orbax leaves a coroutine of the failed read un-awaited; that is its business, not a failure of this test
ORBAX_READ_ERRORS = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@ORBAX_READ_ERRORS
@pytest.mark.parametrize(
    "damage",
    [_flip_bytes, _truncate_unhashed, _empty_item_unhashed, _half_written],
    ids=["flipped-bytes", "truncated-file", "empty-item", "half-written"],
)
def test_damaged_latest_checkpoint_falls_back_to_the_previous(damage, tmp_path, tiny_corpus, reference, capfd):
    workdir = tmp_path / "run"
    shutil.copytree(reference[0], workdir)
    damage(str(workdir / "checkpoints" / "24"))
    capfd.readouterr()
    result = make_trainer(workdir, tiny_corpus).run()  # resumes at 20 and trains 21-24 again
    warnings = capfd.readouterr().err.strip().splitlines()
    assert_same_run(workdir, result, reference)
    names = sorted(os.listdir(workdir / "checkpoints"))
    if damage is _half_written:
        assert warnings == [] and names == ["20", "24"]  # the tmp directory is cleaned up, never restored
    else:
        assert len(warnings) == 1 and "checkpoint 24" in warnings[0], warnings
        assert "moved it to 24.corrupt and resuming from checkpoint 20" in warnings[0]
        assert names == ["20", "24", "24.corrupt"]


@ORBAX_READ_ERRORS
def test_no_restorable_checkpoint_stops_without_moving_anything(tmp_path, tiny_corpus, reference):
    workdir = tmp_path / "run"
    shutil.copytree(reference[0], workdir)
    for step in ("20", "24"):
        _flip_bytes(str(workdir / "checkpoints" / step))
    with pytest.raises(ckpt_lib.CheckpointError, match="no checkpoint in .* restores .*step 24.*step 20") as e:
        make_trainer(workdir, tiny_corpus).run()
    assert e.value.exit_code == errors.EXIT_CHECKPOINT == 74 and "\n" not in str(e.value)
    assert sorted(os.listdir(workdir / "checkpoints")) == ["20", "24"]


def test_failed_save_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, tiny_corpus, reference, monkeypatch):
    # The disk fills up as step 12 commits: every item is written, its commit marker cannot be.
    from orbax.checkpoint._src.path import async_path

    original = async_path.write_text

    async def disk_full_at_12(path, text, *args, **kwargs):
        if path.parent.name == "12.orbax-checkpoint-tmp":
            raise OSError(errno.ENOSPC, "No space left on device")
        return await original(path, text, *args, **kwargs)

    monkeypatch.setattr(async_path, "write_text", disk_full_at_12)
    with pytest.raises(ckpt_lib.CheckpointError) as e:
        make_trainer(tmp_path, tiny_corpus).run()  # the asynchronous failure surfaces at the next save (16)
    message = str(e.value)
    assert e.value.exit_code == 74 and "\n" not in message
    assert "saving the checkpoint at step 12" in message and "No space left on device" in message
    assert "the checkpoint at step 8 is intact" in message
    steps = ckpt_lib.committed_steps(str(tmp_path / "checkpoints"))
    assert steps == [4, 8]  # retention (max_to_keep=2) never ran for the failed step: both survive

    monkeypatch.undo()  # space freed: the same command resumes from 8
    result = make_trainer(tmp_path, tiny_corpus).run()
    assert_same_run(tmp_path, result, reference)


# ----------------------------------------------------------------------------------------------------------------
# 4. Topology change


def test_checkpoint_restores_onto_another_mesh_and_training_continues(tmp_path, tiny_corpus, reference):
    """Written on fsdp 4 x tensor 2 (8 devices), restored on data 2 x tensor 2 (4 devices): identical parameters,
    and the same losses as the one-device reference (same global batch) up to float reassociation."""
    ref_dir, records, ref_state = reference
    cfg8 = tiny_config(**{**BASE, "mesh.fsdp": 4, "mesh.tensor": 2})
    mesh8 = sharding.make_mesh(cfg8, jax.devices())
    setup8 = step_lib.Setup.build(cfg8, mesh8)
    # Move checkpoint 20 of the reference onto the 8-device mesh and save it from there.
    reader = ckpt_lib.Checkpointer(str(ref_dir / "checkpoints"), cfg8, read_only=True)
    state8 = reader.restore(20, setup8.abstract_state(), None)
    reader.close()
    assert state8["params"]["blocks"]["w_up"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    workdir = tmp_path / "run"
    shutil.copytree(ref_dir, workdir)
    for name in os.listdir(workdir / "checkpoints"):
        shutil.rmtree(workdir / "checkpoints" / name)
    it = iter(data_lib.train_dataset(tiny_corpus, cfg8))
    for _ in range(20):
        next(it)
    ckpt8 = ckpt_lib.Checkpointer(str(workdir / "checkpoints"), cfg8)
    ckpt8.save(20, state8, it, cfg8)
    ckpt8.close()

    cfg4 = tiny_config(**{**BASE, "mesh.data": 2, "mesh.tensor": 2})
    mesh4 = sharding.make_mesh(cfg4, jax.devices()[:4])
    trainer = make_trainer(workdir, tiny_corpus, mesh=mesh4, **{"mesh.data": 2, "mesh.tensor": 2})
    restored = ckpt_lib.load_state(str(workdir / "checkpoints"), trainer.setup.abstract_state(), 20)[1]
    reference_20 = ckpt_lib.load_state(str(ref_dir / "checkpoints"), trainer.setup.abstract_state(), 20)[1]
    assert chaos.same_state(restored, reference_20)  # bit for bit, on a different mesh and device count

    result = trainer.run()
    got = chaos.read_records(str(workdir))
    for step in range(21, 25):
        np.testing.assert_allclose(
            got[(step, "train")]["train/loss"], records[(step, "train")]["train/loss"], rtol=1e-5
        )
    np.testing.assert_allclose(got[(24, "eval")]["eval/loss"], records[(24, "eval")]["eval/loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(host(result["state"]["params"])), jax.tree.leaves(ref_state["params"])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# 5. Numerical faults


def test_nonfinite_step_stops_before_any_save_then_skip_policy_resumes(tmp_path, tiny_corpus, reference, capfd):
    with pytest.raises(faults.NonFiniteError) as e:
        make_trainer(tmp_path, tiny_corpus, **{"train.debug_nan_at_step": 7}).run()
    assert e.value.exit_code == errors.EXIT_NONFINITE == 3
    assert "non-finite loss or gradient at step 7" in str(e.value) and "last good checkpoint is step 4" in str(e.value)
    assert ckpt_lib.committed_steps(str(tmp_path / "checkpoints")) == [4]  # nothing saved after the bad step

    # The documented way on: skip such steps (nan_policy may change on resume).
    capfd.readouterr()
    result = make_trainer(tmp_path, tiny_corpus, **{"train.debug_nan_at_step": 7, "train.nan_policy": "skip"}).run()
    assert "step 7: skipped 1 update(s) with a non-finite loss or gradient" in capfd.readouterr().out
    got = chaos.read_records(str(tmp_path))
    _, records, _ = reference
    for step in range(1, 7):
        assert got[(step, "train")] == records[(step, "train")]
    assert np.isnan(got[(7, "train")]["train/loss"])
    assert [got[(s, "train")]["nonfinite_steps"] for s in range(1, 25)] == [0] * 6 + [1] * 18
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(host(result["state"]["params"])))
    assert np.isfinite(got[(24, "eval")]["eval/loss"])


def test_skipped_step_leaves_params_and_optimizer_state_unchanged(tmp_path, tiny_corpus):
    trainer = make_trainer(tmp_path, tiny_corpus, **{"train.debug_nan_at_step": 7})
    setup = trainer.setup
    it = iter(data_lib.train_dataset(tiny_corpus, trainer.cfg))
    state = setup.init_state()
    for _ in range(6):
        state, _ = setup.train_step(state, setup.global_batch(next(it)["tokens"]))
    before = host(state)
    state, m = setup.train_step(state, setup.global_batch(next(it)["tokens"]))
    after = host(state)
    assert np.isnan(float(m["train/loss"])) and np.isnan(float(m["grad_norm"]))
    assert chaos.same_state(after["params"], before["params"])
    assert chaos.same_state(after["opt_state"], before["opt_state"])  # Adam's moments and count too
    assert int(after["step"]) == 7 and int(after["nonfinite_steps"]) == 1 and int(after["last_nonfinite_step"]) == 7


def test_loss_spikes_are_flagged_deterministically():
    losses = [5.5, 5.0, 4.6, 4.3, 4.1, 4.0, 10.0, 3.9, 3.8]
    detector = faults.SpikeDetector(factor=2.0)
    flags = [detector.observe(x) for x in losses]
    assert [i for i, f in enumerate(flags) if f] == [6] and 2.0 < flags[6] < 2.5
    replay = faults.SpikeDetector(factor=2.0)  # a resumed run replays the kept log and agrees
    for x in losses[:5]:
        replay.observe(x)
    assert [replay.observe(x) for x in losses[5:]] == flags[5:]
    assert faults.SpikeDetector(factor=0).observe(100.0) is None


# ----------------------------------------------------------------------------------------------------------------
# 2 and 7. Real processes: SIGTERM with the documented exit code, the grace period, and the chaos tool

CHAOS_ARGS = [
    f"--config={os.path.join(ROOT, 'configs', 'tiny.py')}",
    *chaos.DEFAULT_OVERRIDES,
    "--config.train.steps=30",
    "--config.checkpoint.every=3",
    "--config.train.eval_every=15",
]


@pytest.fixture
def one_device_env(tmp_path_factory, monkeypatch):
    """Children see one CPU device and share the run's compilation cache (restarts load the compiled step)."""
    monkeypatch.setenv("XLA_FLAGS", xla_flags(1))
    monkeypatch.setenv("PYTHONPATH", ROOT)


@pytest.mark.slow
def test_chaos_tool_finds_no_divergence(tmp_path, one_device_env):
    report = chaos.run(CHAOS_ARGS, kills=3, workdir=str(tmp_path), seed=1, log=lambda line: None)
    assert report.kills == 3 and report.sigkill + report.sigterm == 3
    assert report.diverged == 0 and report.failures == [], report.line()
    assert report.records_mismatched == 0 and report.states_identical == report.rounds
    assert report.line().startswith("kills=3 diverged=0 failures=0")


def _train(workdir, *extra):
    return subprocess.Popen(
        [sys.executable, "-m", "maxscale.train", *CHAOS_ARGS, f"--workdir={workdir}", *extra],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_step(workdir, step, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if any(s >= step for s, _ in chaos.read_records(str(workdir))):
            return
        time.sleep(0.01)
    raise AssertionError(f"no step {step} logged; exit {proc.poll()}")


@pytest.mark.slow
def test_sigterm_saves_and_exits_75_and_the_grace_period_bounds_the_exit(tmp_path, one_device_env):
    workdir = tmp_path / "run"
    proc = _train(workdir)
    _wait_for_step(workdir, 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == errors.EXIT_PREEMPTED == 75, err
    stopped = max(s for s, kind in chaos.read_records(str(workdir)) if kind == "train")
    assert ckpt_lib.committed_steps(str(workdir / "checkpoints"))[-1] == stopped < 30
    assert f"SIGTERM: stopped after step {stopped} with checkpoint {stopped} committed" in out
    assert "Traceback" not in err

    # A grace period too short for the save: the process still leaves, promptly, with the same code and one line,
    # and the checkpoint of the first stop stays the newest good one.
    proc = _train(workdir, "--config.train.preempt_grace_s=0.001")
    _wait_for_step(workdir, stopped + 1, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75
    assert "preemption grace period (train.preempt_grace_s=0.001) ran out" in err and "Traceback" not in err
    assert ckpt_lib.committed_steps(str(workdir / "checkpoints"))[-1] >= stopped

    proc = _train(workdir)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert ckpt_lib.committed_steps(str(workdir / "checkpoints"))[-1] == 30
