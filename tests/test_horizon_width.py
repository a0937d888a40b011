"""Width x horizon study (issue #27): the sweep file's grid and the report section on synthetic sweeps with planted
answers (where width starts to pay, the optimal LR, muP vs SP, and the step where widths start to disagree)."""

import json
import math
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from maxscale.analysis import report, transfer, width_horizon  # noqa: E402
from maxscale.errors import ConfigError  # noqa: E402
from maxscale.tools import sweep as sweep_lib  # noqa: E402

SWEEP = str(REPO / "configs" / "sweeps" / "horizon_width.py")
WIDTHS, HORIZONS = (64, 128, 256), (200, 800, 3200)
SEED_OFFSET = {0: -0.005, 1: +0.005}  # seed sd sqrt(2) x 0.005 = 0.00707


def write_run(root, rid, cfg, curve):
    """A finished run directory as transfer.load_runs reads it; `curve` = [(step, eval loss)], the last is final."""
    d = os.path.join(root, rid)
    os.makedirs(d)
    with open(os.path.join(d, "sweep_run.json"), "w") as fh:
        json.dump({"id": rid, "config": cfg}, fh)
    with open(os.path.join(d, "config.json"), "w") as fh:
        json.dump(cfg, fh)
    with open(os.path.join(d, "metrics.jsonl"), "w") as fh:
        fh.writelines(json.dumps({"step": s, "eval/loss": v}) + "\n" for s, v in curve)


def base_loss(series, T, w, pays_at):
    """muP: flat in width below `pays_at`, -0.03 per doubling from it; SP: -0.02 per doubling, and 0.05 ahead of
    muP at width 256 at T = 200 only."""
    doublings = math.log2(w / 64)
    shorter = 0.1 * math.log2(3200 / T)
    if series == "mup":
        return 2.0 + shorter - (0.03 * doublings if pays_at is not None and T >= pays_at else 0.0)
    sp = 2.05 + shorter - 0.02 * doublings
    return sp - 0.1 if (T == 200 and w == 256) else sp


def centre(series, w, T):
    return -6.0 - 0.46 * math.log2(T / 200) if series == "mup" else -8.0 - math.log2(w / 64) - 0.46 * math.log2(T / 200)


def synthetic_sweep(root, pays_at=800, long_seeds=(0,)):
    """3 LRs an octave apart around each centre (the optimum planted 0.2 octave above it), 2 seeds (1 at 3200)."""
    i = 0
    for series in ("mup", "sp"):
        for T in HORIZONS:
            for w in WIDTHS:
                c = centre(series, w, T)
                for e in (-1, 0, 1):
                    for seed in long_seeds if T == 3200 else (0, 1):
                        cfg = {
                            "model": {"width": w, "ffn_size": 3 * w, "vocab_size": 256},
                            "optimizer": {"lr": 2.0 ** (c + e)},
                            "parameterization": {"name": series},
                            "train": {"steps": T, "seed": seed},
                            "data": {"seed": seed},
                        }
                        final = base_loss(series, T, w, pays_at) + 0.05 * (e - 0.2) ** 2 + SEED_OFFSET[seed]
                        write_run(root, f"r{i:03d}", cfg, [(T // 2, final + 0.5), (T, final)])
                        i += 1
    return root


def test_width_pays_from_the_planted_horizon_with_intervals_and_optima(tmp_path):
    res = width_horizon.analyze(transfer.load_runs(synthetic_sweep(str(tmp_path / "s"))))
    assert res["pooled_sd"]["mup"] == pytest.approx(0.01 / math.sqrt(2), rel=1e-6)
    v = res["verdict"]["mup"]
    assert v["pays_from"] == 800 and [v["horizons"][T]["pays"] for T in HORIZONS] == [False, True, True]
    assert v["horizons"][800]["diff"] == pytest.approx(-0.06, abs=1e-9)
    assert v["horizons"][800]["slope"] == pytest.approx(-0.03, abs=1e-9)
    assert v["horizons"][200]["diff"] == pytest.approx(0.0, abs=1e-9)
    cell = res["series"]["mup"][3200][256]  # one seed: its interval comes from the pooled seed sd
    assert cell["n"] == 1 and cell["se"] == pytest.approx(0.01 / math.sqrt(2), rel=1e-6)
    # the best grid LR is the centre; the parabola through the 3 LRs puts the optimum 0.2 octave above it
    assert math.log2(cell["best_lr"]) == pytest.approx(centre("mup", 256, 3200))
    assert cell["optimum"]["log2_opt"] == pytest.approx(centre("mup", 256, 3200) + 0.2, abs=1e-6)
    assert not cell["optimum"]["at_edge"] and not cell["best_at_edge"]
    assert res["series"]["sp"][200][64]["best_at_edge"] is False
    assert res["verdict"]["sp"]["pays_from"] == 200  # SP's width 256 wins at every horizon
    vs = res["vs_sp"]
    assert vs[200][256]["better"] == "SP" and vs[200][256]["diff"] == pytest.approx(0.09, abs=1e-9)
    assert vs[3200][256]["better"] == "muP" and vs[3200][256]["diff"] == pytest.approx(-0.07, abs=1e-9)
    assert vs[800][64]["better"] == "muP" and vs[800][64]["diff"] == pytest.approx(-0.05, abs=1e-9)
    assert "from T = 800 steps on" in width_horizon.statement(res, "mup")


def test_width_that_stops_paying_or_never_pays_gives_no_horizon(tmp_path):
    res = width_horizon.analyze(transfer.load_runs(synthetic_sweep(str(tmp_path / "flat"), pays_at=None)))
    assert res["verdict"]["mup"]["pays_from"] is None
    assert not any(h["pays"] for h in res["verdict"]["mup"]["horizons"].values())
    assert "does not beat width 64" in width_horizon.statement(res, "mup")
    res = width_horizon.analyze(transfer.load_runs(synthetic_sweep(str(tmp_path / "late"), pays_at=3200)))
    assert res["verdict"]["mup"]["pays_from"] == 3200


def test_the_interval_decides_a_small_gain(tmp_path):
    """A 0.01-nat gain of width 256 at T = 3200 (one seed, pooled sd 0.0071: interval +-0.0196) is not a win."""
    root = synthetic_sweep(str(tmp_path / "s"), pays_at=None)
    for rid in os.listdir(root):
        cfg = json.load(open(os.path.join(root, rid, "config.json")))
        if cfg["parameterization"]["name"] == "mup" and cfg["train"]["steps"] == 3200 and cfg["model"]["width"] == 256:
            path = os.path.join(root, rid, "metrics.jsonl")
            rows = [json.loads(x) for x in open(path)]
            rows[-1]["eval/loss"] -= 0.01
            open(path, "w").writelines(json.dumps(r) + "\n" for r in rows)
    v = width_horizon.analyze(transfer.load_runs(root))["verdict"]["mup"]["horizons"][3200]
    assert v["diff"] == pytest.approx(-0.01, abs=1e-9) and v["se"] == pytest.approx(0.01, rel=1e-6)
    assert not v["pays"]


def consistency_table(kl_narrow, kl_twin, narrow_loss, wide_loss, steps=(0, 100, 200, 300)):
    """A consistency.width_consistency result: reference w256s0, its seed twin w256s1, two width-64 seeds."""
    info = {"w256s0": (256, 0), "w256s1": (256, 1), "w64s0": (64, 0), "w64s1": (64, 1)}
    per_step = {}
    for k, s in enumerate(steps):
        models = {"w256s0": {"kl": 0.0, "top1": 1.0}, "w256s1": {"kl": kl_twin[k], "top1": 0.9}}
        models.update({r: {"kl": kl_narrow[k], "top1": 0.8} for r in ("w64s0", "w64s1")})
        per_step[s] = {"models": models, "ensembles": {}}
    curves = {}
    for rid, (w, seed) in info.items():
        base = narrow_loss if w == 64 else wide_loss
        curves[rid] = {"steps": list(steps), "loss": [x + (0.01 if seed else -0.01) for x in base]}
    return {
        "reference": "w256s0",
        "runs": {r: {"width": w, "seed": s} for r, (w, s) in info.items()},
        "steps": list(steps),
        "per_step": per_step,
        "loss_curves": curves,
    }


def test_consistency_summary_finds_the_step_where_widths_start_to_disagree():
    t = consistency_table(
        kl_narrow=[0.01, 0.02, 0.05, 0.08],
        kl_twin=[0.02, 0.03, 0.03, 0.03],
        narrow_loss=[3.0, 2.51, 2.26, 2.10],
        wide_loss=[3.0, 2.50, 2.20, 2.00],
    )
    s = width_horizon.consistency_summary(t)
    assert s["widths"] == [64, 256] and s["predictions_disagree_from"] == 200 and s["loss_disagrees_from"] == 200
    g = {r["step"]: r for r in s["loss_gap"]}
    assert g[300]["gap"] == pytest.approx(0.10) and g[300]["se"] == pytest.approx(math.sqrt(2) * 0.01)
    assert not g[100]["disagree"] and g[200]["disagree"]  # 0.01 < 1.96 x 0.0141 < 0.06
    # a transient disagreement does not count: from the last step only; never, when the last step agrees
    t = consistency_table([0.05, 0.01, 0.01, 0.05], [0.02] * 4, [3.1, 2.5, 2.2, 2.0], [3.0, 2.5, 2.2, 2.0])
    s = width_horizon.consistency_summary(t)
    assert s["predictions_disagree_from"] == 300 and s["loss_disagrees_from"] is None


def test_report_section_on_a_synthetic_sweep(tmp_path):
    root = synthetic_sweep(str(tmp_path / "sweep"))
    out = str(tmp_path / "rep")
    rep = report.report(root, out)
    assert "width and horizon" in rep["sections"], rep["skipped"]
    md = open(os.path.join(out, "report.md")).read().split("## Width and horizon")[1]
    assert "muP: width 256 beats width 64 from T = 800 steps on" in md
    assert "| muP | 800 | 2.202 +- 0.010 (2) @ 2^-6.92 |" in md  # 2.0 + 0.2 + 0.05 x 0.2^2; 1.96 x 0.005
    assert "no kept-checkpoint family spans the narrowest and widest width" in md
    assert open(os.path.join(out, "width_horizon.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    # the section reuses the width section's consistency table when one spans the narrowest and widest width
    ctx = report.Context(root, out)
    ctx.tables["width consistency and spectra"] = {
        "fam": {"consistency": consistency_table([0.01, 0.05, 0.06, 0.08], [0.02] * 4, [3.0] * 4, [3.0] * 4)}
    }
    text = width_horizon.section(ctx)
    assert "predictions disagree beyond the seed floor from step: 100" in text
    assert ctx.tables["width and horizon"]["consistency"]["loss_disagrees_from"] is None


def test_report_skips_the_section_without_a_horizon_axis(tmp_path):
    root = str(tmp_path / "one")
    for i, (w, e) in enumerate((w, e) for w in (64, 128) for e in (-7, -6)):
        cfg = {"model": {"width": w, "vocab_size": 256}, "optimizer": {"lr": 2.0**e}, "train": {"steps": 100}}
        write_run(root, f"r{i}", cfg, [(100, 2.5 + 0.01 * i)])
    rep = report.report(root, str(tmp_path / "rep"))
    skipped = {s["section"]: s["reason"] for s in rep["skipped"]}
    assert "train.steps does not vary" in skipped["width and horizon"]


def test_sweep_file_grid_recentres_the_lr_per_horizon(tmp_path):
    sweep = sweep_lib.load_sweep(SWEEP)
    runs = sweep_lib.expand(sweep, str(tmp_path))
    assert len(runs) == 2 * 3 * 3 * 3 * 2  # series x horizons x widths x LRs x seeds
    mup = [r["config"] for r in runs if r["config"].parameterization.name == "mup"]
    by_T = {T: sorted({round(math.log2(c.optimizer.lr), 6) for c in mup if c.train.steps == T}) for T in HORIZONS}
    # muP at the tuned point: its measured optimum does not move with the horizon (xi_mup = 0, two corpora)
    assert by_T[200] == by_T[800] == by_T[3200] == [-7.0, -6.0, -5.0]
    old = sweep_lib.expand(sweep_lib.load_sweep(SWEEP + ":xi_mup=0.46"), str(tmp_path))  # the documented runs
    mup_old = [
        r["config"] for r in old if r["config"].parameterization.name == "mup" and r["config"].train.steps == 3200
    ]
    assert sorted({round(math.log2(c.optimizer.lr), 6) for c in mup_old}) == pytest.approx([-8.84, -7.84, -6.84])
    assert {r["id"] for r in old if r["config"].parameterization.name == "sp"} == {
        r["id"] for r in runs if r["config"].parameterization.name == "sp"
    }  # SP keeps xi = 0.46 and its run ids
    assert {c.parameterization.output_mult for c in mup} == {3.46}  # docs/transfer.md's tuned point
    sp256 = [r["config"] for r in runs if r["config"].parameterization.name == "sp" and r["config"].model.width == 256]
    assert min(math.log2(c.optimizer.lr) for c in sp256 if c.train.steps == 800) == pytest.approx(-11.0 - 0.92)
    assert {c.train.eval_every for c in mup if c.train.steps == 800} == {100}
    # one seed at the longest horizon; the consistency family has the same run ids as the main sweep's
    cut = sweep_lib.expand(sweep_lib.load_sweep(SWEEP + ":seeds_long=1"), str(tmp_path))
    assert len(cut) == 108 - 2 * 3 * 3 * 1
    fam = sweep_lib.expand(sweep_lib.load_sweep(SWEEP + ":consistency=800"), str(tmp_path))
    assert len(fam) == 4 and {r["id"] for r in fam} <= {r["id"] for r in runs}
    assert {r["config"].checkpoint.every for r in fam} == {100}
    with pytest.raises(ConfigError, match="seeds='two'; use seeds=N"):
        sweep_lib.load_sweep(SWEEP + ":seeds=two")
    with pytest.raises(ConfigError, match="unknown series 'xp'"):
        sweep_lib.load_sweep(SWEEP + ":series=mup+xp")


def test_a_best_lr_on_the_grid_edge_is_flagged(tmp_path):
    """muP at T = 800, width 128: the top LR made best by 0.1 nats; its loss is a bound, marked with *."""
    root = synthetic_sweep(str(tmp_path / "s"))
    top = centre("mup", 128, 800) + 1
    for rid in os.listdir(root):
        cfg = json.load(open(os.path.join(root, rid, "config.json")))
        c = (cfg["parameterization"]["name"], cfg["train"]["steps"], cfg["model"]["width"])
        if c == ("mup", 800, 128) and math.log2(cfg["optimizer"]["lr"]) == pytest.approx(top):
            path = os.path.join(root, rid, "metrics.jsonl")
            rows = [json.loads(x) for x in open(path)]
            rows[-1]["eval/loss"] -= 0.1
            open(path, "w").writelines(json.dumps(r) + "\n" for r in rows)
    cfg["parameterization"]["name"], cfg["train"]["steps"], cfg["model"]["width"] = "mup", 800, 128
    cfg["optimizer"]["lr"] = 2.0 ** (top + 1)
    write_run(root, "unfinished", cfg, [(400, 2.0)])  # an LR above it that has not finished: still the edge
    res = width_horizon.analyze(transfer.load_runs(root))
    cell = res["series"]["mup"][800][128]
    assert len(cell["lrs"]) == 4 and cell["mean_curve"][-1] is None
    assert cell["best_at_edge"] and cell["optimum"]["at_edge"] and cell["loss"] == pytest.approx(2.17 + 0.032 - 0.1)
    assert f"@ 2^{top:.2f}* |" in width_horizon.markdown(res)
