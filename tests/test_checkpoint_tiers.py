"""Checkpoint tiers, keep_steps and the background hashing thread (docs/reliability.md, section 3).

In-process runs share one compiled Setup (about a second each); the SIGKILL case runs real processes that share a
JAX compilation cache.
"""

import glob
import os
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from conftest import ROOT, one_device_mesh, tiny_config

from maxscale import config as config_lib
from maxscale.errors import ConfigError
from maxscale.tools import chaos
from maxscale.train import checkpoint as ckpt_lib
from maxscale.train import data as data_lib
from maxscale.train import loop
from maxscale.train import step as step_lib

# Persistent saves at 8 and 16; local saves at 2, 4, 6, 10, 12, 14.
BASE = {
    "train.steps": 16,
    "train.log_every": 1,
    "train.eval_steps": 0,
    "train.sample_tokens": 0,
    "checkpoint.every": 8,
    "checkpoint.max_to_keep": 2,
    "checkpoint.local_every": 2,
    "checkpoint.local_max_to_keep": 1,
}
_SETUP = {}


def make_trainer(workdir, corpus, **overrides):
    cfg = tiny_config(**{**BASE, **overrides})
    if "setup" not in _SETUP:
        _SETUP["setup"] = step_lib.Setup.build(cfg, one_device_mesh(cfg))
    return loop.Trainer(cfg, str(workdir), corpus=corpus, setup=_SETUP["setup"])


def host(state):
    return jax.tree.map(np.asarray, jax.device_get(state))


class Crash(Exception):
    pass


def _flip_bytes(step_dir):
    path = max(glob.glob(f"{step_dir}/state/**/d/*", recursive=True), key=os.path.getsize)
    with open(path, "r+b") as fh:
        fh.seek(os.path.getsize(path) // 2)
        byte = fh.read(1)[0]
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte ^ 0xFF]))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_corpus):
    """An uninterrupted run with both tiers: (workdir, records, final state)."""
    workdir = tmp_path_factory.mktemp("reference")
    result = make_trainer(workdir, tiny_corpus).run()
    return workdir, chaos.read_records(str(workdir)), host(result["state"])


def test_corrupted_local_step_falls_back_to_the_persistent_tier(tmp_path, tiny_corpus, reference, capfd):
    trainer = make_trainer(tmp_path, tiny_corpus)
    original, calls = trainer.setup.train_step, [0]

    def crash_before_13(state, batch):
        calls[0] += 1
        if calls[0] == 13:
            raise Crash
        return original(state, batch)

    trainer.setup.train_step = crash_before_13
    try:
        with pytest.raises(Crash):
            trainer.run()  # steps 1-12: persistent 8, local 12 (local_max_to_keep=1)
    finally:
        trainer.setup.train_step = original
    local, persistent = tmp_path / "checkpoints_local", tmp_path / "checkpoints"
    assert ckpt_lib.committed_steps(local) == [12] and ckpt_lib.committed_steps(persistent) == [8]
    assert os.path.exists(local / "12" / ckpt_lib.MANIFEST)

    _flip_bytes(local / "12")
    capfd.readouterr()
    result = make_trainer(tmp_path, tiny_corpus).run()
    out, err = capfd.readouterr()
    warnings = err.strip().splitlines()
    assert len(warnings) == 1, warnings
    assert f"checkpoint 12 in {local} is unusable" in warnings[0] and "CRC-32" in warnings[0]
    assert f"moved it to 12.corrupt and resuming from checkpoint 8 in {persistent}" in warnings[0]
    assert f"resumed from {persistent} at step 8" in out
    _, records, state = reference
    assert chaos.read_records(str(tmp_path)) == records
    assert chaos.same_state(host(result["state"]), state)
    assert sorted(os.listdir(local)) == ["12.corrupt", "14"]


def test_keep_steps_are_saved_and_survive_retention(tmp_path, tiny_corpus):
    overrides = {"checkpoint.every": 4, "checkpoint.max_to_keep": 1, "checkpoint.local_every": 0}
    make_trainer(tmp_path, tiny_corpus, **overrides, **{"checkpoint.keep_steps": (3, 8)}).run()
    # 3 is no multiple of every; 8 would have been deleted by max_to_keep=1
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["16", "3", "8"]
    assert not os.path.exists(tmp_path / "checkpoints_local")
    cfg = config_lib.defaults()
    config_lib.override(cfg, "checkpoint.keep_steps", "10,100,1000")
    assert config_lib.resolve(cfg).checkpoint.keep_steps == (10, 100, 1000)
    config_lib.override(cfg, "checkpoint.keep_steps", "1000")
    assert config_lib.resolve(cfg).checkpoint.keep_steps == (1000,)


def test_the_manifest_is_written_by_the_background_thread(tmp_path, tiny_corpus, monkeypatch):
    cfg = tiny_config(**BASE)
    setup = _SETUP.get("setup") or step_lib.Setup.build(cfg, one_device_mesh(cfg))
    _SETUP["setup"] = setup
    state, it = setup.init_state(), iter(data_lib.train_dataset(tiny_corpus, cfg))
    release, hashed_by = threading.Event(), set()
    crc32 = ckpt_lib._crc32

    def slow_crc32(path):
        hashed_by.add(threading.current_thread().name)
        assert release.wait(60)
        return crc32(path)

    monkeypatch.setattr(ckpt_lib, "_crc32", slow_crc32)
    ckpt = ckpt_lib.Checkpointer(tmp_path, cfg)
    ckpt.save(0, state, it, cfg)  # returns while the hashing waits for `release`
    manifest = tmp_path / "0" / ckpt_lib.MANIFEST
    t = time.perf_counter()
    while not hashed_by and time.perf_counter() - t < 60:
        ckpt.poll()  # never blocks on the hashing
        time.sleep(0.01)
    assert hashed_by and threading.current_thread().name not in hashed_by
    assert not manifest.exists() and ckpt.newest_step() == 0
    release.set()
    ckpt.close()  # waits for the manifest
    assert manifest.exists() and hashed_by == {f"maxscale-checkpoint:{tmp_path.name}"}

    # Killed between commit and manifest: the step restores (orbax's checks), then is hashed in the background.
    manifest.unlink()
    ckpt = ckpt_lib.Checkpointer(tmp_path, cfg)
    step, restored = ckpt.restore_latest(setup.abstract_state(), None, report=pytest.fail)
    ckpt.close()
    assert step == 0 and chaos.same_state(host(restored), host(state)) and manifest.exists()
    ckpt_lib.verify_manifest(tmp_path / "0")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"checkpoint.local_every": -1}, "checkpoint.local_every=-1 must be >= 0"),
        ({"checkpoint.local_max_to_keep": 0}, "checkpoint.local_max_to_keep=0 must be positive"),
        ({"checkpoint.local_every": 16}, "checkpoint.local_every=16 is a multiple of checkpoint.every=8"),
        ({"checkpoint.keep_steps": (0, 10)}, "checkpoint.keep_steps=(0, 10): 0 is not a positive step"),
        ({"checkpoint.keep_steps": ("ten",)}, "checkpoint.keep_steps=('ten',): 'ten' is not a positive step"),
    ],
)
def test_bad_tier_fields_are_config_errors(overrides, message):
    with pytest.raises(ConfigError) as e:
        tiny_config(**{**BASE, **overrides})
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_local_dirs_are_config_errors(tmp_path, reference):
    cfg = tiny_config(**{**BASE, "checkpoint.local_dir": str(tmp_path / "run" / "checkpoints")})
    with pytest.raises(ConfigError, match=r"^checkpoint.local_dir=.* is the persistent checkpoint directory"):
        loop.check_workdir(str(tmp_path / "run"), cfg)
    (tmp_path / "file").write_text("x")
    cfg = tiny_config(**{**BASE, "checkpoint.local_dir": str(tmp_path / "file")})
    with pytest.raises(ConfigError, match=r"^checkpoint.local_dir=.*file: .*; choose another checkpoint.local_dir"):
        loop.check_workdir(str(tmp_path / "run"), cfg)
    other_run = str(reference[0] / "checkpoints_local")
    cfg = tiny_config(**{**BASE, "model.width": 32, "checkpoint.local_dir": other_run})
    with pytest.raises(ConfigError, match=r"checkpoint 14 there was written with another config \(.*width 64 -> 32"):
        loop.check_workdir(str(tmp_path / "run"), cfg)


# ----------------------------------------------------------------------------------------------------------------
# Real processes

ARGS = [
    f"--config={os.path.join(ROOT, 'configs', 'tiny.py')}",
    "--config.data.max_bytes=400000",
    *(f"--config.{k}={v}" for k, v in BASE.items()),
]
# Runs the trainer and kills itself with SIGKILL once local step KILL_AFTER has committed (before step KILL_AFTER+2
# is saved), whatever the background thread is doing.
KILLER = """
import os, signal, sys, time
from maxscale.train import checkpoint, checkpoint_tiers, command
kill_after, local_dir = int(os.environ["KILL_AFTER"]), os.environ["LOCAL_DIR"]
original = checkpoint_tiers.save_tier
def save_tier(cfg, step, stop):
    if step == kill_after + 1:
        deadline = time.time() + 120
        while kill_after not in checkpoint.committed_steps(local_dir) and time.time() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGKILL)
    return original(cfg, step, stop)
checkpoint_tiers.save_tier = save_tier
sys.exit(command.main(sys.argv[1:]))
"""


def _train(workdir, env, *command):
    command = command or ("-m", "maxscale.train")
    return subprocess.run(
        [sys.executable, *command, *ARGS, f"--workdir={workdir}"], cwd=ROOT, env=env, capture_output=True, text=True
    )


def test_sigkill_after_a_local_save_resumes_from_it_exactly(tmp_path, child_env):
    reference = _train(tmp_path / "reference", child_env)
    assert reference.returncode == 0, reference.stderr
    workdir, local = tmp_path / "run", tmp_path / "node-local"
    env = {**child_env, "KILL_AFTER": "12", "LOCAL_DIR": str(local)}
    killed = _train(workdir, env, "-c", KILLER, f"--config.checkpoint.local_dir={local}")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert ckpt_lib.committed_steps(workdir / "checkpoints") == [8] and ckpt_lib.committed_steps(local)[-1] == 12

    resumed = _train(workdir, child_env, "-m", "maxscale.train", f"--config.checkpoint.local_dir={local}")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {local} at step 12" in resumed.stdout and "maxscale.train: warning" not in resumed.stderr
    assert chaos.read_records(str(workdir)) == chaos.read_records(str(tmp_path / "reference"))  # bit for bit
    assert chaos.same_state(chaos.final_state(str(workdir))[1], chaos.final_state(str(tmp_path / "reference"))[1])


PROBE = """
import os, sys
from maxscale import config
from maxscale.errors import ConfigError
from maxscale.parallel import distributed
from maxscale.train import checkpoint_tiers
distributed.initialize()
pid = os.environ["MAXSCALE_PROCESS_ID"]
cfg = config.defaults()
cfg.checkpoint.local_every = 10
cfg.checkpoint.local_dir = sys.argv[1].replace("{pid}", pid)
try:
    checkpoint_tiers.check_shared(cfg, "unused")
except ConfigError as e:
    print(f"ConfigError: {e}")
    sys.exit(2)
"""


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "node-local"])
def test_several_processes_need_a_shared_local_dir(tmp_path, shared):
    local = str(tmp_path / ("local" if shared else "local-{pid}"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_FLAGS", "JAX_"))}
    r = subprocess.run(
        [sys.executable, "launch/local.py", "--num_processes=2", "--", sys.executable, "-c", PROBE, local],
        cwd=ROOT,
        env={**env, "PYTHONPATH": ROOT},
        capture_output=True,
        text=True,
        timeout=300,
    )
    if shared:
        assert r.returncode == 0, r.stdout + r.stderr
        assert os.listdir(tmp_path / "local") == []  # the probe file is gone
    else:
        assert r.returncode == 2, r.stdout + r.stderr
        assert "checkpoint.local_dir=" in r.stdout and "is not shared: process(es) 1 do not see" in r.stdout
