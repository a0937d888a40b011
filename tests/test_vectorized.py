"""Vectorized runs (train/vectorized.py): K configs that differ in hyperparameters trained as one compiled program
give each member the losses of the same config run alone; a diverging member stops alone; run ids do not depend
on packing; a killed pack resumes exactly; the member axis split over devices (mesh.members) gives the replicated
pack's losses; MoE members equal their runs alone; --slurm --vectorize runs a pack per array task."""

import itertools
import json
import shutil

import numpy as np
import pytest
from conftest import one_device_mesh, tiny_config

from maxscale.errors import ConfigError
from maxscale.parallel import sharding
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


_ALONE = {}  # member index -> (status, its run directory): the runs alone, shared by the member_batch cases


@pytest.mark.parametrize("member_batch", [0, 4, 6])  # auto (1 on CPU: one after another), lax.map by 4 + 2, vmap
def test_each_member_equals_its_run_alone(member_batch, tmp_path, tmp_path_factory, tiny_corpus):
    members = [
        {"optimizer.lr": 1e-2},
        {"optimizer.lr": 3e-3, "optimizer.weight_decay": 0.3, "optimizer.b2": 0.99},
        {"train.seed": 7, "data.seed": 3},
        {"parameterization.output_mult": 2.0, "parameterization.attn_mult": 0.5, "parameterization.input_mult": 1.5},
        {"parameterization.init_std": 0.05, "parameterization.embed_init_std": 0.0},
        {"optimizer.lr": 1e30},  # overflows: stopped by train.nan_policy=stop, alone and packed alike
    ]
    cfgs = [cfg_of(**m, **{"mesh.member_batch": member_batch}) for m in members]
    dirs = [str(tmp_path / f"m{i}") for i in range(len(cfgs))]
    run = vectorized.VectorizedRun(
        cfgs, dirs, str(tmp_path / "pack"), mesh=one_device_mesh(cfgs[0]), corpus=tiny_corpus
    )
    assert run.member_batch == (member_batch or 1)
    results = loop.train_pack(run, log=lambda line: None)
    for i, cfg in enumerate(cfgs):
        if i not in _ALONE:
            d = tmp_path_factory.mktemp(f"alone{i}")
            _ALONE[i] = (alone(cfg, d, tiny_corpus), d)
        status, alone_dir = _ALONE[i]
        a, v = losses(alone_dir), losses(dirs[i])
        assert sorted(a) == sorted(v), i  # the same logged steps: a stopped member stops where it would alone
        finite = [s for s in sorted(a) if np.isfinite(a[s]) and a[s] < 1e3]  # not past an overflow
        np.testing.assert_allclose([v[s] for s in finite], [a[s] for s in finite], rtol=1e-5, err_msg=str(i))
        assert losses(alone_dir, "eval/loss").keys() == losses(dirs[i], "eval/loss").keys()
        if status == "stopped":
            assert "stopped" in results[i] and np.isnan(results[i]["train/loss"])
        else:
            assert "stopped" not in results[i] and len(a) == STEPS, i
            ev_a, ev_v = losses(alone_dir, "eval/loss"), losses(dirs[i], "eval/loss")
            np.testing.assert_allclose(ev_v[STEPS], ev_a[STEPS], rtol=1e-5)
        packed_cfg, alone_cfg = json.load(open(f"{dirs[i]}/config.json")), json.load(open(alone_dir / "config.json"))
        alone_cfg["mesh"]["member_batch"] = member_batch  # the alone runs are shared by the three cases
        assert packed_cfg == alone_cfg
    assert "stopped" in results[-1] and len(losses(dirs[-1])) < STEPS  # the diverging member did stop early


def test_members_must_differ_only_in_vectorizable_fields():
    with pytest.raises(ConfigError, match="optimizer.grad_clip "):
        vectorized.check_members([cfg_of(), cfg_of(**{"optimizer.grad_clip": 0.5})])
    assert vectorized.pack_key(cfg_of(**{"optimizer.lr": 1.0})) == vectorized.pack_key(cfg_of())


def test_killed_pack_resumes_exactly(tmp_path, tiny_corpus):
    cfgs = [cfg_of(**{"optimizer.lr": lr}) for lr in (1e-2, 3e-3)]
    mesh = one_device_mesh(cfgs[0])
    full = [str(tmp_path / f"full{i}") for i in range(2)]
    loop.train_pack(vectorized.VectorizedRun(cfgs, full, str(tmp_path / "pack_full"), mesh=mesh, corpus=tiny_corpus))
    split = [str(tmp_path / f"split{i}") for i in range(2)]
    first = [cfg_of(**{"optimizer.lr": lr, "train.steps": 15}) for lr in (1e-2, 3e-3)]
    loop.train_pack(vectorized.VectorizedRun(first, split, str(tmp_path / "pack"), mesh=mesh, corpus=tiny_corpus))
    shutil.rmtree(tmp_path / "pack" / "checkpoints" / "15")  # killed before its step-15 save committed: from 10
    loop.train_pack(vectorized.VectorizedRun(cfgs, split, str(tmp_path / "pack"), mesh=mesh, corpus=tiny_corpus))
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


LRS = (1e-2, 3e-3, 5e-3, 2e-3)


def _pack_losses(tmp_path, tag, cfgs, mesh, corpus):
    dirs = [str(tmp_path / tag / f"m{i}") for i in range(len(cfgs))]
    run = vectorized.VectorizedRun(cfgs, dirs, str(tmp_path / tag / "pack"), mesh=mesh, corpus=corpus)
    loop.train_pack(run, log=lambda line: None)
    return [[losses(d)[s] for s in sorted(losses(d))] for d in dirs], run


@pytest.mark.slow
def test_member_axis_sharded_over_devices_equals_replicated(tmp_path, tiny_corpus):
    """mesh.members = n splits the member axis over n groups of devices (vectorized_mesh.py): the same losses as
    the replicated pack, each device holding only its members; members = 1 with data = 2 shards each member."""
    import jax

    from maxscale.train import vectorized_mesh as vmesh

    steps = {"train.steps": 5, "train.eval_every": 5, "train.eval_steps": 0}  # eval: the MoE test

    def pack(members, data=1):
        cfgs = [cfg_of(**steps, **{"optimizer.lr": lr, "data.seed": i, "mesh.data": data}) for i, lr in enumerate(LRS)]
        for c in cfgs:  # set after resolve: mesh.members is read with a default (1)
            c.mesh.members = members
        return cfgs

    ref, _ = _pack_losses(tmp_path, "ref", pack(1), one_device_mesh(cfg_of()), tiny_corpus)
    for members, data in ((4, 1), (2, -1), (1, 2)):  # -1: each of the 2 groups fills its 2 devices with data
        cfgs = pack(members, data)
        mesh = vmesh.make_mesh(cfgs[0], len(cfgs), jax.devices()[: 2 if members == 1 else 4])
        got, run = _pack_losses(tmp_path, f"m{members}", cfgs, mesh, tiny_corpus)
        np.testing.assert_allclose(got, ref, rtol=1e-5, err_msg=f"members={members} data={data}")
        leaf = run.init_state()["members"]["params"]["blocks"]["w_up"]
        assert leaf.shape[0] == 4 and len(leaf.sharding.device_set) == len(mesh.devices.flat)
        per_device = {s.data.shape[0] for s in leaf.addressable_shards}
        assert per_device == {4 // members}, (members, per_device)  # each device holds its M/n members
        batch = run.batch_sh.shard_shape((4, 4, 33))  # [M, B, T+1]: members, then rows over the member's data
        assert batch == (4 // members, 4 // mesh.shape["data"], 33)


def test_member_mesh_choices_and_refusals():
    import jax

    from maxscale.parallel import sharding
    from maxscale.train import vectorized_mesh as vmesh

    cfg = cfg_of(**{"mesh.data": -1})
    cfg.mesh.members = 4
    mesh = vmesh.make_mesh(cfg, 8, jax.devices())  # 8 devices: 4 groups of 2, data fills each group
    assert dict(mesh.shape) == {"members": 4, "data": 2, "fsdp": 1, "tensor": 1, "expert": 1}
    logged = []
    small = vmesh.make_mesh(cfg, 2, jax.devices(), log=logged.append)  # a sweep's last pack of 2: gcd(2, 4) groups
    assert small.shape["members"] == 2 and small.size == 4 and "stay idle" in logged[0]
    assert vmesh.members_of(cfg_of()) == 1  # configs without the field: every member on the whole mesh
    with pytest.raises(ConfigError, match=r"mesh.members=4; use a pack size"):
        vmesh.check(mesh, 6)
    cfg.mesh.members = 3
    with pytest.raises(ConfigError, match="mesh.members=3 does not divide the 8 devices"):
        vmesh.make_mesh(cfg, 6, jax.devices())
    assert vmesh.member_batch(cfg_of(), 7, "cpu") == 1 and vmesh.member_batch(cfg_of(), 7, "gpu") == 7  # auto
    assert vmesh.member_batch(cfg_of(**{"mesh.member_batch": 3}), 7, "gpu") == 3
    assert vmesh.member_batch(cfg, 6, "cpu") == 6  # split members are always vmapped
    with pytest.raises(ConfigError, match="mesh.member_batch=2 needs mesh.members=1"):
        vmesh.member_batch(cfg_of(**{"mesh.members": 2, "mesh.member_batch": 2}), 6, "cpu")
    with pytest.raises(ConfigError, match=r"mesh.member_batch=-1 must be an integer >= 0"):
        vmesh.member_batch(cfg_of(**{"mesh.member_batch": -1}), 6, "cpu")
    ep = cfg_of(**{"mesh.expert": 2, "mesh.members": 2})
    vmesh.check(sharding.make_mesh(ep, jax.devices()[:2]), 2)  # members on the whole mesh: expert parallelism works
    with pytest.raises(ConfigError, match=r"expert parallelism \(mesh.expert=2\) with the members split"):
        vmesh.check(vmesh.make_mesh(ep, 2, jax.devices()[:4]), 2)


def test_moe_members_equal_their_runs_alone(tmp_path, tiny_corpus):
    """MoE members (balance=bias: each member's routing bias is stacked state) equal their runs alone: losses,
    routing metrics and moe_load.jsonl; here with the member axis split over 2 devices."""
    import jax
    from test_moe import moe_config

    from maxscale.train import vectorized_mesh as vmesh

    small = {k: v for k, v in SMALL.items() if k != "model.ffn_size"}
    base = {**small, "model.depth": 2, "model.moe.expert_ffn_size": 32, "train.steps": 10, "train.eval_every": 10}
    members = [{"optimizer.lr": 1e-2}, {"optimizer.lr": 3e-3, "data.seed": 1, "train.seed": 2}]
    cfgs = [moe_config(**{**base, **m}) for m in members]
    assert cfgs[0].model.moe.balance == "bias"
    for c in cfgs:
        c.mesh.members = 2
    dirs = [str(tmp_path / f"m{i}") for i in range(2)]
    mesh = vmesh.make_mesh(cfgs[0], 2, jax.devices()[:2])
    loop.train_pack(vectorized.VectorizedRun(cfgs, dirs, str(tmp_path / "pack"), mesh=mesh, corpus=tiny_corpus))
    # the same pack with the members on a whole expert=2 mesh: the experts split over 2 devices (moe_ep)
    ep_cfgs = [moe_config(**{**base, **m, "mesh.expert": 2}) for m in members]
    ep_dirs = [str(tmp_path / f"ep{i}") for i in range(2)]
    ep_mesh = sharding.make_mesh(ep_cfgs[0], jax.devices()[:2])
    loop.train_pack(vectorized.VectorizedRun(ep_cfgs, ep_dirs, str(tmp_path / "ep"), mesh=ep_mesh, corpus=tiny_corpus))
    for i, cfg in enumerate(cfgs):
        out = loop.Trainer(cfg, str(tmp_path / f"alone{i}"), mesh=one_device_mesh(cfg), corpus=tiny_corpus).run()
        assert np.abs(np.asarray(out["state"]["moe_bias"])).max() > 0  # the bias moved: it is in the comparison
        for key, d in itertools.product(
            ("train/loss", "moe/load_max", "moe/router_entropy", "eval/loss"), (dirs, ep_dirs)
        ):
            a, v = losses(tmp_path / f"alone{i}", key), losses(d[i], key)
            assert sorted(a) == sorted(v) and a, key
            np.testing.assert_allclose([v[s] for s in a], [a[s] for s in a], rtol=1e-5, err_msg=f"{d[i]} {key}")
        for d in (dirs[i], ep_dirs[i]):
            rows = [[json.loads(line) for line in open(f"{x}/moe_load.jsonl")] for x in (tmp_path / f"alone{i}", d)]
            assert [r["step"] for r in rows[0]] == [r["step"] for r in rows[1]]
            np.testing.assert_allclose([r["moe_load"] for r in rows[1]], [r["moe_load"] for r in rows[0]], atol=1e-6)


def test_slurm_array_runs_one_pack_per_task(tmp_path, capsys):
    """--slurm --vectorize=K: packs.txt holds a pack a line (its run directories joined by commas) and the array has
    one task per pack, each running `tools/sweep.py --run_dir=DIR,DIR,...` (the local --jobs path's command)."""
    from test_sweep import write_sweep

    from maxscale.tools import sweep

    path = write_sweep(
        tmp_path,
        """
        return {"config": BASE, "grid": {"optimizer.lr": [1e-3, 2e-3, 4e-3]},
                "points": [{"parameterization.name": "sp"}, {"parameterization.name": "mup"}]}
        """,
    )
    root = tmp_path / "runs"
    assert sweep.main([path, "--slurm", "--vectorize=2", "--jobs=3", f"--root={root}"]) == 0
    assert "(4 array tasks, 3 at a time)" in capsys.readouterr().out  # sp: 2 + 1, mup: 2 + 1
    script = (root / "demo" / "sweep.sbatch").read_text()
    assert "#SBATCH --array=0-3%3" in script and f"{root / 'demo'}/packs.txt)" in script
    assert 'tools/sweep.py --run_dir="$RUN_DIR"' in script
    lines = (root / "demo" / "packs.txt").read_text().split()
    runs = {r["dir"]: r for r in sweep.expand(sweep.load_sweep(path), str(root))}
    assert sorted(d for line in lines for d in line.split(",")) == sorted(runs)  # every run in one pack
    assert [len(line.split(",")) for line in lines] == [2, 1, 2, 1]
    for line in lines:
        keys = {vectorized.pack_key(runs[d]["config"]) for d in line.split(",")}
        assert len(keys) == 1  # a pack's members differ only in vectorizable fields
    assert sweep.main([path, "--slurm", f"--root={root}"]) == 0  # without --vectorize: a run per task, as before
    assert "runs.txt)" in (root / "demo" / "sweep.sbatch").read_text()
