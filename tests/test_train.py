"""The trainer end to end on the tiny config: loss falls, files are written, a restart resumes at the right step."""

import json
import os
import shutil

import numpy as np
from conftest import one_device_mesh, tiny_config

from maxscale.train import command, loop, metrics


def run(cfg, workdir, corpus):
    return loop.Trainer(cfg, str(workdir), mesh=one_device_mesh(cfg), corpus=corpus).run()


def test_loss_falls_and_run_dir_is_complete(tmp_path, tiny_corpus):
    cfg = tiny_config(**{"train.steps": 60, "train.eval_every": 30, "checkpoint.every": 30})
    result = run(cfg, tmp_path, tiny_corpus)
    logged = metrics.read_metrics(str(tmp_path))
    losses = [m["train/loss"] for m in logged if "train/loss" in m]
    assert losses[-1] < losses[0] - 1.0, losses  # bytes start at ln(256) = 5.5
    assert result["eval/loss"] < 4.0
    train_rows = [m for m in logged if "train/loss" in m]
    for key in ("step", "lr", "grad_norm", "tokens_seen", "tokens_per_s", "mfu"):
        assert key in train_rows[-1]
    assert train_rows[-1]["tokens_per_s"] > 0 and train_rows[-1]["mfu"] > 0
    # the first logged step includes compilation: it has no rate, rather than a 0 that reads as a stall
    assert "tokens_per_s" not in train_rows[0] and "mfu" not in train_rows[0]
    assert train_rows[-1]["tokens_seen"] == 60 * cfg.train.batch_size * cfg.data.seq_len
    assert any("eval/loss" in m for m in logged)
    assert json.load(open(tmp_path / "config.json"))["model"]["width"] == cfg.model.width
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["30", "60"]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))


def test_restart_resumes_from_checkpoint_and_matches_uninterrupted(tmp_path, tiny_corpus):
    full = tiny_config(
        **{
            "train.steps": 20,
            "train.log_every": 1,
            "checkpoint.every": 10,
            "train.eval_steps": 0,
            "train.sample_tokens": 0,
        }
    )
    run(full, tmp_path / "full", tiny_corpus)
    # The same run, stopped after 10 steps (steps is a resumable field), then restarted with the full length.
    first = tiny_config(
        **{
            "train.steps": 20,
            "train.log_every": 1,
            "checkpoint.every": 10,
            "train.eval_steps": 0,
            "train.sample_tokens": 0,
        }
    )
    trainer = loop.Trainer(first, str(tmp_path / "split"), mesh=one_device_mesh(first), corpus=tiny_corpus)
    trainer.cfg.train.steps = 10  # same schedule horizon in config.json; the loop stops at 10
    _ = trainer.run()
    trainer2 = loop.Trainer(full, str(tmp_path / "split"), mesh=one_device_mesh(full), corpus=tiny_corpus)
    result = trainer2.run()
    assert result["step"] == 20
    a = {m["step"]: m["train/loss"] for m in metrics.read_metrics(str(tmp_path / "full")) if "train/loss" in m}
    b = {m["step"]: m["train/loss"] for m in metrics.read_metrics(str(tmp_path / "split")) if "train/loss" in m}
    assert sorted(b) == list(range(1, 21))  # each step logged once: resumed at 10, not at 0
    np.testing.assert_allclose([b[s] for s in range(11, 21)], [a[s] for s in range(11, 21)], rtol=1e-6)


def test_incompatible_workdir_is_refused(tmp_path, tiny_corpus, capsys):
    cfg = tiny_config(**{"train.steps": 2, "train.eval_steps": 0, "train.sample_tokens": 0, "schedule.warmup_steps": 0})
    run(cfg, tmp_path, tiny_corpus)
    before = sorted(os.listdir(tmp_path))
    code = command.main(
        [
            f"--config={os.path.join(os.path.dirname(__file__), '..', 'configs', 'tiny.py')}",
            f"--workdir={tmp_path}",
            "--config.model.width=32",
        ]
    )
    assert code == 2 and "different config" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == before


RESUME_FIELDS = {
    "train.steps": 20,
    "train.log_every": 1,
    "checkpoint.every": 10,
    "train.eval_steps": 0,
    "train.sample_tokens": 0,
}


def test_tensorboard_scalars_have_each_step_once_after_a_resume(tmp_path, tiny_corpus):
    """A killed run logged steps past its last checkpoint; the resumed run logs them again. metrics.jsonl is rewound;
    TensorBoard's append-only event files get a purge at the resume step, so a reader sees each step once."""
    cfg = tiny_config(**RESUME_FIELDS)
    workdir = tmp_path / "run"
    trainer = loop.Trainer(cfg, str(workdir), mesh=one_device_mesh(cfg), corpus=tiny_corpus)
    trainer.cfg.train.steps = 15  # stops (and saves) at 15 ...
    trainer.run()
    shutil.rmtree(workdir / "checkpoints" / "15")  # ... as if killed before that save committed
    cfg = tiny_config(**RESUME_FIELDS)
    loop.Trainer(cfg, str(workdir), mesh=one_device_mesh(cfg), corpus=tiny_corpus).run()
    tb = metrics.read_tensorboard_scalars(workdir / "tensorboard")["train/loss"]
    assert [s for s, _ in tb] == list(range(1, 21)), [s for s, _ in tb]
    jsonl = {m["step"]: m["train/loss"] for m in metrics.read_metrics(workdir) if "train/loss" in m}
    np.testing.assert_allclose([v for _, v in tb], [jsonl[s] for s in range(1, 21)], rtol=1e-6)
