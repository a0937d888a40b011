"""LR-horizon analysis, schedule comparison and the one-command report, on synthetic sweeps with known answers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from maxscale.analysis import horizon, report, transfer  # noqa: E402
from maxscale.errors import ConfigError  # noqa: E402

LOG2_LRS = list(range(-12, -2))  # 2^-12 .. 2^-3
HORIZONS = (100, 200, 400, 800, 1600)


def write_run(root, rid, cfg, loss, steps):
    d = os.path.join(root, rid)
    os.makedirs(d)
    for name in ("sweep_run.json", "config.json"):
        with open(os.path.join(d, name), "w") as fh:
            json.dump({"id": rid, "config": cfg} if name == "sweep_run.json" else cfg, fh)
    with open(os.path.join(d, "metrics.jsonl"), "w") as fh:
        fh.write(json.dumps({"step": steps, "eval/loss": loss}) + "\n")


def horizon_loss(lr, T, p=1.0):
    """L(eta, T) = 2 + 0.1 ((eta T)^-p + 50 eta): eta*(T) = (p / 50)^(1/(p+1)) T^-xi with xi = p / (p + 1)."""
    return 2.0 + 0.1 * ((lr * T) ** -p + 50.0 * lr)


def synthetic_horizon_sweep(root, p=1.0, seeds=(0,), noise=0.0, schedules=("cosine",)):
    rng = np.random.default_rng(1)
    i = 0
    for name in schedules:
        offset = {"cosine": 0.0, "wsd": 0.01, "constant": 0.05}[name]
        for T in HORIZONS:
            if name == "wsd" and T >= 800:
                offset = -0.01  # WSD wins at the long horizons
            for e in LOG2_LRS:
                for seed in seeds:
                    cfg = {
                        "model": {"width": 64, "vocab_size": 256},
                        "optimizer": {"lr": 2.0**e},
                        "schedule": {"name": name},
                        "train": {"steps": T, "eval_every": T, "seed": seed},
                    }
                    loss = horizon_loss(2.0**e, T, p) + offset + noise * rng.standard_normal()
                    write_run(root, f"h{i:04d}", cfg, loss, T)
                    i += 1
    return root


def test_xi_recovered_within_5_percent_with_a_t_interval(tmp_path):
    for p in (1.0, 0.5):
        root = synthetic_horizon_sweep(str(tmp_path / f"p{p}"), p=p)
        h = horizon.analyze(transfer.load_runs(root))
        s = h["series"]["all"]
        true = p / (p + 1)
        assert h["transfer"]["scale"] == "train.steps" and s["horizons"] == list(HORIZONS)
        assert s["xi"] == pytest.approx(true, rel=0.05)
        # the fitted law at a horizon inside the range, within a quarter octave (the parabola in log2 LR is biased
        # on this asymmetric curve, by the same amount at every T, so xi is not)
        eta_400 = (p / 50) ** (1 / (p + 1)) * 400.0**-true
        assert abs(np.log2(s["K"] * 400.0 ** -s["xi"] / eta_400)) < 0.25
        assert s["ci_method"].startswith("least-squares") and s["xi_ci"][0] <= s["xi"] <= s["xi_ci"][1]
        assert len(s["runs"]) == len(HORIZONS) * len(LOG2_LRS)


def test_xi_with_seeds_has_a_bootstrap_interval_around_the_truth(tmp_path):
    root = synthetic_horizon_sweep(str(tmp_path / "seeds"), seeds=(0, 1, 2, 3), noise=0.002)
    s = horizon.analyze(transfer.load_runs(root))["series"]["all"]
    assert s["xi"] == pytest.approx(0.5, rel=0.05)
    assert s["ci_method"] == "bootstrap over 4 seeds"
    lo, hi = s["xi_ci"]
    assert lo <= 0.5 <= hi and hi - lo < 0.2


def test_schedule_table_picks_the_known_best(tmp_path):
    root = synthetic_horizon_sweep(str(tmp_path / "sched"), schedules=("constant", "cosine", "wsd"))
    runs = transfer.load_runs(root)
    h = horizon.analyze(runs)
    assert set(h["series"]) == {"name=constant", "name=cosine", "name=wsd"}
    assert all(s["xi"] == pytest.approx(0.5, rel=0.05) for s in h["series"].values())
    s = horizon.schedules(runs)
    best = {b["T"]: b["schedule"] for b in s["best"]}
    assert best == {100: "cosine", 200: "cosine", 400: "cosine", 800: "wsd", 1600: "wsd"}
    md = horizon.schedule_markdown(s)
    assert "| 800 | - |" in md and "| wsd |" in md and md.count("**") == 2 * len(HORIZONS)
    # one horizon: the schedule is the scale axis, the same winner
    one = [r for r in runs if r["config"]["train.steps"] == 100]
    assert [b["schedule"] for b in horizon.schedules(one)["best"]] == ["cosine"]
    with pytest.raises(ConfigError, match="train.steps does not vary"):
        horizon.analyze(one)


def test_report_on_a_horizon_sweep_has_horizon_and_schedule_sections(tmp_path):
    root = synthetic_horizon_sweep(str(tmp_path / "hs"), schedules=("cosine", "wsd"))
    out = str(tmp_path / "out")
    rep = report.report(root, out)
    md = open(os.path.join(out, "report.md")).read()
    assert "## LR horizon" in md and "## Schedules" in md and "xi" in md
    assert "transfer: the scale axis is only train.steps" in md  # listed as skipped, with its reason
    for png in ("horizon.png", "schedules.png"):
        assert open(os.path.join(out, png), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert set(rep["figures"]["horizon.png"]) == {f"h{i:04d}" for i in range(2 * len(HORIZONS) * len(LOG2_LRS))}


# ----------------------------------------------------------------------------------------------------------------
# The report on a transfer sweep (as tests/test_transfer.py's)


def parabola(log2_lr, log2_opt, floor=2.0):
    return floor + 0.05 * (log2_lr - log2_opt) ** 2


@pytest.fixture
def width_sweep(tmp_path):
    root = str(tmp_path / "width")
    i = 0
    for k, width in enumerate((64, 128, 256)):
        for e in range(-12, -4):
            for name, opt in (("sp", -7.3 - k), ("mup", -7.6)):
                cfg = {
                    "model": {"width": width, "ffn_size": 3 * width, "vocab_size": 256},
                    "optimizer": {"lr": 2.0**e},
                    "parameterization": {"name": name, "base_width": 64},
                    "train": {"steps": 100},
                }
                write_run(root, f"r{i:03d}", cfg, parabola(e, opt), 100)
                i += 1
    return root


def test_report_on_a_transfer_sweep_writes_the_transfer_section_and_a_png(width_sweep, tmp_path):
    out = str(tmp_path / "rep")
    rep = report.report(width_sweep, out)
    md = open(os.path.join(out, "report.md")).read()
    assert "## Transfer" in md and "| name=sp |" in md and "![transfer](transfer.png)" in md
    assert open(os.path.join(out, "transfer.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert "r000" in md.split("## Transfer")[1]  # the figure names its runs
    skipped = {s["section"]: s["reason"] for s in rep["skipped"]}
    assert "no kept checkpoints" in skipped["width consistency and spectra"]
    assert "train.steps" in skipped["scaling laws"] and "train.steps" in skipped["LR horizon"]
    assert "schedule" in skipped["schedules"]
    sections = ["runs", "curves", "hyperparameters", "transfer"]  # the first three apply to every sweep
    assert json.load(open(os.path.join(out, "report.json")))["sections"] == sections


def test_report_isoflop_section_from_resolved_configs(tmp_path, capsys):
    """Runs of real (resolved) configs on a Chinchilla surface with rounded steps: budgets are grouped and fitted."""
    from maxscale import config, parameterization
    from maxscale.analysis import law_cli, scaling_laws
    from maxscale.model import transformer
    from maxscale.tools import sweep as sweep_lib

    true = {"E": 1.0, "A": 20.0, "B": 100.0, "alpha": 0.35, "beta": 0.35}  # losses below ln 256
    base = config.resolve(config.load(str(REPO / "configs" / "sweeps" / "transfer_base.py")))
    root, i = str(tmp_path / "iso"), 0
    for C in (3e11, 1e12, 3e12):
        for w in (16, 32, 64, 128, 256):
            cfg = config.resolve(sweep_lib.apply_overrides(base, parameterization.scale_shapes(base, width=w)))
            n = transformer.count_params(cfg)["non_embedding"]
            cfg.train.steps = steps = int(round(C / (6 * n * 512)))
            loss = float(scaling_laws.chinchilla_loss(true, {"N": n, "D": steps * 512.0}))
            write_run(root, f"i{i:02d}", json.loads(config.to_json(cfg)), loss, steps)
            with open(os.path.join(root, f"i{i:02d}", "result.json"), "w") as fh:
                json.dump({"status": "done", "eval_loss": loss}, fh)
            i += 1
    out = str(tmp_path / "iso_out")
    rep = report.report(root, out)
    md = open(os.path.join(out, "report.md")).read()
    assert "## Scaling laws" in md and os.path.exists(os.path.join(out, "scaling_laws.png"))
    iso = rep["tables"]["scaling laws"]["isoflop"]
    assert len(iso["budgets"]) == 3 and iso["a"] == pytest.approx(0.5, abs=0.08)
    assert rep["tables"]["scaling laws"]["chinchilla"]["r2"] > 0.99
    assert law_cli.main([f"--runs={root}", "--law=isoflop", "--boot=0", "--json"]) == 0  # tools/fit_law.py
    assert json.loads(capsys.readouterr().out)["a"] == pytest.approx(iso["a"])


def test_cli_help_bad_flag_and_missing_dir(width_sweep, tmp_path):
    run = lambda *a: subprocess.run(
        [sys.executable, str(REPO / "tools" / "report.py"), *a], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    ok = run(width_sweep, f"--out={tmp_path / 'cli'}")
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "cli" / "report.md").exists() and "report.md" in ok.stdout
    bad = run(str(tmp_path / "nope"))
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "error" in bad.stderr
    assert not (tmp_path / "nope").exists()  # a bad directory creates nothing
