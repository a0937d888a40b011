"""Fuzzed checkpoint damage (issue 26, item 4): truncated or flipped bytes in any file of the newest checkpoint of
either tier, a missing manifest, a missing file, an empty step directory, a step directory replaced by a file.
Every case must end in exit 0 with the run resumed from the newest intact checkpoint EXACTLY (its records and final
state equal an undamaged reference run's), or in one line on stderr and exit 2 or 74 with the workdir as it was;
never a traceback.

Cost: the module trains an undamaged reference once (persistent saves at 4, 8, 12, two kept; local saves at 2, 6, 10
in checkpoint.local_dir, two kept) and a run stopped after step 10 (the local tier then holds the newest step). Each
example copies one of them, damages it and runs `maxscale.train`'s main() in-process with the same argv (one compiled
Setup, one device); a few cases run `python -m maxscale.train` to prove the exit codes end to end.

Not fuzzed: flipped bytes in a step that also lost its manifest (killed between orbax's commit and the hashing, then
damaged). orbax's zstd chunks carry no checksum, so a flip inside one restores wrong numbers silently (tried: the
resumed run differed, or stopped on a non-finite loss with exit 3); only the manifest can catch it.
"""

import glob
import json
import os
import shutil
import subprocess
import sys
import zlib

import jax
import pytest
from conftest import ROOT
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from maxscale import errors
from maxscale.parallel import sharding
from maxscale.tools import chaos
from maxscale.train import checkpoint as ckpt_lib
from maxscale.train import command, orbax_quiet
from maxscale.train import data as data_lib
from maxscale.train import step as step_lib

STEPS = {
    "train.steps": 12,
    "train.log_every": 1,
    "train.eval_every": 6,
    "train.eval_steps": 1,
    "train.sample_tokens": 0,
    "checkpoint.every": 4,
    "checkpoint.max_to_keep": 2,
    "checkpoint.local_every": 2,
    "checkpoint.local_max_to_keep": 2,
    "data.max_bytes": 400_000,
    **{f"mesh.{a}": 1 for a in ("data", "fsdp", "tensor", "expert")},
}
TIERS = {"persistent": "run/checkpoints", "local": "node-local"}  # under the case directory
KINDS = ["truncate", "flip", "no-manifest", "no-file", "empty-dir", "dir-is-file"]
TRIED: dict = {}  # (snapshot, tier, kind) -> {cases, exit 0, exit 2, exit 74}: printed by the summary test


def argv(case: str) -> list[str]:
    """The one command line of every run here; `case` holds the workdir (run/) and the local tier (node-local/)."""
    return [
        f"--config={os.path.join(ROOT, 'configs', 'tiny.py')}",
        *(f"--config.{k}={v}" for k, v in STEPS.items()),
        f"--config.checkpoint.local_dir={case}/node-local",
        f"--workdir={case}/run",
    ]


class Stop(Exception):
    pass


class World(dict):
    def __repr__(self) -> str:  # hypothesis prints the arguments of a failing case: not the whole Setup
        return f"World({self['case']})"


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_corpus):
    """The case directory, the shared Setup and the two snapshots: {"case", "setup", "complete", "stopped"}.

    command.main runs unchanged but for three memos: the mesh is one device, Setup.build compiles once, the corpus is
    the session's (all runs here share one program and one corpus)."""
    root = tmp_path_factory.mktemp("fuzz_checkpoint")
    case, setups = str(root / "case"), {}
    build, make_mesh = step_lib.Setup.build.__func__, sharding.make_mesh

    def one_setup(cls, cfg, mesh):
        if "setup" not in setups:
            setups["setup"] = build(cls, cfg, mesh)
        return setups["setup"]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sharding, "make_mesh", lambda cfg, devices=None: make_mesh(cfg, jax.devices()[:1]))
        mp.setattr(step_lib.Setup, "build", classmethod(one_setup))
        mp.setattr(data_lib, "load_corpus", lambda cfg: tiny_corpus)
        assert command.main(argv(case)) == 0
        shutil.move(case, root / "complete")
        setup = setups["setup"]
        original, calls = setup.train_step, [0]

        def stop_before_11(state, batch):
            calls[0] += 1
            if calls[0] == 11:
                raise Stop
            return original(state, batch)

        setup.train_step = stop_before_11
        try:
            with pytest.raises(Stop):
                command.main(argv(case))
        finally:
            setup.train_step = original
        shutil.move(case, root / "stopped")
        yield World(case=case, setup=setup, complete=str(root / "complete"), stopped=str(root / "stopped"))


@pytest.fixture(scope="module")
def reference(world):
    """The undamaged run's records and final state, and each snapshot's committed steps per tier."""
    ref = os.path.join(world["complete"], "run")
    _, state = ckpt_lib.load_state(os.path.join(ref, "checkpoints"), world["setup"].abstract_state())
    steps = {
        (snap, tier): ckpt_lib.committed_steps(os.path.join(world[snap], TIERS[tier]))
        for snap in ("complete", "stopped")
        for tier in TIERS
    }
    assert steps == {
        ("complete", "persistent"): [8, 12],
        ("complete", "local"): [6, 10],
        ("stopped", "persistent"): [4, 8],
        ("stopped", "local"): [6, 10],
    }
    return {"records": chaos.read_records(ref), "state": state, "steps": steps}


def tree_digest(directory: str) -> dict:
    """{relative path: (size, CRC-32) of a file, or None for a directory}: the workdir as it is on disk."""
    out = {}
    for root, dirs, files in os.walk(directory):
        for d in dirs:
            out[os.path.relpath(os.path.join(root, d), directory)] = None
        for f in files:
            path = os.path.join(root, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, directory)] = (os.path.getsize(path), zlib.crc32(fh.read()))
    return out


def step_files(step_dir: str) -> list[str]:
    """The files of a step, relative, in an order that does not depend on orbax's random chunk names."""
    files = [os.path.relpath(p, step_dir) for p in glob.glob(f"{step_dir}/**/*", recursive=True) if os.path.isfile(p)]
    return sorted(files, key=lambda rel: (os.path.dirname(rel), os.path.getsize(os.path.join(step_dir, rel)), rel))


def damage(step_dir: str, kind: str, rel: str = "", fraction: float = 0.5, mask: int = 0xFF, unhashed=False) -> str:
    """Damages one step directory; returns what was done, for hypothesis' report. `unhashed`: the manifest goes too
    (a run killed between orbax's commit and the hashing), so only orbax's own reads can notice the damage."""
    path = os.path.join(step_dir, rel)
    if unhashed and rel != ckpt_lib.MANIFEST:
        os.remove(os.path.join(step_dir, ckpt_lib.MANIFEST))
    if kind == "truncate":
        size = os.path.getsize(path)
        os.truncate(path, int(size * fraction))
        return f"{rel} truncated from {size} to {int(size * fraction)} bytes"
    if kind == "flip":
        size = os.path.getsize(path)
        if size == 0:
            return f"{rel} is empty: nothing to flip"
        at = min(int(size * fraction), size - 1)
        with open(path, "r+b") as fh:
            fh.seek(at)
            byte = fh.read(1)[0]
            fh.seek(at)
            fh.write(bytes([byte ^ mask]))
        return f"{rel}: byte {at} of {size} xor {mask:#x}"
    if kind == "no-manifest":
        os.remove(os.path.join(step_dir, ckpt_lib.MANIFEST))
        return "manifest removed"
    if kind == "no-file":
        os.remove(path)
        return f"{rel} removed"
    shutil.rmtree(step_dir)
    if kind == "empty-dir":
        os.mkdir(step_dir)
        return "step directory emptied"
    with open(step_dir, "wb") as fh:
        fh.write(os.urandom(int(64 * fraction)))
    return "step directory replaced by a file"


def resume(world, capfd) -> tuple[int, list[str]]:
    """Runs the command in-process: (exit code, stderr lines that are not orbax's own absl log lines). orbax's
    leftovers of abandoned reads are dropped by orbax_quiet; any other unraisable exception reaches pytest's hook,
    which the module turns into an error."""
    capfd.readouterr()
    previous = sys.unraisablehook
    sys.unraisablehook = orbax_quiet._hook(previous)  # pytest replaced the one installed at import
    try:
        code = command.main(argv(world["case"]))
    finally:
        sys.unraisablehook = previous
    err = capfd.readouterr().err
    assert "Traceback" not in err, err
    return code, [line for line in err.splitlines() if line.strip() and not line.startswith(ABSL)]


def assert_resumed_exactly(world, reference, damaged: str, lines: list[str]) -> None:
    """Exit 0: the run's records and final state are the reference's, the newest persistent step verifies, nothing
    half-written is left, and the damage, if noticed, was said in one line and moved aside."""
    case, run = world["case"], os.path.join(world["case"], "run")
    assert chaos.read_records(run) == reference["records"]
    step, state = ckpt_lib.load_state(os.path.join(run, "checkpoints"), world["setup"].abstract_state())
    assert step == 12 and chaos.same_state(state, reference["state"])
    for tier in TIERS.values():
        names = os.listdir(os.path.join(case, tier))
        assert not [n for n in names if "orbax-checkpoint-tmp" in n or n.endswith(".deleting")], names
    steps = ckpt_lib.committed_steps(os.path.join(run, "checkpoints"))
    assert steps[-1] == 12 and len(steps) == 2, steps  # retention ran (8 may be gone: it may be what was damaged)
    assert len(lines) <= 1, lines
    if lines:
        tier_dir, step = os.path.split(damaged)
        assert lines[0].startswith(f"maxscale.train: warning: checkpoint {step} in {tier_dir} is unusable"), lines
        assert os.path.isdir(f"{damaged}.corrupt"), lines


def count(key: tuple, outcome: str) -> None:
    TRIED.setdefault(key, {"cases": 0, "exit 0": 0, "exit 2": 0, "exit 74": 0})
    TRIED[key]["cases"] += 1
    TRIED[key][outcome] += 1


ABSL = ("WARNING:absl:", "ERROR:absl:")  # orbax's one-line notes on a damaged _CHECKPOINT_METADATA, not ours
UNRAISABLE = pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")


@st.composite
def damages(draw):
    """(snapshot, tier, kind, which file, where in it, xor mask, unhashed). Flipped bytes in a step without its
    manifest are left out: nothing but the manifest can notice a flip inside an array chunk (see the report)."""
    kind = draw(st.sampled_from(KINDS + ["truncate", "flip"] * 2))  # bytes damaged: most of the cases
    return (
        draw(st.sampled_from(["complete", "stopped"])),
        draw(st.sampled_from(sorted(TIERS))),
        kind,
        draw(st.integers(0, 10**6)),
        draw(st.floats(0, 1, exclude_max=True)),
        draw(st.integers(1, 255)),
        kind in ("truncate", "no-file") and draw(st.booleans()),
    )


@UNRAISABLE
@settings(
    max_examples=100,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(case=damages())
def test_damaged_newest_checkpoint_resumes_exactly_or_stops_in_one_line(world, reference, capfd, case):
    snapshot, tier, kind, pick, fraction, mask, unhashed = case
    shutil.rmtree(world["case"], ignore_errors=True)
    shutil.copytree(world[snapshot], world["case"], symlinks=True)
    step_dir = os.path.join(world["case"], TIERS[tier], str(reference["steps"][(snapshot, tier)][-1]))
    files = step_files(step_dir)
    note(f"{snapshot} {tier} {damage(step_dir, kind, files[pick % len(files)], fraction, mask, unhashed)}")
    before = tree_digest(world["case"])
    code, lines = resume(world, capfd)
    note(f"exit {code}: {lines}")
    count((snapshot, tier, kind + (" unhashed" if unhashed else "")), f"exit {code}")
    if code == 0:
        assert_resumed_exactly(world, reference, step_dir, lines)
    else:
        assert code in (errors.EXIT_USAGE, errors.EXIT_CHECKPOINT), (code, lines)
        assert len(lines) == 1 and lines[0].startswith("maxscale.train: error: "), lines
        assert tree_digest(world["case"]) == before  # nothing moved, nothing half-written


def fresh_case(world, snapshot: str) -> str:
    shutil.rmtree(world["case"], ignore_errors=True)
    shutil.copytree(world[snapshot], world["case"], symlinks=True)
    return world["case"]


@UNRAISABLE
def test_a_flipped_digit_in_the_config_item_falls_back_instead_of_refusing_the_workdir(world, reference, capfd):
    """The newest step's config item still parses after one flipped bit ("width": 64 -> 74). check_workdir compared
    it with the run's config and refused the workdir (exit 2: 'written with a different config ... move the
    checkpoints away'); its manifest says it is damaged, so it is no evidence and checkpoint 10 resumes the run."""
    step_dir = os.path.join(fresh_case(world, "complete"), "run", "checkpoints", "12")
    item = os.path.join(step_dir, "config", "metadata")
    with open(item, "rb") as fh:
        at = fh.read().index(b'"width": 64') + len('"width": ')
    damage(step_dir, "flip", "config/metadata", (at + 0.5) / os.path.getsize(item), 0x01)
    assert json.loads(open(item).read())["model"]["width"] == 74
    code, lines = resume(world, capfd)
    assert code == 0, lines
    assert_resumed_exactly(world, reference, step_dir, lines)
    assert len(lines) == 1 and "config/metadata fails its CRC-32 check" in lines[0], lines


def test_summary_of_the_fuzzed_cases():
    """Prints what the fuzz tried (pytest -s shows it): cases and outcomes per (snapshot, tier, damage)."""
    if not TRIED:
        pytest.skip("the fuzz test did not run in this session")
    for key, outcome in sorted(TRIED.items()):
        print("fuzz_checkpoint:", *key, outcome)
    total = sum(o["cases"] for o in TRIED.values())
    print(f"fuzz_checkpoint: {total} cases, tracebacks 0 (any would have failed the test)")
    assert {k[2].split()[0] for k in TRIED} == set(KINDS)  # every kind of damage was tried


# ----------------------------------------------------------------------------------------------------------------
# Real processes: the exit codes and stderr a user sees


def train(world, env) -> tuple[int, list[str]]:
    r = subprocess.run(
        [sys.executable, "-m", "maxscale.train", *argv(world["case"])],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr
    return r.returncode, [line for line in r.stderr.splitlines() if line.strip() and not line.startswith(ABSL)]


def test_process_unhashed_truncated_local_step_falls_back_exactly_without_tracebacks(world, child_env):
    """The newest step (local 10) was killed before its hashing and then truncated: only orbax's reads notice,
    and their abandoned siblings used to print hundreds of traceback lines (orbax_quiet). One line, exit 0, and
    the run equals the same process resuming from checkpoint 8 with step 10 never written (a process compiles
    its own program: its numbers are compared with its own kind, not with the in-process reference's)."""
    shutil.rmtree(os.path.join(fresh_case(world, "stopped"), "node-local", "10"))
    code, lines = train(world, child_env)
    assert code == 0 and lines == [], lines
    run = os.path.join(world["case"], "run")
    control = {
        "records": chaos.read_records(run),
        "state": ckpt_lib.load_state(os.path.join(run, "checkpoints"), world["setup"].abstract_state())[1],
    }
    step_dir = os.path.join(fresh_case(world, "stopped"), "node-local", "10")
    damage(step_dir, "truncate", "state/manifest.ocdbt", 0.0, unhashed=True)
    code, lines = train(world, child_env)
    assert code == 0, lines
    assert_resumed_exactly(world, control, step_dir, lines)
    assert len(lines) == 1 and "resuming from checkpoint 8 in " in lines[0], lines


def test_process_no_step_restores_exits_74_in_one_line_and_moves_nothing(world, child_env):
    case = fresh_case(world, "complete")
    for tier in TIERS.values():
        for step in ckpt_lib.committed_steps(os.path.join(case, tier)):
            step_dir = os.path.join(case, tier, str(step))
            damage(step_dir, "flip", step_files(step_dir)[-1], 0.5, 0x10)
    before = tree_digest(case)
    code, lines = train(world, child_env)
    assert code == errors.EXIT_CHECKPOINT == 74, lines
    assert len(lines) == 1 and lines[0].startswith("maxscale.train: error: no checkpoint in "), lines
    assert "step 12" in lines[0] and "step 6" in lines[0], lines
    assert tree_digest(case) == before


def test_process_local_tier_replaced_by_a_file_exits_2_in_one_line(world, child_env):
    case = fresh_case(world, "complete")
    shutil.rmtree(os.path.join(case, "node-local"))
    with open(os.path.join(case, "node-local"), "w") as fh:
        fh.write("not a directory")
    before = tree_digest(case)
    code, lines = train(world, child_env)
    assert code == errors.EXIT_USAGE == 2, lines
    assert len(lines) == 1 and lines[0].startswith("maxscale.train: error: checkpoint.local_dir="), lines
    assert tree_digest(case) == before
