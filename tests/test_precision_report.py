"""The precision report and `fit_law --runs=` on a synthetic sweep directory whose losses come from Kumar et al.'s
laws with the paper's Table 2 constants: the report runs, writes its files, and recovers the constants."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from maxscale import config as config_lib
from maxscale.analysis import law_cli, precision_report
from maxscale.analysis import precision_laws as pl
from maxscale.model import transformer

TRUE = pl.PAPER_TABLE2
WIDTHS = (512, 768, 1024, 1280)  # depth 12: N = 38M .. 236M non-embedding parameters, the paper's range
STEPS = (3_000, 10_000, 30_000)  # x 256 x 2048 tokens: D = 1.6B .. 15.7B
QUANT = (
    [{"weights": f"int{b}"} for b in (3, 4, 5, 6, 8)]
    + [{"activations": f"int{b}"} for b in (4, 6, 8)]
    + [{"kv": f"int{b}"} for b in (3, 4, 6)]
    + [{}]  # high precision
)


def _config(width: int, steps: int, quant: dict) -> dict:
    cfg = config_lib.defaults()
    cfg.model.update(width=width, depth=12, num_heads=width // 64)
    cfg.data.update(seq_len=2048)
    cfg.train.update(steps=steps, batch_size=256)
    cfg.quant.update(quant)
    return config_lib.resolve(cfg).to_dict()


def _write(run_dir: str, name: str, value) -> None:
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, name), "w") as fh:
        json.dump(value, fh)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """runs/<sweep>/ with 132 finished runs (loss from the precision law), ptq.json on the high-precision ones, one
    diverged and one unfinished run."""
    root = str(tmp_path_factory.mktemp("runs") / "precision")
    sizes = {
        w: transformer.count_params(config_lib.from_json(json.dumps(_config(w, 1, {}))))["non_embedding"]
        for w in WIDTHS
    }
    i = 0
    for w in WIDTHS:
        for steps in STEPS:
            N, D = float(sizes[w]), steps * 256 * 2048.0
            for quant in QUANT:
                cols = {"N": np.array([N]), "D": np.array([D])}
                cols.update(
                    {
                        f"P_{k}": np.array([float(quant[f][3:]) if f in quant else math.inf])
                        for k, f in (("w", "weights"), ("a", "activations"), ("kv", "kv"))
                    }
                )
                run_dir = os.path.join(root, f"run{i:03d}")
                _write(run_dir, "sweep_run.json", {"config": _config(w, steps, quant)})
                _write(run_dir, "result.json", {"status": "done", "eval_loss": float(pl.precision_loss(TRUE, cols)[0])})
                if not quant:
                    ptq = [
                        {
                            "bits": b,
                            "method": "gptq",
                            "format": "int",
                            "granularity": "per_channel",
                            "embeddings": False,
                            "delta": float(pl.ptq_degradation(TRUE, {"N": N, "D": D, "P_post": float(b)})),
                        }
                        for b in (3, 4, 5, 6, 8)
                    ]
                    _write(run_dir, "ptq.json", ptq)
                i += 1
    _write(os.path.join(root, "diverged"), "sweep_run.json", {"config": _config(512, 3000, {"weights": "int2"})})
    _write(os.path.join(root, "diverged"), "result.json", {"status": "diverged", "eval_loss": None})
    _write(os.path.join(root, "unfinished"), "sweep_run.json", {"config": _config(512, 3000, {})})
    return root


def test_read_sweep_columns_and_skips(sweep):
    runs, points, skipped = law_cli.read_sweep(sweep)
    assert len(runs) == len(WIDTHS) * len(STEPS) * len(QUANT) and skipped == {"diverged": 1, "unfinished": 1}
    assert len(points) == len(WIDTHS) * len(STEPS) * 5
    w3 = [r for r in runs if r["P_w"] == 3]
    assert all(math.isinf(r["P_a"]) and math.isinf(r["P_kv"]) for r in w3)
    assert {r["D"] for r in runs} == {s * 256 * 2048.0 for s in STEPS}
    assert 3.5e7 < min(r["N"] for r in runs) < max(r["N"] for r in runs) < 2.5e8


def test_report_recovers_the_constants(sweep, tmp_path):
    fits = precision_report.report(sweep, str(tmp_path), n_boot=3)
    got = fits["precision"]["params"]
    for name in ("alpha", "gamma_w", "n_w", "gamma_a", "n_a", "gamma_kv", "n_kv"):
        assert got[name] == pytest.approx(TRUE[name], rel=0.03), name
    for name in ("A", "B", "E"):
        assert got[name] == pytest.approx(TRUE[name], rel=0.1), name
    assert fits["precision"]["r2_heldout"] > 0.999
    chin = fits["chinchilla"]["params"]
    assert chin["alpha"] == pytest.approx(TRUE["alpha"], rel=0.03) and chin["E"] == pytest.approx(TRUE["E"], rel=0.03)
    ptq = fits["ptq"]["params"]
    for name in ("C_T", "gamma_post", "gamma_D", "gamma_N"):
        assert ptq[name] == pytest.approx(TRUE[name], rel=0.05), name
    paper_pstar = [p["P"] for p in fits["pstar"]["paper"] if p["C"] >= 1e19]
    assert paper_pstar and all(abs(p - 7.0) < 0.3 for p in paper_pstar)  # precision.md: Table 2 gives P* ~ 7 bits
    for name in (
        "precision.md",
        "precision.json",
        *(f"precision_{n}.png" for n in ("fit", "bits", "neff", "pstar", "ptq")),
    ):
        assert os.path.getsize(tmp_path / name) > 0, name
    md = (tmp_path / "precision.md").read_text()
    assert "gamma_kv" in md and "1 diverged, 1 unfinished" in md


def test_fit_law_runs_flag(sweep, capsys):
    assert law_cli.main([f"--runs={sweep}", "--law=chinchilla", "--tie", "--boot=0", "--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["n_points"] == len(WIDTHS) * len(STEPS) and report["alpha"] == pytest.approx(TRUE["alpha"], rel=0.03)
    assert "skipped 1 diverged, 1 unfinished" in captured.err and captured.err.count("\n") == 1
    assert law_cli.main([f"--runs={sweep}", "--law=ptq", "--boot=0"]) == 0
    assert "gamma_post" in capsys.readouterr().out
    assert law_cli.main(["--runs=/nonexistent/sweep", "--law=precision"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a directory" in err
