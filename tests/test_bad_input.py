"""Bad input (docs/reliability.md, guarantee 6): malformed data files, workdirs and checkpoints, and the new config
fields. Each gets one line naming the problem and the fix, exit code 2, no traceback, and nothing written or lost:
the whole test directory is hashed before and after. tests/test_config.py holds the table of bad config values.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import ROOT

from maxscale import config as config_lib
from maxscale import errors
from maxscale.parallel import sharding
from maxscale.train import checkpoint as ckpt_lib
from maxscale.train import command
from maxscale.train import data as data_lib
from maxscale.train import step as step_lib

TINY = os.path.join(ROOT, "configs", "tiny.py")
ARGS = [f"--config={TINY}", "--config.data.max_bytes=300000"]


def resolved(*extra):
    cfg, _ = config_lib.parse_argv(ARGS + list(extra))
    return config_lib.resolve(cfg)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """Made once: a token file, and a real checkpoint of a width-32 model (state of zeros, saved by orbax)."""
    base = tmp_path_factory.mktemp("artifacts")
    data_lib.write_token_file(resolved(), str(base / "tokens"))
    cfg32 = resolved("--config.model.width=32", "--config.mesh.data=1")
    setup = step_lib.Setup.build(cfg32, sharding.make_mesh(cfg32, jax.devices()[:1]))
    zeros = jax.tree.map(lambda a: jax.device_put(np.zeros(a.shape, a.dtype), a.sharding), setup.abstract_state())

    class Iterator:
        def get_state(self):
            return {"next_index": 1}

    ckpt = ckpt_lib.Checkpointer(str(base / "ckpt32" / "checkpoints"), cfg32)
    ckpt.save(1, zeros, Iterator(), cfg32)
    ckpt.close()
    return base


def _write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        fh.write(text)


def _run_dir(d, **changes):
    """A workdir holding the config.json of a run of ARGS, with `changes` ({'model.width': 32}) applied."""
    saved = json.loads(config_lib.to_json(resolved()))
    for key, value in changes.items():
        section, field = key.split(".")
        saved[section][field] = value
    _write(f"{d}/run/config.json", json.dumps(saved))
    return f"{d}/run"


def _token_file(d, a, **header_changes):
    for name in os.listdir(a):
        if name.startswith("tokens."):
            shutil.copy(os.path.join(a, name), d)
    with open(f"{d}/tokens.json") as fh:
        header = json.load(fh)
    header.update(header_changes)
    _write(f"{d}/tokens.json", json.dumps(header))
    return f"{d}/tokens.json"


def _truncated_token_file(d, a):
    path = _token_file(d, a)
    os.truncate(f"{d}/tokens.train.bin", 100)
    return path


def _checkpoint_of_another_model(d, a):
    shutil.copytree(f"{a}/ckpt32", f"{d}/run")
    return _run_dir(d)  # config.json agrees with the command; the checkpoint inside does not


# id -> (prepare(tmp_dir, artifacts_dir) -> extra args, expected words of the one line)
CASES = {
    "missing-data-file": (lambda d, a: [f"--config.data.source={d}/nope.txt"], "no such file"),
    "empty-data-file": (
        lambda d, a: (_write(f"{d}/empty.txt", ""), [f"--config.data.source={d}/empty.txt"])[1],
        "the files are empty; pass a non-empty text corpus",
    ),
    "empty-data-directory": (
        lambda d, a: (os.makedirs(f"{d}/docs"), [f"--config.data.source={d}/docs"])[1],
        "no such file, directory or glob match",
    ),
    "data-shorter-than-seq-len": (
        lambda d, a: (_write(f"{d}/short.txt", "x" * 50), [f"--config.data.source={d}/short.txt"])[1],
        "data.seq_len=64 is longer than the train split",
    ),
    "token-header-not-json": (
        lambda d, a: (_write(f"{d}/t.json", "garbage"), [f"--config.data.source={d}/t.json"])[1],
        "not a readable token-file header",
    ),
    "token-header-wrong-format": (
        lambda d, a: [f"--config.data.source={_token_file(d, a, format='other')}"],
        "not a maxscale-tokens-v1 header; make one with tools/prepare_data.py",
    ),
    "token-file-truncated": (lambda d, a: [f"--config.data.source={_truncated_token_file(d, a)}"], "is missing or not"),
    "token-vocab-above-model-vocab": (
        lambda d, a: [f"--config.data.source={_token_file(d, a, vocab_size=70000)}"],
        "model.vocab_size=256 is smaller than the data's vocabulary",
    ),
    "workdir-is-a-file": (
        lambda d, a: (_write(f"{d}/file", "x"), ["--workdir=FILE"])[1],
        "is a file, not a directory; choose another --workdir",
    ),
    "workdir-below-a-file": (
        lambda d, a: (_write(f"{d}/file", "x"), [f"--workdir={d}/file/run"])[1],
        "is a file, not a directory",
    ),
    # root ignores permission bits: these are refused by the kernel, which only a real attempt finds out
    "workdir-under-proc": (lambda d, a: ["--workdir=/proc/maxscale-run"], "cannot create directories under /proc"),
    "workdir-under-sys": (lambda d, a: ["--workdir=/sys/maxscale-run"], "cannot create directories under /sys"),
    "workdir-flag-missing": (lambda d, a: ["--workdir="], "--workdir is required"),
    "workdir-run-of-another-width": (
        lambda d, a: [f"--workdir={_run_dir(d, **{'model.width': 32})}"],
        "holds a run with a different config (model.width 32 -> 64)",
    ),
    "workdir-run-of-another-global-batch": (
        lambda d, a: [f"--workdir={_run_dir(d, **{'train.batch_size': 16})}"],
        "different config (train.batch_size 16 -> 8)",
    ),
    "workdir-config-json-corrupt": (
        lambda d, a: (_write(f"{d}/run/config.json", '{"model": {"wid'), [f"--workdir={d}/run"])[1],
        "config.json is unreadable",
    ),
    "workdir-config-json-not-an-object": (
        lambda d, a: (_write(f"{d}/run/config.json", "[1, 2]"), [f"--workdir={d}/run"])[1],
        "config.json is unreadable (not a JSON object)",
    ),
    "checkpoint-of-another-model-shape": (
        lambda d, a: [f"--workdir={_checkpoint_of_another_model(d, a)}"],
        "checkpoint 1 was written with a different config (model.head_dim 8 -> 16; model.width 32 -> 64",
    ),
    "checkpoints-path-is-a-file": (
        lambda d, a: (_write(f"{_run_dir(d)}/checkpoints", "x"), [f"--workdir={d}/run"])[1],
        "checkpoints is not a writable directory",
    ),
    "config-file-missing": (lambda d, a: [f"--config={d}/nope.py"], "--config: no such file"),
    "config-file-syntax-error": (
        lambda d, a: (_write(f"{d}/c.py", "def get_config(:\n"), [f"--config={d}/c.py"])[1],
        "failed to load (SyntaxError",
    ),
    "config-file-without-get-config": (
        lambda d, a: (_write(f"{d}/c.py", "x = 1\n"), [f"--config={d}/c.py"])[1],
        "has no get_config()",
    ),
    "positional-argument": (lambda d, a: ["configs/tiny.py"], "expected --name=value"),
    "nan-policy-unknown": (lambda d, a: ["--config.train.nan_policy=ignore"], "choose one of stop, skip"),
    "grace-period-negative": (
        lambda d, a: ["--config.train.preempt_grace_s=-1"],
        "train.preempt_grace_s=-1.0 must be >= 0",
    ),
    "spike-factor-below-one": (lambda d, a: ["--config.train.spike_factor=0.5"], "must be > 1"),
    "debug-nan-step-not-an-integer": (lambda d, a: ["--config.train.debug_nan_at_step=seven"], "expected an integer"),
    "max-to-keep-zero": (
        lambda d, a: ["--config.checkpoint.max_to_keep=0"],
        "checkpoint.max_to_keep=0 must be positive",
    ),
}


def snapshot(root) -> dict:
    """Every path under `root` with a hash of its bytes: equal before and after means nothing written or lost."""
    out = {}
    for d, dirs, files in os.walk(root):
        for name in dirs:
            out[os.path.relpath(os.path.join(d, name), root)] = "dir"
        for name in files:
            path = os.path.join(d, name)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def prepared(case, tmp_path, artifacts):
    prepare, expected = CASES[case]
    extra = prepare(str(tmp_path), str(artifacts))
    extra = [a.replace("--workdir=FILE", f"--workdir={tmp_path}/file") for a in extra]
    args = ARGS + extra
    if not any(a.startswith("--workdir") for a in extra):
        args.append(f"--workdir={tmp_path}/fresh")
    if any(a.startswith("--config=") for a in extra):
        args.remove(f"--config={TINY}")
    return args, expected


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_nothing_written_or_lost(case, tmp_path, artifacts, capsys):
    args, expected = prepared(case, tmp_path, artifacts)
    before = snapshot(tmp_path)
    code = command.main(args)
    err = capsys.readouterr().err.strip()
    assert code == errors.EXIT_USAGE == 2
    assert len(err.splitlines()) == 1 and err.startswith("maxscale.train: error: ") and expected in err, err
    assert snapshot(tmp_path) == before


def test_at_least_twenty_bad_inputs_are_tabled():
    from test_config import BAD

    assert len(CASES) >= 20 and len(CASES) + len(BAD) >= 40


SUBPROCESS_SAMPLE = (
    "missing-data-file",
    "workdir-below-a-file",
    "workdir-config-json-corrupt",
    "checkpoint-of-another-model-shape",
    "token-file-truncated",
)


@pytest.mark.slow
def test_a_sample_as_real_processes_has_no_traceback_and_touches_nothing(tmp_path, artifacts):
    runs = {}
    for case in SUBPROCESS_SAMPLE:  # started together: each costs an interpreter start-up
        d = tmp_path / case
        d.mkdir()
        args, expected = prepared(case, d, artifacts)
        before = snapshot(d)
        env = dict(os.environ, PYTHONPATH=ROOT)
        proc = subprocess.Popen(
            [sys.executable, "-m", "maxscale.train", *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        runs[case] = (proc, d, before, expected)
    results = {case: run[0].communicate(timeout=300) for case, run in runs.items()}
    for case, (proc, d, before, expected) in runs.items():
        out, err = results[case]
        assert proc.returncode == 2, (case, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0] and "Traceback" not in err, (case, err)
        assert out == ""
        assert snapshot(d) == before, case
