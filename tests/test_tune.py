"""Base tuning (#12 item 4): the ranking of a random search, and the two sweep files that use it, on synthetic
sweeps whose best point is known (no training)."""

import json
import math
import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from maxscale.analysis import tune  # noqa: E402
from maxscale.errors import ConfigError  # noqa: E402
from maxscale.tools import sweep as sweep_lib  # noqa: E402

FIELDS = ["optimizer.lr", "parameterization.output_mult", "parameterization.input_mult"]


def write_run(root, rid, lr, out_mult, in_mult, seed, loss, finished=True):
    d = os.path.join(root, rid)
    os.makedirs(d)
    cfg = {
        "model": {"width": 64, "vocab_size": 256},
        "optimizer": {"lr": lr},
        "parameterization": {"name": "mup", "output_mult": out_mult, "input_mult": in_mult},
        "train": {"steps": 100, "seed": seed},
        "data": {"seed": seed},
    }
    for name in ("sweep_run.json", "config.json"):
        with open(os.path.join(d, name), "w") as fh:
            json.dump({"id": rid, "config": cfg} if name == "sweep_run.json" else cfg, fh)
    with open(os.path.join(d, "metrics.jsonl"), "w") as fh:
        if finished:
            fh.write(json.dumps({"step": 100, "eval/loss": loss}) + "\n")


def surface(lr, out_mult, in_mult):
    return (
        2.0 + 0.05 * (math.log2(lr) + 8) ** 2 + 0.03 * (math.log2(out_mult) - 2) ** 2 + 0.01 * math.log2(in_mult) ** 2
    )


@pytest.fixture
def search_dir(tmp_path):
    """16 points (the optimum 2^-8, 4, 1 among them) x 3 seeds (+-0.01 noise), one diverged, one unfinished."""
    root = str(tmp_path / "base_tune")
    rng = np.random.default_rng(0)
    pts = [(2.0**-8, 4.0, 1.0), (2.0**-5, 1.0, 1.0)] + [
        (2.0 ** rng.uniform(-10, -5), 2.0 ** rng.uniform(-3, 4), 2.0 ** rng.uniform(-4, 2)) for _ in range(14)
    ]
    for i, (lr, om, im) in enumerate(pts):
        for seed in range(3):
            loss = surface(lr, om, im) + 0.01 * (seed - 1)
            if i == 1:
                loss = float("nan")  # diverged
            write_run(root, f"p{i}s{seed}", lr, om, im, seed, loss, finished=not (i == 2 and seed == 2))
    return root


def test_best_points_rank_by_mean_over_seeds(search_dir):
    best = tune.best_points(search_dir, FIELDS)
    assert best[0]["point"] == {
        "optimizer.lr": 2.0**-8,
        "parameterization.output_mult": 4.0,
        "parameterization.input_mult": 1.0,
    }
    assert best[0]["mean"] == pytest.approx(2.0, abs=1e-6) and best[0]["std"] == pytest.approx(0.01, rel=1e-3)
    assert best[-1]["mean"] == math.inf and best[-1]["point"]["optimizer.lr"] == 2.0**-5  # diverged: last
    means = [b["mean"] for b in best]
    assert means == sorted(means) and len(best) == 16
    assert len(tune.best_points(search_dir, FIELDS, k=3)) == 3
    assert len(tune.best_points(search_dir, FIELDS, min_seeds=3)) == 15  # the unfinished seed drops a point
    md = tune.markdown(best[:2], FIELDS)
    assert "| 1 | 2^-8.00 | 2^2.00 | 2^0.00 | 2.0000 +- 0.0100 | 3 |" in md


def test_tune_report_cli(search_dir, tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "tools/tune_report.py",
            search_dir,
            f"--fields={','.join(FIELDS)}",
            "--top=2",
            f"--out={tmp_path / 'rep'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("\n") == 4 and (tmp_path / "rep" / "tune.json").exists()
    bad = subprocess.run(
        [sys.executable, "tools/tune_report.py", str(tmp_path / "nope")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "nope" in bad.stderr


def test_base_tune_sweep_is_a_latin_hypercube_and_confirms_the_best(search_dir):
    sweep = sweep_lib.load_sweep("configs/sweeps/base_tune.py:n=16")
    pts = sweep_lib.points(sweep)
    assert len(pts) == 16 + 3 and all(p["parameterization.name"] == "mup" for p in pts)
    space = runpy.run_path(str(REPO / "configs/sweeps/base_tune.py"))["SPACE"]
    for field, (lo, hi) in space.items():
        strata = sorted(int((math.log2(p[field]) - lo) / (hi - lo) * 16 - 1e-6) for p in pts[:16])
        assert strata == list(range(16)), field  # one point per stratum (rounding to 3 digits stays inside)
    assert len(sweep_lib.expand(sweep, root="unused")) == 19  # every point resolves to its own run

    with pytest.raises(ConfigError, match="unknown argument"):
        sweep_lib.load_sweep("configs/sweeps/base_tune.py:m=3")


def test_width_tuned_transfers_the_best_confirmed_point(tmp_path):
    root = str(tmp_path / "base_tune")
    for seed in range(3):  # two confirmed points over the six tuned fields; the second is better
        for i, (lr, om) in enumerate(((2.0**-7, 1.0), (2.0**-6, 8.0))):
            d = os.path.join(root, f"p{i}s{seed}")
            write_run(root, f"p{i}s{seed}", lr, om, 1.0, seed, 2.5 - 0.2 * i)
            for name in ("sweep_run.json", "config.json"):
                p = os.path.join(d, name)
                data = json.load(open(p))
                cfg = data["config"] if name == "sweep_run.json" else data
                cfg["parameterization"].update(init_std=0.03, embed_init_std=0.5, attn_mult=2.0)
                json.dump(data, open(p, "w"))
    sweep = sweep_lib.load_sweep(f"configs/sweeps/width_tuned.py:tuned={root},widths=64+256")
    runs = sweep_lib.expand(sweep, root=str(tmp_path / "runs"))
    assert len(runs) == 2 * 2 * 5 * 3  # widths x series x LRs x seeds
    mup = [r["config"] for r in runs if r["config"].parameterization.name == "mup"]
    sp = [r["config"] for r in runs if r["config"].parameterization.name == "sp"]
    assert {c.parameterization.output_mult for c in mup} == {8.0} and {c.parameterization.attn_mult for c in mup} == {
        2.0
    }
    assert sorted({c.optimizer.lr for c in mup}) == [2.0**e for e in range(-8, -3)]  # 2^-6 x 2^-2 .. 2^2
    assert {c.parameterization.output_mult for c in sp} == {1.0}
    assert {c.parameterization.init_std for c in sp} == {0.02}
    assert sorted({c.optimizer.lr for c in sp if c.model.width == 256}) == [2.0**e for e in range(-12, -7)]
    assert {c.parameterization.base_width for c in mup} == {64}
    with pytest.raises(ConfigError, match="tuned=DIR"):
        sweep_lib.load_sweep("configs/sweeps/width_tuned.py")
    family = sweep_lib.expand(
        sweep_lib.load_sweep(f"configs/sweeps/width_family.py:series=mup,tuned={root}"), root=str(tmp_path / "r")
    )
    assert len(family) == 8 and {r["config"].optimizer.lr for r in family} == {2.0**-6}
    assert {tuple(r["config"].checkpoint.keep_steps) for r in family} == {(25, 50, 100, 200)}
    assert {r["config"].data.seed for r in family} == {0} and {r["config"].train.seed for r in family} == {0, 1}
    with pytest.raises(ConfigError, match="series=sp, or series=mup with tuned=DIR"):
        sweep_lib.load_sweep("configs/sweeps/width_family.py:series=mup")


def test_expert_width_sweep_takes_a_horizon_seeds_and_sizes_and_keeps_its_old_run_ids(tmp_path):
    """The 200-step, one-seed sweep docs/moe.md reports keeps its run ids (b02569e08b .. c7a412f8ae, as before the
    arguments existed); a longer horizon is its own sweep with its schedule, eval and seeds."""
    old = sweep_lib.expand(sweep_lib.load_sweep("configs/sweeps/expert_width.py"), str(tmp_path))
    assert len(old) == 4 * 3 * 7 and (old[0]["id"], old[-1]["id"]) == ("b02569e08b", "c7a412f8ae")
    sweep = sweep_lib.load_sweep("configs/sweeps/expert_width.py:sizes=48+768,steps=800,seeds=3,lrs=-10:-8")
    runs = sweep_lib.expand(sweep, str(tmp_path))
    assert sweep["name"] == "expert_width_T800" and len(runs) == 2 * 3 * 3 * 3  # sizes x variants x LRs x seeds
    cfgs = [r["config"] for r in runs]
    assert {(c.train.steps, c.train.eval_every, c.checkpoint.every) for c in cfgs} == {(800, 800, 800)}
    assert {c.model.moe.expert_ffn_size for c in cfgs} == {48, 768} and {c.train.seed for c in cfgs} == {0, 1, 2}
    assert sorted({math.log2(c.optimizer.lr) for c in cfgs}) == [-10, -9, -8]
    assert {c.train.seed: c.data.seed for c in cfgs} == {0: 0, 1: 1, 2: 2}
    for arg, message in (("steps=4", "steps=4"), ("sizes=0", "sizes='0'"), ("variants=xp", "unknown variant 'xp'")):
        with pytest.raises(ConfigError, match=message):
            sweep_lib.load_sweep("configs/sweeps/expert_width.py:" + arg)
