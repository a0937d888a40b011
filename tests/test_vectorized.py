"""Vectorized runs (train/vectorized.py): K configs that differ in hyperparameters trained as one compiled program
give each member the losses of the same config run alone; a diverging member stops alone; run ids do not depend
on packing; a killed pack resumes exactly."""

import json
import shutil

import numpy as np
import pytest
from conftest import one_device_mesh, tiny_config

from maxscale.errors import ConfigError
from maxscale.train import loop, metrics, vectorized

STEPS = 20
SMALL = {
    "model.width": 32,
    "model.depth": 1,
    "model.num_heads": 2,
    "model.ffn_size": 64,
    "data.seq_len": 32,
    "train.batch_size": 4,
    "train.steps": STEPS,
    "train.log_every": 1,
    "train.eval_every": STEPS,
    "train.eval_steps": 1,
    "train.sample_tokens": 0,
    "train.peak_flops": 1e11,
    "checkpoint.every": 10,
    "checkpoint.async_save": False,
}


def cfg_of(**overrides):
    return tiny_config(**{**SMALL, **overrides})


def losses(run_dir, key="train/loss"):
    return {m["step"]: m[key] for m in metrics.read_metrics(run_dir) if key in m}


def alone(cfg, run_dir, corpus):
    try:
        loop.Trainer(cfg, str(run_dir), mesh=one_device_mesh(cfg), corpus=corpus).run()
    except loop.faults.NonFiniteError:
        return "stopped"
    return "done"


def test_each_member_equals_its_run_alone(tmp_path, tiny_corpus):
    members = [
        {"optimizer.lr": 1e-2},
        {"optimizer.lr": 3e-3, "optimizer.weight_decay": 0.3, "optimizer.b2": 0.99},
        {"train.seed": 7, "data.seed": 3},
        {"parameterization.output_mult": 2.0, "parameterization.attn_mult": 0.5, "parameterization.input_mult": 1.5},
        {"parameterization.init_std": 0.05, "parameterization.embed_init_std": 0.0},
        {"optimizer.lr": 1e30},  # overflows: stopped by train.nan_policy=stop, alone and packed alike
    ]
    cfgs = [cfg_of(**m) for m in members]
    dirs = [str(tmp_path / f"m{i}") for i in range(len(cfgs))]
    run = vectorized.VectorizedRun(
        cfgs, dirs, str(tmp_path / "pack"), mesh=one_device_mesh(cfgs[0]), corpus=tiny_corpus
    )
    results = run.run(log=lambda line: None)
    for i, cfg in enumerate(cfgs):
        status = alone(cfg, tmp_path / f"alone{i}", tiny_corpus)
        a, v = losses(tmp_path / f"alone{i}"), losses(dirs[i])
        assert sorted(a) == sorted(v), i  # the same logged steps: a stopped member stops where it would alone
        finite = [s for s in sorted(a) if np.isfinite(a[s]) and a[s] < 1e3]  # not past an overflow
        np.testing.assert_allclose([v[s] for s in finite], [a[s] for s in finite], rtol=1e-5, err_msg=str(i))
        assert losses(tmp_path / f"alone{i}", "eval/loss").keys() == losses(dirs[i], "eval/loss").keys()
        if status == "stopped":
            assert "stopped" in results[i] and np.isnan(results[i]["train/loss"])
        else:
            assert "stopped" not in results[i] and len(a) == STEPS, i
            ev_a, ev_v = losses(tmp_path / f"alone{i}", "eval/loss"), losses(dirs[i], "eval/loss")
            np.testing.assert_allclose(ev_v[STEPS], ev_a[STEPS], rtol=1e-5)
        assert json.load(open(f"{dirs[i]}/config.json")) == json.load(open(tmp_path / f"alone{i}" / "config.json"))
    assert "stopped" in results[-1] and len(losses(dirs[-1])) < STEPS  # the diverging member did stop early


def test_members_must_differ_only_in_vectorizable_fields():
    with pytest.raises(ConfigError, match="optimizer.grad_clip "):
        vectorized.check_members([cfg_of(), cfg_of(**{"optimizer.grad_clip": 0.5})])
    assert vectorized.pack_key(cfg_of(**{"optimizer.lr": 1.0})) == vectorized.pack_key(cfg_of())


def test_killed_pack_resumes_exactly(tmp_path, tiny_corpus):
    cfgs = [cfg_of(**{"optimizer.lr": lr}) for lr in (1e-2, 3e-3)]
    mesh = one_device_mesh(cfgs[0])
    full = [str(tmp_path / f"full{i}") for i in range(2)]
    vectorized.VectorizedRun(cfgs, full, str(tmp_path / "pack_full"), mesh=mesh, corpus=tiny_corpus).run()
    split = [str(tmp_path / f"split{i}") for i in range(2)]
    first = [cfg_of(**{"optimizer.lr": lr, "train.steps": 15}) for lr in (1e-2, 3e-3)]
    vectorized.VectorizedRun(first, split, str(tmp_path / "pack"), mesh=mesh, corpus=tiny_corpus).run()
    shutil.rmtree(tmp_path / "pack" / "15")  # killed before its step-15 save committed: resumes from 10
    vectorized.VectorizedRun(cfgs, split, str(tmp_path / "pack"), mesh=mesh, corpus=tiny_corpus).run()
    for a, b in zip(full, split):
        la, lb = losses(a), losses(b)
        assert sorted(lb) == list(range(1, STEPS + 1))
        np.testing.assert_allclose([lb[s] for s in la], [la[s] for s in la], rtol=1e-6)


def test_sweep_vectorize_matches_unpacked_runs(tmp_path):
    """tools/sweep.py --vectorize: the same run ids and directories, result.json as unpacked, finished runs skipped."""
    import jax
    from test_sweep import write_sweep

    from maxscale.parallel import sharding
    from maxscale.tools import sweep

    path = write_sweep(
        tmp_path,
        """
        return {"config": BASE, "grid": {"optimizer.lr": [1e-3, 4e-3]},
                "points": [{"parameterization.name": "sp"}, {"parameterization.name": "mup"}]}
        """,
    )
    s = sweep.load_sweep(path)
    packed, alone = sweep.expand(s, str(tmp_path / "packed")), sweep.expand(s, str(tmp_path / "alone"))
    assert [r["id"] for r in packed] == [r["id"] for r in alone]  # packing is not in the id
    alone = alone[:2]  # one member of each pack (sp, mup) also runs alone; all: the first test
    mesh = sharding.make_mesh(packed[0]["config"], jax.devices()[:1])
    for runs, k in ((packed, 2), (alone, 1)):
        sweep.write_plan(s, runs, str(tmp_path / ("packed" if k > 1 else "alone")))
        logged = []
        assert set(sweep.run_local(runs, mesh=mesh, vectorize=k, log=logged.append).values()) == {"done"}
        assert any("4 runs in 2 vectorized programs" in line for line in logged) == (k > 1)
    for p, a in zip(packed[:2], alone):
        rp, ra = (json.load(open(f"{r['dir']}/result.json")) for r in (p, a))
        assert rp["pack_size"] == 2 and "pack_size" not in ra and rp["config"] == ra["config"]
        np.testing.assert_allclose(rp["eval_loss"], ra["eval_loss"], rtol=1e-5)
        assert losses(p["dir"]).keys() == losses(a["dir"]).keys()
    logged = []
    sweep.run_local(packed, mesh=mesh, vectorize=2, log=logged.append)
    assert "4 finished, 0 to run" in logged[0]
