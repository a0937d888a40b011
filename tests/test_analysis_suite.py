"""The analysis suite: the runs reader, weight spectra and width consistency, on matrices with known spectra and on
a real sweep of three tiny runs (widths 32 and 64, seeds 0 and 1, 10 steps each) trained on a 2-device mesh."""

import json
import math
import os

import jax
import numpy as np
import pytest
from conftest import ROOT, one_device_mesh, tiny_config

from maxscale import config as config_lib
from maxscale import parameterization
from maxscale.analysis import consistency, spectra
from maxscale.analysis import runs as runs_lib
from maxscale.errors import ConfigError
from maxscale.model import transformer
from maxscale.parallel import sharding
from maxscale.tools import sweep as sweep_lib
from maxscale.train import loop

STEPS = 10


@pytest.fixture(scope="module")
def width_sweep(tmp_path_factory, tiny_corpus):
    """runs/<w>/: width 32 seeds 0 and 1, width 64 seed 0; checkpoints kept at steps 5 and 10. The first run is
    trained by the Trainer itself on 2 devices (no result.json; its initial and final params are returned), the
    others by the sweep tool on one."""
    base = tiny_config(
        **{
            "model.width": 32,
            "model.num_heads": 2,
            "model.ffn_size": 64,
            "data.seq_len": 32,
            "train.steps": STEPS,
            "train.eval_every": 5,
            "train.eval_steps": 1,
            "train.log_every": 5,
            "train.sample_tokens": 0,
            "checkpoint.every": 5,
            "checkpoint.async_save": False,
            "parameterization.name": "mup",
            "schedule.warmup_steps": 2,
        }
    )
    shapes = {w: parameterization.scale_shapes(base, width=w) for w in (32, 64)}
    points = [shapes[32] | {"train.seed": 0, "mesh.fsdp": 2}, shapes[32] | {"train.seed": 1}, shapes[64]]
    spec = {"name": "w", "config": base, "points": points}
    root = str(tmp_path_factory.mktemp("runs"))
    plan = sweep_lib.expand(spec, root)
    sweep_dir = sweep_lib.write_plan(spec, plan, root)
    mesh = sharding.make_mesh(plan[0]["config"], jax.devices()[:2])  # sharded over 2 devices (FSDP)
    trainer = loop.Trainer(plan[0]["config"], plan[0]["dir"], mesh=mesh, corpus=tiny_corpus)
    init = trainer.setup.init_state()["params"]  # what the trainer starts from (compiled once, reused by run())
    numpy = lambda tree: jax.tree.map(np.asarray, jax.device_get(tree))  # noqa: E731
    init, final = numpy(init), numpy(trainer.run()["state"]["params"])
    for r in plan[1:]:
        sweep_lib.run_one(r["dir"], keep_checkpoints=True, corpus=tiny_corpus, mesh=one_device_mesh(base))
    return {"dir": sweep_dir, "plan": plan, "init": init, "final": final}


# ----------------------------------------------------------------------------------------------------------------
# Spectra of constructed matrices


def test_planted_singular_values_stable_rank_and_the_mp_edge():
    rng = np.random.default_rng(0)
    U, _ = np.linalg.qr(rng.standard_normal((40, 4)))
    V, _ = np.linalg.qr(rng.standard_normal((30, 4)))
    s = np.array([5.0, 3.0, 2.0, 1.0])
    w = U @ np.diag(s) @ V.T
    sv = spectra.singular_values(w)
    np.testing.assert_allclose(sv[:4], s, rtol=1e-12)
    assert np.all(sv[4:] < 1e-12)
    assert spectra.stable_rank(sv) == pytest.approx((25 + 9 + 4 + 1) / 25, rel=1e-12)
    assert spectra.stable_rank(np.ones(7)) == pytest.approx(7.0)
    # analysis.md's self-test: 1000 x 4000, entries of std 1/sqrt(4000): edge 1.5
    assert spectra.mp_edge(1 / math.sqrt(4000), 1000, 4000) == pytest.approx(1.5, rel=1e-12)

    # a random bulk (std 0.02, 200 x 400) plus three planted directions at 4, 3 and 2 x the edge
    n, m, std = 200, 400, 0.02
    w0 = std * rng.standard_normal((n, m))
    edge = std * (math.sqrt(n) + math.sqrt(m))
    U, _ = np.linalg.qr(rng.standard_normal((n, 3)))
    V, _ = np.linalg.qr(rng.standard_normal((m, 3)))
    theta = np.array([4.0, 3.0, 2.0]) * edge
    w = w0 + U @ np.diag(theta) @ V.T
    res = spectra.spectrum(w, w0, edge="mp")
    assert res["edge"] == pytest.approx(edge, rel=0.01)  # the std estimated from W_0's entries
    assert res["n_outliers"] == 3
    # Benaych-Georges & Nadakuditi: t = theta / (std sqrt m), c = n / m -> s = std sqrt m sqrt((1+t^2)(c+t^2)) / t
    t, c = theta / (std * math.sqrt(m)), n / m
    np.testing.assert_allclose(res["outliers"], std * math.sqrt(m) * np.sqrt((1 + t**2) * (c + t**2)) / t, rtol=0.03)
    assert 0.95 * edge < res["top"][3] < 1.02 * edge  # the bulk's own top sits at the edge
    # W - W_0 is exactly the planted part
    np.testing.assert_allclose(res["delta_top"][:3], theta, rtol=1e-9)
    assert res["delta_stable_rank"] == pytest.approx(np.sum(theta**2) / theta[0] ** 2, rel=1e-9)
    assert res["rel_delta_frobenius"] == pytest.approx(np.linalg.norm(theta) / np.linalg.norm(w0), rel=1e-9)
    fitted = spectra.spectrum(w, edge="fit")  # no W_0: the bulk fitted to W's median singular value
    assert fitted["edge"] == pytest.approx(edge, rel=0.03) and fitted["n_outliers"] == 3
    init = spectra.spectrum(w, w0, edge="init")
    assert init["edge"] == pytest.approx(spectra.singular_values(w0)[0]) and init["n_outliers"] == 3
    pure = spectra.spectrum(w0, w0)
    assert pure["n_outliers"] == 0 and pure["delta_spectral"] == 0.0 and pure["rel_delta_frobenius"] == 0.0


def test_mp_median_matches_sampled_matrices():
    rng = np.random.default_rng(1)
    for n, m in ((200, 200), (100, 400)):
        sampled = np.median(spectra.singular_values(rng.standard_normal((n, m))))
        assert spectra.mp_median(n, m) == pytest.approx(sampled, rel=0.02)


def test_hidden_matrices_are_cut_per_layer_and_expert_with_fan_in_rows():
    cfg = config_lib.resolve(config_lib.load(os.path.join(ROOT, "configs", "moe_tiny.py")))
    shapes = {path: shape for path, _, shape in transformer.param_specs(cfg)}
    rng = np.random.default_rng(0)
    params: dict = {}
    for path, shape in shapes.items():
        node = params
        *parents, leaf = path.split("/")
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = rng.standard_normal(shape).astype(np.float32)
    mats = list(spectra.matrices(cfg, params))
    m, e = cfg.model, cfg.model.moe
    depths = transformer.stack_depths(cfg)
    kinds = {}
    for x in mats:
        kinds.setdefault(x["kind"], []).append(x)
    assert "router" not in kinds and "embed" not in kinds and "unembed" not in kinds
    assert len(kinds["wq"]) == m.depth and kinds["wq"][0]["w"].shape == (m.width, m.num_heads * m.head_dim)
    assert kinds["wo"][0]["w"].shape == (m.num_heads * m.head_dim, m.width)
    assert len(kinds["w_up_e"]) == depths["moe_blocks"] * e.num_experts
    assert kinds["w_down_e"][0]["w"].shape == (e.expert_ffn_size, m.width)
    last = kinds["wo"][-1]
    assert last["layer"] == m.depth - 1
    stack = "moe_blocks" if "moe_blocks" in depths else "blocks"
    np.testing.assert_array_equal(last["w"], params[stack]["wo"][-1].reshape(-1, m.width))
    x = kinds["w_up_e"][-1]
    assert x["expert"] == e.num_experts - 1 and x["name"] == f"w_up_e/{m.depth - 1}/e{e.num_experts - 1}"
    np.testing.assert_array_equal(x["w"], params["moe_blocks"]["w_up_e"][-1, -1])


# ----------------------------------------------------------------------------------------------------------------
# The runs reader


def test_runs_reader_lists_runs_and_restores_params_on_one_device(width_sweep):
    runs = runs_lib.list_runs(width_sweep["dir"])
    assert sorted(r.id for r in runs) == sorted(p["id"] for p in width_sweep["plan"])
    first = runs_lib.Run.open(width_sweep["plan"][0]["dir"])
    assert first.config.model.width == 32 and first.config.mesh.fsdp == 2 and first.steps() == [5, STEPS]
    # trained sharded over 2 devices, restored onto one: the same numbers as the trainer's final state
    params = first.params(STEPS)
    assert jax.tree.structure(params) == jax.tree.structure(width_sweep["final"])
    jax.tree.map(np.testing.assert_array_equal, params, width_sweep["final"])
    assert not np.array_equal(first.params(5)["blocks"]["wq"], params["blocks"]["wq"])
    jax.tree.map(np.testing.assert_array_equal, first.params(0), width_sweep["init"])  # W_0 rebuilt from the seed
    with pytest.raises(ConfigError, match="no checkpoint at step 7"):
        first.params(7)
    # final eval: the last eval record (no result.json) or result.json, which agree for sweep runs
    evals = [r["eval/loss"] for r in first.metrics() if "eval/loss" in r]
    assert len(evals) == 2 and first.final_eval() == evals[-1] and not first.result()
    other = runs_lib.Run.open(width_sweep["plan"][1]["dir"])
    assert other.result()["status"] == "done" and other.final_eval() == other.curve("eval/loss")[1][-1]
    tokens = first.eval_tokens()
    assert tokens.shape == (first.config.train.batch_size, first.config.data.seq_len + 1)
    assert first.logits(params, tokens[:, :-1]).shape == (*tokens[:, :-1].shape, first.config.model.vocab_size)
    assert runs_lib.open_runs(first.dir)[0].dir == first.dir and len(runs_lib.open_runs(width_sweep["dir"])) == 3


# ----------------------------------------------------------------------------------------------------------------
# Width consistency


def test_kl_and_mixture_are_the_analytic_values():
    p, q = np.log([[0.5, 0.5]]), np.log([[0.9, 0.1]])
    assert consistency.kl(p, q)[0] == pytest.approx(0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1))
    np.testing.assert_allclose(np.exp(consistency.mixture([p, q])), [[0.7, 0.3]])
    np.testing.assert_allclose(np.exp(consistency.log_softmax(np.array([[0.0, math.log(3.0)]]))), [[0.25, 0.75]])


def test_consistency_is_zero_against_itself_and_positive_across_seeds(width_sweep):
    a = runs_lib.Run.open(width_sweep["plan"][0]["dir"])
    b = runs_lib.Run.open(width_sweep["plan"][1]["dir"])  # same width, train.seed 1
    tokens = a.eval_tokens()
    again = runs_lib.Run.open(a.dir)  # opened twice: its own model, its own compiled function
    predictors = {"a": a.predictor(STEPS), "a again": again.predictor(STEPS), "b": b.predictor(STEPS)}
    res = consistency.compare("a", predictors, tokens, {"a+b": ["a", "b"]}, chunk=3)
    assert res["tokens"] == tokens[:, 1:].size
    for label in ("a", "a again"):
        m = res["models"][label]
        assert m["kl"] == 0.0 and m["logit_dist"] == 0.0 and m["top1"] == 1.0
        assert m["loss"] == res["models"]["a"]["loss"]
    seeds = res["models"]["b"]
    assert seeds["kl"] > 1e-4 and seeds["logit_dist"] > 1e-4 and seeds["top1"] <= 1.0
    ens = res["ensembles"]["a+b"]
    assert 0.0 < ens["kl"] <= ens["member_kl"] == pytest.approx(seeds["kl"] / 2)  # convexity of KL
    assert ens["seed_var"] > 0 and ens["members"] == ["a", "b"]


def test_width_consistency_report_against_the_widest(width_sweep, tmp_path, capsys):
    assert consistency.main([width_sweep["dir"], f"--out={tmp_path}"]) == 0
    assert "Ensembles" in capsys.readouterr().out
    table = json.load(open(tmp_path / "consistency.json"))
    wide = width_sweep["plan"][2]["id"]
    assert table["reference"] == wide and table["steps"] == [0, 5, STEPS]
    assert set(table["per_step"]) == {"0", "5", str(STEPS)}
    for res in table["per_step"].values():
        assert res["models"][wide]["kl"] == 0.0 and res["models"][wide]["top1"] == 1.0
        assert all(m["kl"] > 0 for rid, m in res["models"].items() if rid != wide)
        assert list(res["ensembles"]) == ["width 32"]  # the only width with two seeds
    curves = table["loss_curves"]
    assert curves[wide]["gap"] == [0.0, 0.0] and len(curves) == 3
    assert {"consistency.json", "consistency.md", "consistency.png"} <= set(os.listdir(tmp_path))
    # --help exits 0, a bad flag or a step not kept is one line with exit 2
    assert consistency.main(["--help"]) == 0 and "usage" in capsys.readouterr().out
    assert consistency.main([width_sweep["dir"], "--no_such_flag=1"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert consistency.main([width_sweep["dir"], "--steps=3", f"--out={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not kept by every run" in err[0]


def test_runs_that_differ_in_more_than_width_and_seed_are_refused(width_sweep):
    runs = runs_lib.list_runs(width_sweep["dir"])
    assert set(consistency.check_family(runs)) >= {"model.width", "train.seed"}
    runs[0].config.optimizer.lr *= 2
    with pytest.raises(ConfigError, match="optimizer.lr"):
        consistency.width_consistency(runs)
    assert "optimizer.lr" in consistency.check_family(runs, allow=("optimizer.lr",))


# ----------------------------------------------------------------------------------------------------------------
# Spectra of a run


def test_spectra_of_a_run_over_training(width_sweep, tmp_path, capsys):
    run = runs_lib.Run.open(width_sweep["plan"][0]["dir"])
    traj = spectra.trajectory(run, top_k=4)
    assert traj["steps"] == [0, 5, STEPS]
    m = run.config.model
    assert len(traj["matrices"]) == m.depth * 7  # wq wk wv wo w_up w_gate w_down per layer
    wq = traj["matrices"]["wq/0"]
    assert wq["shape"] == [m.width, m.num_heads * m.head_dim]
    assert wq["rel_delta_frobenius"][0] == 0.0 and wq["rel_delta_frobenius"][-1] > 0
    std = run.config.parameterization.init_std  # muP at the base width: the plain init std
    assert wq["edge"][0] == pytest.approx(spectra.mp_edge(std, *wq["shape"]), rel=0.1)
    # the same numbers from the pytree functions on any two steps
    rows = {r["name"]: r for r in spectra.spectra(run.config, run.params(STEPS), run.params(0), top_k=4)}
    assert rows["wq/0"]["top"] == wq["top"][-1] and rows["wq/0"]["n_outliers"] == wq["n_outliers"][-1]
    assert spectra.main([width_sweep["dir"], f"--out={tmp_path}", "--steps=0,10", "--top_k=3"]) == 0
    assert "s_1 / edge" in capsys.readouterr().out
    assert {"spectra.json", "spectra.md", "spectra.png"} <= set(os.listdir(tmp_path))
    assert len(json.load(open(tmp_path / "spectra.json"))["runs"]) == 3
    assert spectra.main(["--help"]) == 0 and "--edge" in capsys.readouterr().out
    assert spectra.main([width_sweep["dir"], "--edge=wrong"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert spectra.main([str(tmp_path / "nowhere")]) == 2
    assert "not a directory" in capsys.readouterr().err
