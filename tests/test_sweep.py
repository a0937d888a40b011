"""Sweeps: expansion, run ids, SLURM scripts, and local runs that skip finished work and resume interrupted runs."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from maxscale import config as config_lib  # noqa: E402
from maxscale.analysis import transfer  # noqa: E402
from maxscale.errors import ConfigError  # noqa: E402
from maxscale.parallel import sharding  # noqa: E402
from maxscale.tools import sweep  # noqa: E402
from maxscale.train import loop  # noqa: E402

BASE = """
from maxscale.config import defaults

def get_config():
    c = defaults()
    c.model.update(width=32, depth=1, num_heads=2, ffn_size=64)
    c.data.update(seq_len=32, max_bytes=300_000)
    c.train.update(batch_size=4, steps=4, eval_every=4, eval_steps=1, log_every=2, sample_tokens=0, peak_flops=1e11)
    c.schedule.update(warmup_steps=0)
    c.checkpoint.update(every=2, async_save=False)
    c.mesh.update(data=1)
    return c
"""


def write_sweep(tmp_path, body, name="demo"):
    (tmp_path / "base.py").write_text(BASE)
    path = tmp_path / f"{name}.py"
    path.write_text(
        "from maxscale import config, parameterization\n"
        f"BASE = {str(tmp_path / 'base.py')!r}\n\n"
        "def get_sweep():\n" + textwrap.indent(textwrap.dedent(body).strip("\n"), "    ") + "\n"
    )
    return str(path)


def test_grid_times_points_with_bundled_fields(tmp_path):
    path = write_sweep(
        tmp_path,
        """
        base = config.resolve(config.load(BASE))
        return {"config": BASE, "fixed": {"optimizer.weight_decay": 0.1},
                "grid": {"shape": [parameterization.scale_shapes(base, width=w) for w in (32, 64)],
                         "optimizer.lr": [1e-3, 2e-3, 4e-3]},
                "points": [{"parameterization.name": "sp"}, {"parameterization.name": "mup"}]}
        """,
    )
    s = sweep.load_sweep(path)
    runs = sweep.expand(s, str(tmp_path / "runs"))
    assert s["name"] == "demo" and len(runs) == 2 * 3 * 2
    first = runs[0]["config"]
    assert (first.model.width, first.optimizer.lr, first.parameterization.name) == (32, 1e-3, "sp")
    wide = runs[-1]["config"]
    assert (wide.model.width, wide.model.ffn_size, wide.model.head_dim) == (64, 128, 32)
    assert wide.parameterization.base_width == 32
    assert all(r["config"].optimizer.weight_decay == 0.1 for r in runs)
    ids = [r["id"] for r in runs]
    assert len(set(ids)) == len(ids)
    assert ids == [r["id"] for r in sweep.expand(sweep.load_sweep(path), str(tmp_path / "runs"))]  # stable
    assert runs[0]["dir"] == str(tmp_path / "runs" / "demo" / ids[0])


def test_run_id_ignores_logging_and_mesh_but_not_hyperparameters():
    cfg = config_lib.resolve(config_lib.defaults())
    other = sweep.apply_overrides(cfg, {"train.log_every": 7, "mesh.data": 1, "checkpoint.every": 3})
    assert sweep.run_id(config_lib.resolve(other)) == sweep.run_id(cfg)
    lr = sweep.apply_overrides(cfg, {"optimizer.lr": 1e-4})
    assert sweep.run_id(config_lib.resolve(lr)) != sweep.run_id(cfg)
    # a section added later at its defaults (here: one more, empty) leaves ids alone; so does switching clipping
    # off under muP, whose auto clip mode then stays unresolved
    grown = config_lib.resolve(config_lib.defaults())
    grown.unlock()
    grown.new_section = {"knob": 1}
    default = json.loads(config_lib.to_json(config_lib.defaults()))
    default["new_section"] = {"knob": 1}
    assert sweep._strip(json.loads(config_lib.to_json(grown)), default) == sweep._strip(
        json.loads(config_lib.to_json(cfg)), json.loads(config_lib.to_json(config_lib.defaults()))
    )
    mup = {"parameterization.name": "mup", "optimizer.grad_clip": 0.0}
    assert config_lib.resolve(sweep.apply_overrides(config_lib.defaults(), mup)).optimizer.grad_clip_mode == "auto"


def test_bad_sweeps_are_one_line_errors(tmp_path):
    bad_field = write_sweep(tmp_path, 'return {"config": BASE, "grid": {"optimizer.lrr": [1e-3]}}', "bad_field")
    with pytest.raises(ConfigError, match="did you mean optimizer.lr"):
        sweep.expand(sweep.load_sweep(bad_field))
    bad_value = write_sweep(tmp_path, 'return {"config": BASE, "grid": {"model.width": [32, 33]}}', "bad_value")
    with pytest.raises(ConfigError, match="point 1"):
        sweep.expand(sweep.load_sweep(bad_value))
    dup = write_sweep(tmp_path, 'return {"config": BASE, "grid": {"optimizer.lr": [1e-3, 0.001]}}', "dup")
    with pytest.raises(ConfigError, match="same config"):
        sweep.expand(sweep.load_sweep(dup))
    no_corpus = write_sweep(
        tmp_path, f'return {{"config": BASE, "fixed": {{"data.source": {str(tmp_path / "nope.txt")!r}}}}}', "no_corpus"
    )
    cases = ([str(tmp_path / "missing.py")], [bad_field], [dup, "--jobs=0"], [dup, "--job=2"], [no_corpus, "--root=r"])
    for args in cases:
        out = subprocess.run(
            [sys.executable, str(REPO / "tools" / "sweep.py"), *args],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )
        assert out.returncode == 2, (args, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1 and out.stderr.startswith("sweep: error:"), out.stderr
    assert "data.source=" in out.stderr and not (tmp_path / "r").exists()  # the missing corpus: no plan written


def test_parallel_jobs_share_a_gpu_without_preallocating_it():
    assert sweep.job_env({"PATH": "/bin"}) == {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "PATH": "/bin"}
    assert sweep.job_env({"XLA_PYTHON_CLIENT_PREALLOCATE": "true"})["XLA_PYTHON_CLIENT_PREALLOCATE"] == "true"


def test_run_line_names_fields_whose_last_names_collide():
    line = sweep._short({"train.seed": 1, "data.seed": 2, "optimizer.lr": 0.5})
    assert line == "train.seed=1 data.seed=2 lr=0.5"


def test_slurm_array_script(tmp_path):
    path = write_sweep(tmp_path, 'return {"config": BASE, "grid": {"optimizer.lr": [1e-3, 2e-3, 4e-3]}}')
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "sweep.py"),
            path,
            "--slurm",
            "--jobs=2",
            f"--root={tmp_path / 'runs'}",
            "--partition=gpu",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    script = (tmp_path / "runs" / "demo" / "sweep.sbatch").read_text()
    assert "#SBATCH --array=0-2%2" in script and "#SBATCH --partition=gpu" in script
    assert 'tools/sweep.py --run_dir="$RUN_DIR"' in script
    lines = (tmp_path / "runs" / "demo" / "runs.txt").read_text().split()
    assert len(lines) == 3 and all(os.path.isfile(os.path.join(d, "sweep_run.json")) for d in lines)


def test_local_runs_skip_finished_resume_interrupted_and_mark_diverged(tmp_path, capfd):
    path = write_sweep(
        tmp_path,
        """
        return {"config": BASE, "points": [{"optimizer.lr": 3e-3}, {"optimizer.lr": 1e-2},
                                           {"optimizer.lr": 1e-2, "train.debug_nan_at_step": 3}]}
        """,
    )
    s = sweep.load_sweep(path)
    root = str(tmp_path / "runs")
    runs = sweep.expand(s, root)
    sweep.write_plan(s, runs, root)
    mesh = sharding.make_mesh(runs[0]["config"], jax.devices()[:1])

    # interrupt the first run after 2 of its 4 steps (a checkpoint is written at step 2)
    first = runs[0]
    half = config_lib.resolve(sweep.apply_overrides(first["config"], {"train.steps": 2, "train.eval_every": 2}))
    loop.Trainer(half, first["dir"], mesh=mesh).run()
    assert sweep.status(first["dir"]) == "started"

    capfd.readouterr()
    outcome = sweep.run_local(runs, mesh=mesh)
    assert list(outcome.values()) == ["done", "done", "diverged"]
    # resumed at step 2, not restarted: the trainer says so (once, for this run only), and each step is logged once
    said = [line for line in capfd.readouterr().out.splitlines() if line.startswith("resumed from ")]
    assert said == [f"resumed from {os.path.join(first['dir'], 'checkpoints')} at step 2"], said
    logged_steps = [
        json.loads(line)["step"] for line in open(os.path.join(first["dir"], "metrics.jsonl")) if "train/loss" in line
    ]
    assert logged_steps == [1, 2, 3, 4]
    for r in runs[:2]:
        result = json.load(open(os.path.join(r["dir"], "result.json")))
        assert result["status"] == "done" and result["steps"] == 4 and result["eval_loss"] < 5.6
        assert not os.path.exists(os.path.join(r["dir"], "checkpoints"))  # removed once finished
    logged = []
    sweep.run_local(runs, mesh=mesh, log=logged.append)
    assert logged[0].endswith("3 runs, 3 finished, 0 to run, 1 at a time")
    # the analysis reads them back, the stopped run marked diverged rather than dropped
    status = {r["id"]: r["status"] for r in transfer.load_runs(os.path.join(root, "demo"))}
    assert [status[r["id"]] for r in runs] == ["done", "done", "diverged"]

    # a default changes after the sweep ran: the run ids stay the same (defaults are not hashed), the recorded
    # config does not, so the affected point reruns (one line) and the old run is kept aside
    result_path = os.path.join(runs[1]["dir"], "result.json")
    result = json.load(open(result_path))
    assert result["config"] == json.loads(config_lib.to_json(runs[1]["config"])) and result["version"]
    result["config"]["optimizer"]["b2"] = 0.999  # as if computed under another default
    open(result_path, "w").write(json.dumps(result))
    logged = []
    outcome = sweep.run_local(runs, mesh=mesh, log=logged.append)
    assert any(f"{runs[1]['id']} reruns" in line and "optimizer.b2 0.999 -> 0.95" in line for line in logged), logged
    assert logged[1].endswith("3 runs, 2 finished, 1 to run, 1 at a time") and outcome[runs[1]["id"]] == "done"
    assert os.path.exists(runs[1]["dir"] + ".stale") and sweep.stale_result(runs[1]) is None
