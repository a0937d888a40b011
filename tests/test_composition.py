"""The composition suite (issue #23 item 9): features that each pass alone must also pass together.

A covering array (tests/composition_cases.py: every pair of values of any two factors in at least one case) over
  model         dense | MoE capacity | MoE dropless | MoE first_dense=1 + every=2 | MoE shared expert |
                MoE router softmax + renorm + aux-loss balance
  param         sp | mup | depth_mup | completep
  quant         none | int8 weights | W4A8KV4 | e4m3 activations
  mesh          1 device | data=2 x fsdp=2 | tensor=2 | expert=2 (data=2 for a dense model)
  pack          a single run | a pack of K=2 (a 2-point learning-rate sweep through tools/sweep.py --vectorize=2)
  6 switches    microbatches=2, chunked attention, loss chunks, bfloat16 compute, remat, dyn metrics: each on/off
gives 24 cases (6 x 4, the fewest any covering array of these factors can have), each a 6-step run of a width-32
model through the command line a user types. The cases run as one sweep per (device count, pack) group, i.e. one
`python tools/sweep.py` process (one JAX start-up) per group, with that many simulated CPU devices. Each case must
finish with a finite train loss that fell from the first logged step to the last, and a finite eval loss.

Kill and resume runs on the 6 cases (the fewest possible) that together hold every value of every factor
(`composition_cases.resume_subset`): a single case as `python -m maxscale.train --config=configs/tiny.py
--config.a.b=v ...`, a pack as `tools/sweep.py --vectorize=2` on its 2-point sweep. The attempt is killed with
SIGKILL once its step-3 checkpoint is committed, the same command runs again, and every metrics record (timings
aside) and the final train state must equal the uninterrupted run's bit for bit, as tests/test_reliability.py
asserts for single runs. All subprocesses share one compilation cache and run two at a time (the machine has 2
cores), compiled for speed of compiling (FAST_COMPILE below): alone on an idle 2-core machine the module takes
108 s and 200 CPU-s (150 s and 284 CPU-s without FAST_COMPILE); it prints its wall and CPU time.
"""

import concurrent.futures
import glob
import json
import math
import os
import signal
import subprocess
import sys
import time

import composition_cases as cc
import jax
import numpy as np
import pytest
from conftest import ROOT, xla_flags

from maxscale.tools import run_compare as chaos
from maxscale.train import checkpoint as ckpt_lib
from maxscale.train import metrics

pytestmark = pytest.mark.slow
BASE_CONFIG = os.path.join(ROOT, "configs", "tiny.py")
CASES = cc.all_pairs(cc.FACTORS)
NAMES = [cc.case_name(i, c) for i, c in enumerate(CASES)]
RESUMED = cc.resume_subset(CASES)
TIMEOUT_S = 1200  # per subprocess: generous, for a machine shared with other work
_LIVE: set = set()  # subprocesses still running: killed when the fixture ends, whatever happened
# Besides the suite's flags (conftest.TEST_XLA_FLAGS), XLA's classic fusion emitters: at level 0 they halve the
# compile time again. They may round a sum differently in two different programs, so the rest of the suite does not
# use them, but this module compares a run only with itself (a resumed run with its uninterrupted twin).
FAST_COMPILE = "--xla_cpu_use_fusion_emitters=false"


def _start(cmd: list[str], log: str, env: dict) -> subprocess.Popen:
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=env)
    _LIVE.add(proc)
    return proc


def _wait(proc: subprocess.Popen) -> int:
    try:
        return proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()
    finally:
        _LIVE.discard(proc)


def _env(devices: int) -> dict:
    """A user's environment with `devices` simulated CPU devices (and the run's compilation cache, conftest.py)."""
    flags = xla_flags(devices)
    flags += "" if "xla_cpu_use_fusion_emitters" in flags else f" {FAST_COMPILE}"  # the user's setting wins
    return dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)


def _last_line(log: str) -> str:
    with open(log, errors="replace") as fh:
        lines = [line.strip() for line in fh if line.strip()]
    return lines[-1] if lines else "(no output)"


def _run_group(work: str, key: tuple, indices: list[int]) -> dict:
    """Runs the cases `indices` (one device count, one pack value) as one sweep; {case index: (run dirs, error)}."""
    devices, pack = key
    name = f"g{devices}{pack}"
    path = os.path.join(work, f"{name}.py")
    with open(path, "w") as fh:
        fh.write(cc.sweep_file(name, BASE_CONFIG, [CASES[i] for i in indices]))
    cmd = [sys.executable, "tools/sweep.py", path, f"--root={work}/ref", "--keep_checkpoints"]
    cmd += ["--vectorize=2"] if pack == "pack2" else []
    log = os.path.join(work, f"{name}.log")
    rc = _wait(_start(cmd, log, _env(devices)))
    text = open(log, errors="replace").read()
    try:
        index = json.load(open(os.path.join(work, "ref", name, "sweep.json")))["runs"]
    except (OSError, ValueError):
        return {i: ([], f"sweep exited {rc} before its plan: {_last_line(log)}") for i in indices}
    out, at = {}, 0
    for i in indices:
        ids = [r["id"] for r in index[at : at + len(cc.points(CASES[i]))]]
        at += len(ids)
        dirs = [os.path.join(work, "ref", name, rid) for rid in ids]
        failed = [line for line in text.splitlines() if any(f"sweep: {rid} failed:" in line for rid in ids)]
        error = failed[0] if failed else None
        if error is None and not all(os.path.exists(os.path.join(d, "result.json")) for d in dirs):
            error = f"sweep exited {rc} without a result: {_last_line(log)}"
        out[i] = (dirs, error)
    return out


def _checkpoints(pattern: str) -> list[str]:
    """The checkpoint directories matching `pattern` (a pack's: <sweep>/packs/<hash>[/checkpoints]) holding a step."""
    found = glob.glob(pattern) + glob.glob(os.path.join(pattern, "checkpoints"))
    return sorted(d for d in found if ckpt_lib.committed_steps(d))


def _committed(pattern: str) -> bool:
    return any(cc.CKPT_EVERY in ckpt_lib.committed_steps(d) for d in _checkpoints(pattern))


def _kill_and_resume(work: str, i: int) -> dict:
    """Runs case `i`, SIGKILLs it once its step-3 checkpoint is committed, runs the same command again."""
    case, name = CASES[i], f"k{i:02d}"
    if case["pack"] == "single":
        run_dir = os.path.join(work, "kill", name)
        cmd = [sys.executable, "-m", "maxscale.train", f"--config={BASE_CONFIG}", *cc.cli_flags(case)]
        cmd.append(f"--workdir={run_dir}")
        ckpts = os.path.join(run_dir, "checkpoints")
    else:
        path = os.path.join(work, f"{name}.py")
        with open(path, "w") as fh:
            fh.write(cc.sweep_file(name, BASE_CONFIG, [case]))
        cmd = [sys.executable, "tools/sweep.py", path, f"--root={work}/kill", "--keep_checkpoints", "--vectorize=2"]
        ckpts = os.path.join(work, "kill", name, "packs", "*")
    env, logs = _env(cc.devices(case)), [os.path.join(work, f"{name}.{a}.log") for a in (1, 2)]
    t0 = time.time()
    proc = _start(cmd, logs[0], env)
    while proc.poll() is None and not _committed(ckpts) and time.time() - t0 < TIMEOUT_S:
        time.sleep(0.01)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    killed_rc = _wait(proc)
    out = {"killed_rc": killed_rc, "rc": None, "tail": [_last_line(logs[0]), ""], "dirs": [], "ckpt": ckpts}
    if killed_rc != -signal.SIGKILL:
        return out
    out["rc"] = _wait(_start(cmd, logs[1], env))
    out["tail"][1] = _last_line(logs[1])
    if case["pack"] == "single":
        out["dirs"] = [run_dir]
    elif os.path.exists(os.path.join(work, "kill", name, "sweep.json")):
        index = json.load(open(os.path.join(work, "kill", name, "sweep.json")))["runs"]
        out["dirs"] = [os.path.join(work, "kill", name, r["id"]) for r in index]
    return out


def _group_and_kills(work: str, key: tuple, indices: list[int]) -> tuple[dict, dict]:
    """A group's sweep, then its cases of the resume subset (their programs are in the compilation cache by then)."""
    runs = _run_group(work, key, indices)
    return runs, {i: _kill_and_resume(work, i) for i in indices if i in RESUMED}


@pytest.fixture(scope="module")
def suite(tmp_path_factory, compilation_cache):
    """Runs every case (one sweep per group) and the kill/resume subset, two subprocesses at a time."""
    work, t0, cpu0 = str(tmp_path_factory.mktemp("composition")), time.time(), os.times()
    groups = {}
    for i, case in enumerate(CASES):
        groups.setdefault((cc.devices(case), case["pack"]), []).append(i)
    cost = {key: len(idx) + sum(i in RESUMED for i in idx) for key, idx in groups.items()}
    runs, kills = {}, {}
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:  # the longest groups first
            jobs = [pool.submit(_group_and_kills, work, key, groups[key]) for key in sorted(cost, key=cost.get)[::-1]]
            for job in jobs:
                runs.update(job.result()[0])
                kills.update(job.result()[1])
    finally:
        for proc in list(_LIVE):
            proc.kill()
    cpu = os.times()
    cpu_s = cpu.children_user + cpu.children_system - cpu0.children_user - cpu0.children_system
    print(f"\ncomposition: {len(CASES)} cases, {len(RESUMED)} resumed, {time.time() - t0:.0f}s wall, {cpu_s:.0f}s CPU")
    return {"runs": runs, "kills": kills}


def test_the_cases_cover_every_pair_and_the_resumed_every_value():
    pairs = cc.all_pairs_of(cc.FACTORS)
    assert cc.covered_pairs(CASES) >= pairs and len(pairs) == 456
    assert len(CASES) == len(cc.FACTORS["model"]) * len(cc.FACTORS["param"])  # the lower bound: 6 x 4
    assert cc.all_pairs(cc.FACTORS) == CASES  # deterministic
    held = {(f, c[f]) for i in RESUMED for f in cc.FACTORS for c in [CASES[i]]}
    assert held == {(f, v) for f, vs in cc.FACTORS.items() for v in vs}


def _losses(run_dir: str, key: str) -> dict:
    return {r["step"]: r[key] for r in metrics.read_metrics(run_dir) if key in r}


@pytest.mark.parametrize("i", range(len(CASES)), ids=NAMES)
def test_case_trains(suite, i):
    """Exit 0 through the CLI, every step logged, a finite train loss that fell, a finite eval loss."""
    dirs, error = suite["runs"][i]
    assert error is None, f"{NAMES[i]}: {error}"
    for run_dir in dirs:
        result = json.load(open(os.path.join(run_dir, "result.json")))
        assert result["status"] == "done", f"{NAMES[i]}: {result}"
        train = _losses(run_dir, "train/loss")
        assert sorted(train) == list(range(1, cc.STEPS + 1)), f"{NAMES[i]}: logged steps {sorted(train)}"
        assert all(math.isfinite(v) for v in train.values()), f"{NAMES[i]}: {train}"
        assert train[cc.STEPS] < train[1], f"{NAMES[i]}: train/loss {train[1]} -> {train[cc.STEPS]} did not fall"
        assert math.isfinite(_losses(run_dir, "eval/loss")[cc.STEPS])


def _final_state(ckpt_dir: str) -> tuple[int, list]:
    """(step, [(path, numpy array)]) of the newest checkpoint's train state, read without the model (any pack)."""
    import orbax.checkpoint as ocp

    step = ckpt_lib.committed_steps(ckpt_dir)[-1]
    path = os.path.join(ckpt_dir, str(step), "state")
    checkpointer = ocp.PyTreeCheckpointer()
    meta = checkpointer.metadata(path)
    tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
    state = checkpointer.restore(
        path, restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    )
    return step, jax.tree_util.tree_flatten_with_path(state)[0]


def _same_leaves(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        pa == pb and x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()
        for (pa, x), (pb, y) in zip(a, b)
    )


@pytest.mark.parametrize("i", RESUMED, ids=[NAMES[i] for i in RESUMED])
def test_killed_case_resumes_exactly(suite, i):
    """SIGKILL after the step-3 checkpoint, the same command again: records and final state equal, bit for bit."""
    ref_dirs, error = suite["runs"][i]
    assert error is None, f"{NAMES[i]}: the uninterrupted run failed: {error}"
    k = suite["kills"][i]
    assert k["killed_rc"] == -signal.SIGKILL, f"{NAMES[i]}: the first attempt exited {k['killed_rc']}: {k['tail'][0]}"
    assert k["rc"] == 0, f"{NAMES[i]}: the rerun exited {k['rc']}: {k['tail'][1]}"
    assert len(k["dirs"]) == len(ref_dirs)
    [ckpt] = _checkpoints(k["ckpt"])
    if CASES[i]["pack"] == "single":
        ref_ckpt = os.path.join(ref_dirs[0], "checkpoints")
    else:  # <sweep>/packs/<hash of the member run ids>: the same ids, the same hash
        ref_ckpt = ckpt.replace(os.path.dirname(k["dirs"][0]), os.path.dirname(ref_dirs[0]))
    (ref_step, ref_state), (step, state) = _final_state(ref_ckpt), _final_state(ckpt)
    same_state = step == ref_step == cc.STEPS and _same_leaves(state, ref_state)
    for ref, run in zip(ref_dirs, k["dirs"]):
        a, b = chaos.read_records(ref), chaos.read_records(run)
        assert a.keys() == b.keys(), f"{NAMES[i]}: logged {sorted(b)} vs {sorted(a)}"
        bad = chaos.compare_records(b, a)[1]
        fields = sorted({f for key in bad for f in a[key] if not chaos._same({f: a[key][f]}, {f: b[key].get(f)})})
        assert not bad, f"{NAMES[i]}: records at {bad[:3]} differ in {fields[:4]} (final state equal: {same_state})"
    assert same_state, f"{NAMES[i]}: the final state differs from the uninterrupted run's"
