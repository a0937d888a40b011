"""A newcomer's tools (#25): report.py on a single run and on an LR-only sweep, fit_law's refusal when D does not
vary, binary files skipped in directory corpora, and the coordinate check's exit codes."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from maxscale import config as config_lib
from maxscale.analysis import coord_check, law_cli, report
from maxscale.errors import ConfigError
from maxscale.train import data as data_lib


def _config(**fields) -> dict:
    cfg = config_lib.load("configs/tiny.py")
    for key, value in fields.items():
        config_lib.override(cfg, key.replace("__", "."), repr(value))
    return config_lib.resolve(cfg).to_dict()


def _run(run_dir, cfg: dict, final_loss: float, extra=lambda step: {}) -> None:
    """A run directory as the trainer writes it: config.json and metrics.jsonl (train every 5 steps, eval every
    10, the final eval at train.steps)."""
    os.makedirs(run_dir, exist_ok=True)
    steps = cfg["train"]["steps"]
    with open(os.path.join(run_dir, "config.json"), "w") as fh:
        json.dump(cfg, fh)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as fh:
        for step in range(5, steps + 1, 5):
            rec = {"step": step, "train/loss": final_loss + 2.0 / step, "lr": 0.01, "grad_norm": 1.0 / step}
            rec.update(tokens_per_s=0.0 if step == 5 else 1e5, mfu=0.0 if step == 5 else 0.2, **extra(step))
            if step % 10 == 0:
                rec["eval/loss"] = final_loss + 1.0 / step
            fh.write(json.dumps(rec) + "\n")


def test_report_on_a_single_run_writes_curves_routing_and_quant(tmp_path):
    moe = lambda step: {"moe/load_max": 1.5 - step / 100, "moe/drop_fraction": 0.01, "quant/weights_rel_err": 0.02}
    _run(tmp_path / "run", _config(train__steps=20), 3.0, moe)
    rep = report.report(str(tmp_path / "run"), str(tmp_path / "out"))
    assert rep["sections"] == ["curves", "moe routing", "quantization errors"]
    for png in ("curves.png", "moe.png", "quant.png"):
        assert (tmp_path / "out" / png).read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| eval/loss | 20 | 3.05 |" in md and "| moe/load_max | 1.3 |" in md
    _run(tmp_path / "dense", _config(train__steps=20), 3.0)
    rep = report.report(str(tmp_path / "dense"))
    assert rep["sections"] == ["curves"] and {s["section"] for s in rep["skipped"]} == {
        "MoE routing",
        "Quantization errors",
    }


def test_report_on_an_lr_only_sweep_ranks_runs_and_finds_the_optimum(tmp_path):
    lrs = [2.0**e for e in range(-10, -3)]  # loss (log2 lr + 7)^2 / 10 + 3: optimum 2^-7, two seeds
    for i, lr in enumerate(lrs):
        for seed in (0, 1):
            cfg = _config(train__steps=20, optimizer__lr=lr, train__seed=seed)
            _run(tmp_path / "lrs" / f"run{i}s{seed}", cfg, 3.0 + (math.log2(lr) + 7) ** 2 / 10 + 0.01 * seed)
    rep = report.report(str(tmp_path / "lrs"))
    assert rep["sections"][:3] == ["runs", "curves", "hyperparameters"], rep["skipped"]
    ranked = rep["tables"]["runs"]
    assert [r["id"] for r in ranked[:2]] == ["run3s0", "run3s1"] and len(ranked) == 14
    o = rep["tables"]["hyperparameters"]["optimizer.lr"]["optimum"]
    lo, hi = o["interval"]
    assert o["opt"] == pytest.approx(2**-7, rel=0.01) and lo <= 2**-7 * 1.001 and hi >= 2**-7 * 0.999 and lo < 2**-6
    assert o["seeds"] == 2 and "bootstrap" in o["interval_kind"]
    for png in ("sweep_curves.png", "hyperparameters.png"):
        assert (tmp_path / "lrs" / png).read_bytes()[:4] == b"\x89PNG"
    assert "Optimal optimizer.lr: 0.007812" in (tmp_path / "lrs" / "report.md").read_text()


def test_fit_law_refuses_a_sweep_where_d_does_not_vary(tmp_path, capsys):
    for i, width in enumerate((32, 64, 96, 128, 160, 192, 224)):
        run_dir = tmp_path / "w" / f"run{i}"
        os.makedirs(run_dir)
        (run_dir / "sweep_run.json").write_text(json.dumps({"config": _config(model__width=width)}))
        (run_dir / "result.json").write_text(json.dumps({"status": "done", "eval_loss": 3.0 + 10 / width}))
    assert law_cli.main([f"--runs={tmp_path / 'w'}", "--law=chinchilla"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "every run has the same D" in err[0] and "train.steps" in err[0], err


def test_directory_corpus_skips_binary_files(tmp_path):
    corpus = tmp_path / "corpus"
    os.makedirs(corpus / "__pycache__")
    text = "def f(x):\n    return 'h\u00e9llo'\n" * 50
    (corpus / "a.py").write_text(text)
    (corpus / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\xa7\r\r\n\x00\x00" + bytes(range(256)) * 4)
    (corpus / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me\n".encode("latin-1") * 20)
    cfg = config_lib.defaults().data
    cfg.update(source=str(corpus), eval_fraction=0.0)
    c = data_lib.read_corpus(cfg)
    assert "skipped 2 binary files" in c.description
    tokens = np.concatenate([np.asarray(c.train), np.asarray(c.eval)])
    assert len(tokens) == len(text.encode()) + 1 and (tokens == 0).sum() == 1  # one document, one end mark
    single = config_lib.defaults().data
    single.update(source=str(corpus / "latin1.txt"))  # a file named on its own is read as it is
    assert "skipped" not in data_lib.read_corpus(single).description


@pytest.mark.slow
@pytest.mark.parametrize("names, code", [("sp", 1), ("mup", 0)])
def test_coord_check_exit_code_is_its_verdict(names, code, tmp_path, capsys):
    """Exit 1 when a parameterization fails, 0 when all pass. Two widths and one seed keep it cheap; at that size
    muP's curves are noisier (max |slope| 1.66 at steps 2-3, 0.26 with the README's 64-256 and 3 seeds), so the
    threshold is raised to 1.8, which SP still fails by far."""
    argv = ["--config=configs/tiny.py", "--sizes=64,128", "--seeds=1", "--steps=3", "--threshold=1.8"]
    assert coord_check.main(argv + [f"--parameterizations={names}", f"--out={tmp_path}"]) == code
    saved = json.loads((tmp_path / "coord_check.json").read_text())
    assert saved["verdict"]["series"][names]["pass"] == (code == 0) and saved["data"]["lr"] == coord_check.DEFAULT_LR
    print(saved["verdict"]["series"][names]["max_slope"])


def test_prepare_data_skips_the_binary_files_the_trainer_skips(tmp_path):
    """tools/prepare_data.py on a directory corpus leaves out what the trainer's own reader leaves out (binary
    files; a file named alone is read as it is): the token file equals the in-memory corpus, bit for bit."""
    from maxscale.tools import prepare

    corpus = tmp_path / "corpus"
    os.makedirs(corpus / "__pycache__")
    (corpus / "a.py").write_text("def f(x):\n    return 'h\u00e9llo'\n" * 50)
    (corpus / "b.txt").write_text("two words\n" * 30)
    (corpus / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\xa7\r\r\n\x00\x00" + bytes(range(256)) * 4)
    (corpus / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me\n".encode("latin-1") * 20)
    header = prepare.prepare(str(corpus), str(tmp_path / "tok"), eval_fraction=0.0, processes=1)
    assert "skipped 2 binary files" in header["description"]
    cfg = config_lib.defaults().data
    cfg.update(source=str(corpus), eval_fraction=0.0)
    expected = data_lib.read_corpus(cfg)
    got = np.fromfile(tmp_path / "tok.train.bin", np.uint8)
    np.testing.assert_array_equal(got, np.concatenate([np.asarray(expected.train), np.asarray(expected.eval)]))
    with pytest.raises(ConfigError, match="all 1 files are binary"):
        os.makedirs(tmp_path / "bin_only")
        (tmp_path / "bin_only" / "x.bin").write_bytes(b"\x00\x01\x02" * 10)
        prepare.prepare(str(tmp_path / "bin_only"), str(tmp_path / "tok2"), processes=1)
