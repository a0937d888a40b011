"""Config: overrides, derived sizes, and one clear line + exit 2 for every bad value, with nothing written."""

import os
import subprocess
import sys

import pytest
from conftest import ROOT

from maxscale import config as config_lib
from maxscale import errors
from maxscale.train import command

TINY = os.path.join(ROOT, "configs", "tiny.py")


def test_overrides_are_typed_and_derived_sizes_filled():
    cfg, flags = config_lib.parse_argv(
        [
            f"--config={TINY}",
            "--config.model.width=96",
            "--config.model.num_heads=3",
            "--config.optimizer.lr=1e-3",
            "--config.model.qk_norm=true",
            "--workdir=/tmp/x",
        ]
    )
    cfg = config_lib.resolve(cfg)
    assert cfg.model.width == 96 and cfg.model.head_dim == 32 and cfg.model.num_kv_heads == 3
    assert cfg.optimizer.lr == 1e-3 and cfg.model.qk_norm is True and flags == {"workdir": "/tmp/x"}
    assert cfg.parameterization.base_width == 96  # base shapes default to the model's own


BAD = [
    (["--config.model.widht=64"], "did you mean model.width"),
    (["--config.modle.width=64"], "did you mean model"),
    (["--config.model.width=abc"], "expected an integer"),
    (["--config.model.width=1.5"], "expected an integer"),
    (["--config.model.qk_norm=maybe"], "expected true or false"),
    (["--config.optimizer.lr=fast"], "expected a number"),
    (["--config.model.width=0"], "model.width=0 must be positive"),
    (["--config.train.steps=-5"], "train.steps=-5 must be positive"),
    (["--config.model.width=100", "--config.model.num_heads=3"], "not divisible by model.num_heads"),
    (["--config.model.num_kv_heads=3"], "not divisible by model.num_kv_heads"),
    (["--config.model.mlp=relu"], "choose one of swiglu, gelu"),
    (["--config.parameterization.name=ntk"], "choose one of sp, mup"),
    (["--config.schedule.name=step"], "choose one of constant"),
    (["--config.mesh.data=3", "--config.mesh.fsdp=1"], "devices but 8 are present"),
    (["--config.mesh.data=-1", "--config.mesh.fsdp=-1"], "at most one axis may be -1"),
    (["--config.train.batch_size=4", "--config.mesh.data=8"], "not divisible by the data-parallel size"),
    (["--config.mesh.tensor=8", "--config.mesh.data=1"], "does not divide over"),
    (["--config.data.source=/nonexistent/*.txt"], "no such file"),
    (["--config.data.seq_len=100000"], "longer than the"),
    (["--bogus=1"], "unknown flag '--bogus'"),
    (["--config.model=3"], "is a section"),
    (["--config.schedule.final_lr_fraction=2"], "must lie in [0, 1]"),
]


@pytest.mark.parametrize("args,expected", BAD, ids=[a[0][0] for a in BAD])
def test_bad_input_is_one_line_exit_2_nothing_written(args, expected, tmp_path, capsys):
    workdir = tmp_path / "run"
    code = command.main([f"--config={TINY}", f"--workdir={workdir}", "--config.data.max_bytes=300000"] + args)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and expected in err, err
    assert not workdir.exists()


def test_cli_error_has_no_traceback_and_exits_2(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "maxscale.train",
            f"--config={TINY}",
            f"--workdir={tmp_path}/r",
            "--config.model.width=100",
            "--config.model.num_heads=3",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "model.width=100" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_config_file_with_unknown_field_is_rejected(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from maxscale.config import defaults\n"
        "def get_config():\n    c = defaults()\n    c.model.widht = 3\n    return c\n"
    )
    with pytest.raises(errors.ConfigError, match="model.widht.*did you mean model.width"):
        config_lib.parse_argv([f"--config={bad}"])


def test_every_shipped_config_resolves():
    for name in ("base", "tiny", "stdlib", "shakespeare"):
        cfg = config_lib.resolve(config_lib.load(os.path.join(ROOT, "configs", f"{name}.py")))
        assert cfg.model.head_dim > 0


def test_a_field_added_since_a_run_was_written_differs_only_when_off_its_default():
    """An old run's config lacks fields added later: at their default they are no difference (so the run resumes
    and its sweep result stays valid), off it they are; absent defaults, a missing field always differs."""
    from maxscale.configdiff import diff_fields

    defaults = {"optimizer": {"lr": 1e-3, "grad_clip_mode": "auto"}, "metrics": {"wandb_project": ""}}
    old = {"optimizer": {"lr": 1e-3}}
    assert (
        diff_fields(
            old,
            {"optimizer": {"lr": 1e-3, "grad_clip_mode": "auto"}, "metrics": {"wandb_project": ""}},
            defaults=defaults,
        )
        == []
    )
    assert diff_fields(old, {"optimizer": {"lr": 1e-3, "grad_clip_mode": "relative"}}, defaults=defaults) == [
        "optimizer.grad_clip_mode None -> 'relative'"
    ]
    assert diff_fields(old, {"metrics": {"wandb_project": "p"}, "optimizer": {"lr": 1e-3}}, defaults=defaults) == [
        "metrics.wandb_project None -> 'p'"
    ]
    assert diff_fields(old, {"optimizer": {"lr": 1e-3, "grad_clip_mode": "auto"}}) == [
        "optimizer.grad_clip_mode None -> 'auto'"
    ]
