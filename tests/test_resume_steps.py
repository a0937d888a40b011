"""Restarting a run with another train.steps: fewer steps than its newest checkpoint are refused in one line with
nothing rewritten; more steps under a schedule that depends on train.steps are allowed and said in one line."""

from __future__ import annotations

import io
import os
from contextlib import redirect_stdout

import pytest
from conftest import one_device_mesh, tiny_config

from maxscale.errors import ConfigError
from maxscale.train import loop

RUN = {"train.eval_steps": 0, "train.sample_tokens": 0, "checkpoint.every": 4, "checkpoint.async_save": False}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    cfg = tiny_config(**RUN, **{"train.steps": 4})
    workdir = str(tmp_path_factory.mktemp("resume_steps") / "run")
    with redirect_stdout(io.StringIO()):
        loop.Trainer(cfg, workdir, mesh=one_device_mesh(cfg)).run()
    return workdir


def test_fewer_steps_than_the_checkpoint_are_refused_and_nothing_is_rewritten(run_dir):
    before = {n: os.path.getmtime(os.path.join(run_dir, n)) for n in os.listdir(run_dir)}
    with pytest.raises(ConfigError, match=r"train.steps=2 is below the newest checkpoint's step 4"):
        loop.check_workdir(run_dir, tiny_config(**RUN, **{"train.steps": 2}))
    assert {n: os.path.getmtime(os.path.join(run_dir, n)) for n in os.listdir(run_dir)} == before


def test_extending_a_cosine_run_says_the_lr_curve_changes(run_dir, capsys):
    loop.check_workdir(run_dir, tiny_config(**RUN, **{"train.steps": 8}))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.steps 4 -> 8: the cosine schedule" in err and "from step 5" in err
    loop.check_workdir(run_dir, tiny_config(**RUN, **{"train.steps": 4}))  # the same run: nothing to say
    assert capsys.readouterr().err == ""
