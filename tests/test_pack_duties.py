"""A pack (train/vectorized.py) is trained by the one training loop (train/loop.Trainer), so it does what a single
run does: dynamics metrics on dyn steps, local-tier checkpoints it resumes from, and SIGTERM -> checkpoint
committed, exit 75, the same command resumes at that step."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, one_device_mesh, xla_flags
from test_vectorized import cfg_of, losses

from maxscale import errors
from maxscale.train import checkpoint as ckpt_lib
from maxscale.train import loop, metrics, vectorized


def records(run_dir) -> dict[int, dict]:
    """{step: the merged records of that step} of a run directory's metrics.jsonl."""
    out: dict[int, dict] = {}
    for r in metrics.read_metrics(str(run_dir)):
        out.setdefault(r["step"], {}).update(r)
    return out


def test_pack_members_log_dyn_metrics_as_their_runs_alone(tmp_path, tiny_corpus):
    """dyn/ metrics (weights, gradients, updates per group; the probe per layer) on dyn steps only, each member's
    equal to its run alone; the second member has other forward multipliers (its probe uses them)."""
    dyn = {"train.steps": 10, "train.eval_every": 10, "train.dyn_every": 5}
    members = [{"optimizer.lr": 1e-2}, {"optimizer.lr": 3e-3, "parameterization.output_mult": 2.0}]
    cfgs = [cfg_of(**dyn, **m) for m in members]
    dirs = [tmp_path / f"m{i}" for i in range(2)]
    mesh = one_device_mesh(cfgs[0])
    pack = vectorized.VectorizedRun(cfgs, list(map(str, dirs)), str(tmp_path / "pack"), mesh, tiny_corpus)
    loop.train_pack(pack, log=lambda line: None)
    for i, cfg in enumerate(cfgs):
        loop.Trainer(cfg, str(tmp_path / f"alone{i}"), mesh=one_device_mesh(cfg), corpus=tiny_corpus).run()
        alone, packed = records(tmp_path / f"alone{i}"), records(dirs[i])
        assert sorted(alone) == sorted(packed) == list(range(1, 11))
        for step in alone:
            keys = sorted(k for k in alone[step] if k.startswith("dyn/"))
            assert keys == sorted(k for k in packed[step] if k.startswith("dyn/")), (i, step)
            assert bool(keys) == (step % 5 == 0), (i, step)  # on dyn steps only
            if keys:
                assert {"dyn/rms_w/embed", "dyn/u_over_w/mlp_in", "dyn/dh_init/layer_0"} <= set(keys)
                np.testing.assert_allclose(
                    [packed[step][k] for k in keys], [alone[step][k] for k in keys], rtol=2e-4, err_msg=f"{i} {step}"
                )


def test_pack_saves_local_tier_checkpoints_and_resumes_from_them(tmp_path, tiny_corpus):
    """checkpoint.local_every: the pack saves the local tier (<pack>/checkpoints_local) between persistent saves
    and, its newest persistent step lost, resumes from the newer local one and trains the same steps again."""
    cfgs = [cfg_of(**{"checkpoint.every": 10, "checkpoint.local_every": 4, "optimizer.lr": lr}) for lr in (1e-2, 3e-3)]
    dirs = [str(tmp_path / f"m{i}") for i in range(2)]
    mesh, pack_dir = one_device_mesh(cfgs[0]), tmp_path / "pack"
    pack = vectorized.VectorizedRun(cfgs, dirs, str(pack_dir), mesh=mesh, corpus=tiny_corpus)
    loop.train_pack(pack, log=lambda line: None)
    local = pack_dir / "checkpoints_local"
    assert ckpt_lib.committed_steps(str(local)) == [12, 16]  # local_max_to_keep=2 of 4, 8, 12, 16
    assert ckpt_lib.committed_steps(str(pack_dir / "checkpoints")) == [10, 20]
    first = [losses(d) for d in dirs]
    shutil.rmtree(pack_dir / "checkpoints" / "20")  # lost: the local step 16 is the newest
    logged = []
    pack = vectorized.VectorizedRun(cfgs, dirs, str(pack_dir), mesh=mesh, corpus=tiny_corpus)
    loop.train_pack(pack, logged.append)
    assert f"resumed from {local} at step 16" in logged
    for d, before in zip(dirs, first):
        after = losses(d)
        assert sorted(after) == sorted(before) == list(range(1, 21))
        np.testing.assert_array_equal([after[s] for s in range(17, 21)], [before[s] for s in range(17, 21)])


SWEEP = """
return {"config": BASE, "grid": {"optimizer.lr": [1e-3, 4e-3]},
        "fixed": {"train.steps": 300, "train.log_every": 1, "checkpoint.every": 1000, "train.eval_every": 300}}
"""


@pytest.fixture
def child_env(compilation_cache):
    """One CPU device and the run's compilation cache (the resumed process loads the compiled step); no other
    XLA_FLAGS or JAX_ setting of this process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_FLAGS", "JAX_")) or "CACHE" in k}
    return {**env, "XLA_FLAGS": xla_flags(1), "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}


def _pack_process(dirs, env):
    cmd = [sys.executable, os.path.join(ROOT, "tools", "sweep.py"), f"--run_dir={','.join(dirs)}"]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_sigterm_to_a_packed_sweep_process_saves_exits_75_and_resumes(tmp_path, child_env):
    from test_sweep import write_sweep

    from maxscale.tools import sweep

    s = sweep.load_sweep(write_sweep(tmp_path, SWEEP))
    runs = sweep.expand(s, str(tmp_path / "runs"))
    sweep.write_plan(s, runs, str(tmp_path / "runs"))
    dirs = [r["dir"] for r in runs]
    assert len(vectorized.packs(runs, 2, log=lambda line: None)) == 1  # one pack of both runs

    proc = _pack_process(dirs, child_env)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and max(records(dirs[0]) or [0]) < 3:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == errors.EXIT_PREEMPTED == 75, err
    assert "Traceback" not in err
    stopped = max(records(dirs[0]))
    assert 3 <= stopped < 300 and max(records(dirs[1])) == stopped  # both members stop at the same step
    (pack_dir,) = (tmp_path / "runs" / "demo" / "packs").iterdir()
    assert ckpt_lib.committed_steps(str(pack_dir / "checkpoints")) == [stopped]
    assert f"SIGTERM: stopped after step {stopped} with checkpoint {stopped} committed" in out
    assert not any(os.path.exists(os.path.join(d, "result.json")) for d in dirs)  # not finished: no result

    proc = _pack_process(dirs, child_env)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert f"resumed from {pack_dir / 'checkpoints'} at step {stopped}" in out
    for d in dirs:
        assert json.load(open(os.path.join(d, "result.json")))["pack_size"] == 2
        steps = [r["step"] for r in metrics.read_metrics(d) if "train/loss" in r]
        assert steps == list(range(1, 301))  # each step once: the stopped process's log continues
