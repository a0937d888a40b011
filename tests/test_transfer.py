"""Transfer analysis on synthetic sweeps whose optima are known: no training needed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from maxscale.analysis import transfer  # noqa: E402
from maxscale.errors import ConfigError  # noqa: E402

LOG2_LRS = list(range(-12, -4))  # 8 learning rates a factor of 2 apart


def write_run(root, rid, name, width, lr, loss, steps=100, finished=True):
    d = os.path.join(root, rid)
    os.makedirs(d)
    cfg = {
        "model": {"width": width, "ffn_size": 3 * width, "vocab_size": 256, "depth": 2},
        "optimizer": {"lr": lr},
        "parameterization": {"name": name, "base_width": 64},
        "train": {"steps": steps},
    }
    with open(os.path.join(d, "sweep_run.json"), "w") as fh:
        json.dump({"id": rid, "config": cfg}, fh)
    with open(os.path.join(d, "config.json"), "w") as fh:
        json.dump(cfg, fh)
    with open(os.path.join(d, "metrics.jsonl"), "w") as fh:
        fh.write(json.dumps({"step": steps // 2, "eval/loss": 9.0}) + "\n")
        if finished:
            fh.write(json.dumps({"step": steps, "eval/loss": loss}) + "\n")


def parabola(log2_lr, log2_opt, floor=2.0):
    return floor + 0.05 * (log2_lr - log2_opt) ** 2


@pytest.fixture
def sweep_dir(tmp_path):
    """SP's optimum moves from 2^-7.3 at width 64 to 2^-10.3 at 512 (3 octaves); muP's stays at 2^-7.6 +- 0.25.
    SP at 512 diverges at the two largest LRs; one muP run is unfinished."""
    root = str(tmp_path / "width")
    i = 0
    for k, width in enumerate((64, 128, 256, 512)):
        for e in LOG2_LRS:
            lr = 2.0**e
            sp_loss = parabola(e, -7.3 - k)
            if width == 512 and e >= -6:
                sp_loss = float("nan") if e == -5 else 7.5
            write_run(root, f"sp{i:03d}", "sp", width, lr, sp_loss)
            mup_opt = -7.6 + (0.25 if k % 2 else -0.25)
            write_run(
                root, f"mu{i:03d}", "mup", width, lr, parabola(e, mup_opt), finished=not (width == 128 and e == -12)
            )
            i += 1
    return root


def test_optimum_is_the_vertex_of_the_parabola_in_log2_hp():
    hps = [2.0**e for e in LOG2_LRS]
    o = transfer.optimum(hps, [parabola(e, -8.37) for e in LOG2_LRS])
    assert o["refined"] and not o["at_edge"]
    assert o["log2_opt"] == pytest.approx(-8.37, abs=1e-6)
    edge = transfer.optimum(hps, [parabola(e, -14.0) for e in LOG2_LRS])
    assert edge["at_edge"] and edge["log2_opt"] == -12
    # noise on one point moves a 5-point fit less than a 3-point one, and never beyond one grid step
    noisy = [parabola(e, -8.0) + (0.04 if e == -7 else 0.0) for e in LOG2_LRS]
    five, three = transfer.optimum(hps, noisy), transfer.optimum(hps, noisy, half_window=1)
    assert five["fit_points"] == 5 and three["fit_points"] == 3
    assert abs(five["log2_opt"] + 8.0) < abs(three["log2_opt"] + 8.0) <= 1.0


def test_sp_drifts_three_octaves_mup_half_an_octave_diverged_runs_are_marked(sweep_dir):
    table = transfer.analyze(transfer.load_runs(sweep_dir))
    assert table["hp"] == "optimizer.lr" and table["scale"] == "model.width"
    assert table["series_fields"] == ["parameterization.name"]  # ffn_size follows the width: not a series
    sp, mup = table["series"]["name=sp"], table["series"]["name=mup"]
    assert sp["drift_octaves"] == pytest.approx(3.0, abs=1e-6)
    assert sp["log2_opt_vs_log2_scale"] == pytest.approx(-1.0, abs=1e-6)
    assert mup["drift_octaves"] == pytest.approx(0.5, abs=1e-6)
    assert sp["diverged"] == 2 and sp["scales"][512]["diverged"] == [False] * 6 + [True, True]
    assert mup["unfinished"] == 1 and table["counts"]["unfinished"] == 1
    assert not sp["any_at_edge"]


def test_report_writes_markdown_json_and_png(sweep_dir, tmp_path):
    out = str(tmp_path / "report")
    transfer.report(sweep_dir, out)
    md = open(os.path.join(out, "transfer.md")).read()
    assert "| name=sp |" in md and "| 3.00 |" in md and "2 diverged" in md
    saved = json.load(open(os.path.join(out, "transfer.json")))
    assert saved["series"]["name=mup"]["drift_octaves"] == pytest.approx(0.5)
    png = os.path.join(out, "transfer.png")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(png) < 200_000


def test_explicit_axes_and_errors(sweep_dir, tmp_path):
    with pytest.raises(ConfigError, match="does not vary"):
        transfer.analyze(transfer.load_runs(sweep_dir), hp="optimizer.b1")
    with pytest.raises(ConfigError, match="not a directory"):
        transfer.load_runs(str(tmp_path / "missing"))


def test_cli(sweep_dir, tmp_path):
    run = lambda *a: subprocess.run(
        [sys.executable, str(REPO / "tools" / "transfer_report.py"), *a],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    ok = run(sweep_dir, f"--out={tmp_path / 'cli'}")
    assert ok.returncode == 0, ok.stderr
    assert "drift (octaves)" in ok.stdout and (tmp_path / "cli" / "transfer.png").exists()
    bad = run(str(tmp_path / "nope"))
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    bad = run(sweep_dir, "--scal=model.width")
    assert bad.returncode == 2 and "unknown flag '--scal' (did you mean --scale?)" in bad.stderr


def test_seeds_are_replicates_with_bootstrap_intervals(tmp_path):
    """Three seeds per point: one series (not one per seed), the mean curve's optimum, and bootstrap intervals that
    contain the true optimum and widen with the seed-to-seed spread of the optimum (0.1 vs 1 octave)."""
    import numpy as np

    tables = {}
    for spread in (0.1, 1.0):
        root = str(tmp_path / f"seeds{spread}")
        for width in (64, 128):
            for seed, shift in zip((0, 1, 2), (-spread, 0.0, spread)):
                for e in LOG2_LRS:
                    rid = f"w{width}s{seed}e{-e}"
                    write_run(root, rid, "mup", width, 2.0**e, parabola(e, -8.0 + shift))
                    with open(os.path.join(root, rid, "sweep_run.json")) as fh:
                        plan = json.load(fh)
                    plan["config"]["train"]["seed"] = seed
                    with open(os.path.join(root, rid, "sweep_run.json"), "w") as fh:
                        json.dump(plan, fh)
        tables[spread] = transfer.analyze(transfer.load_runs(root))
    t = tables[1.0]
    assert list(t["series"]) == ["all"] and t["series"]["all"]["seeds"] == 3
    for curve in t["series"]["all"]["scales"].values():
        o = curve["optimum"]
        assert curve["seeds"] == 3 and o["log2_opt"] == pytest.approx(-8.0, abs=0.05)
        assert o["log2_opt_ci"][0] <= -8.0 <= o["log2_opt_ci"][1]
    width_of = lambda tab: np.diff(tab["series"]["all"]["scales"][64]["optimum"]["log2_opt_ci"])[0]  # noqa: E731
    assert width_of(tables[1.0]) > 5 * width_of(tables[0.1]) > 0
    assert t["series"]["all"]["drift_ci"][0] >= 0.0
    lo, hi = t["series"]["all"]["slope_ci"]  # the optimum does not move with width here: the interval holds 0
    assert lo <= 0.0 <= hi
    md = transfer.markdown(t)
    assert "Seeds per series: 3." in md and "[" in md


def test_paired_slope_differences_separate_a_drifting_rule_from_a_stable_one(tmp_path):
    """Three rules, 3 seeds, widths 64..256. A seed moves the optimum the same way under every rule (it fixes the
    init and the data order), by up to 0.4 octave, so each slope alone is uncertain; the paired difference is not.
    'drifts' moves the optimum by +0.5 octave per doubling: its difference from 'stable' is +0.5 with an interval
    that excludes 0. 'twin' is 'stable' plus small noise of its own: their interval holds 0."""
    root = str(tmp_path / "rules")
    seed_shift = {0: (0.0, 0.4, -0.4), 1: (0.3, -0.3, 0.2), 2: (-0.3, 0.1, 0.4)}  # per seed, per width
    own = {0: (0.02, -0.03, 0.0), 1: (-0.02, 0.03, 0.01), 2: (0.0, 0.02, -0.03)}
    for k, width in enumerate((64, 128, 256)):
        for seed in (0, 1, 2):
            opts = {"stable": -8.0, "drifts": -8.0 + 0.5 * k, "twin": -8.0 + own[seed][k]}
            for name, opt in opts.items():
                for e in LOG2_LRS:
                    rid = f"{name}w{width}s{seed}e{-e}"
                    write_run(root, rid, name, width, 2.0**e, parabola(e, opt + seed_shift[seed][k]))
                    path = os.path.join(root, rid, "sweep_run.json")
                    plan = json.load(open(path))
                    plan["config"]["train"]["seed"] = seed
                    json.dump(plan, open(path, "w"))
    t = transfer.analyze(transfer.load_runs(root))
    diffs = {(d["a"], d["b"]): d for d in t["slope_differences"]}
    assert set(diffs) == {("name=drifts", "name=stable"), ("name=drifts", "name=twin"), ("name=stable", "name=twin")}
    d = diffs[("name=drifts", "name=stable")]
    assert d["slope_difference"] == pytest.approx(0.5, abs=0.05) and 0.3 < d["ci"][0] <= d["ci"][1] < 0.7
    lo, hi = diffs[("name=stable", "name=twin")]["ci"]
    assert lo <= 0.0 <= hi and hi - lo < 0.1
    lo, hi = t["series"]["name=stable"]["slope_ci"]  # alone, the seeds' shifts make each slope uncertain
    assert hi - lo > 0.2
    md = transfer.markdown(t)
    assert "- name=drifts - name=stable: +0.50 [" in md
    json.dumps(t)  # the bootstrap draws are not left in the table
