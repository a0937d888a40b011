"""Coordinate checks: muP-family activations stay the same size as width grows, SP's do not; across depth,
CompleteP and depth-muP keep the residual stream bounded while alpha = 0 lets it grow."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from maxscale import config as config_lib  # noqa: E402
from maxscale.analysis import coord_check as cc  # noqa: E402
from maxscale.model import transformer  # noqa: E402
from maxscale.parameterization import Parameterization  # noqa: E402
from maxscale.train import data as data_lib  # noqa: E402


def small_base(**fields):
    """Width 32, depth 2, 2 heads of 16, ffn 64; batch 4 x 32 tokens; a large constant LR."""
    c = config_lib.defaults()
    c.model.update(width=32, depth=2, num_heads=2, ffn_size=64)
    c.data.update(seq_len=32, max_bytes=300_000)
    c.train.update(batch_size=4)
    c.optimizer.update(lr=0.005)
    for key, value in fields.items():
        config_lib.override(c, key.replace("__", "."), repr(value))
    return config_lib.resolve(c)


@pytest.fixture(scope="module")
def corpus():
    return data_lib.load_corpus(small_base())


def test_capture_returns_the_same_logits_and_per_layer_stats():
    cfg = small_base(model__depth=3)
    model = transformer.ModelDef(cfg)
    params = model.init(0)
    tokens = np.arange(2 * 8, dtype=np.int32).reshape(2, 8) % 256
    plain = model.apply(params, tokens)
    out = model.forward(params, tokens, capture=("stats",))
    logits, stats = out.logits, transformer.stats_of(out)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(plain), rtol=1e-6)
    assert set(stats["layers"]) == {"attn", "attn_logits", "attn_mix", "mlp", "resid", "probe", "qk_probe"}
    assert stats["layers"]["resid"].shape == (3,) and stats["layers"]["probe"].shape == (3, 8, 32)
    assert float(stats["logits"]) == pytest.approx(float(np.abs(np.asarray(plain)).mean()), rel=1e-5)
    assert float(stats["embed"]) == pytest.approx(float(np.abs(np.asarray(params["embed"])[tokens]).mean()), rel=1e-5)


@pytest.fixture(scope="module")
def width_verdict(corpus):
    # completep over a base depth of 1: its depth factors are live (residual 1/2), its width rules are muP's
    # mup+attn_exponent=0.5: muP with SP's 1/sqrt(d) attention scaling, a wrong rule the check must catch. Its
    # learned logits grow like d^1/2 only once q and k updates align: 10 steps (4 do not show it; the steps run in
    # one scan, so they cost little beside the compilations)
    variants = [cc.Variant("sp"), cc.Variant("mup"), cc.Variant("completep"), cc.Variant.parse("mup+attn_exponent=0.5")]
    base = small_base(parameterization__base_depth=1)
    result = cc.run(base, "width", [32, 64, 128, 256], variants, seeds=2, steps=10, corpus=corpus, log=lambda s: None)
    return cc.verdict(result)


def test_sp_attention_scaling_under_mup_fails_on_the_learned_logits(width_verdict):
    s = width_verdict["series"]
    wrong, right = s["mup+attn_exponent=0.5"], s["mup"]
    assert not wrong["pass"] and wrong["max_slope"] > 0.3
    assert wrong["slopes_by_step"]["attn_update/last"][-1] > 0.3  # the learned part of q.k grows with width
    assert right["slopes_by_step"]["attn_update/last"][-1] < 0.15  # ... and does not under the 1/d rule


def test_mup_and_completep_keep_activations_width_independent_sp_does_not(width_verdict):
    s = width_verdict["series"]
    print(cc.summary(width_verdict))
    assert s["mup"]["pass"] and s["mup"]["max_slope"] <= 0.3
    assert s["completep"]["pass"] and s["completep"]["max_slope"] <= 0.3
    assert not s["sp"]["pass"] and s["sp"]["max_slope"] > 0.8
    # SP's hidden outputs grow roughly like width (an Adam step moves W x by O(fan_in)); muP's stay flat
    assert s["sp"]["slopes_by_step"]["mlp/1"][-1] > 0.8
    assert abs(s["mup"]["slopes_by_step"]["mlp/1"][-1]) < 0.3


@pytest.mark.slow
def test_completep_and_depth_mup_keep_the_residual_stream_bounded_alpha_zero_does_not(corpus):
    variants = [cc.Variant("completep"), cc.Variant("depth_mup"), cc.Variant("completep", 0.0)]
    result = cc.run(small_base(), "depth", [2, 4, 8, 16], variants, seeds=2, steps=4, corpus=corpus, log=lambda s: None)
    v = cc.verdict(result)
    print(cc.summary(v))
    s = v["series"]
    assert s["completep"]["pass"] and s["depth_mup"]["pass"]
    assert not s["completep(alpha=0)"]["pass"] and s["completep(alpha=0)"]["max_slope"] > 0.5
    last = lambda label: np.asarray(result["series"][label]["resid/last"]).mean(1)[:, -1]  # noqa: E731
    assert last("completep(alpha=0)")[-1] > 2 * last("completep")[-1]  # depth 16 after 4 steps
    # the per-layer update size tells CompleteP (each block moves the stream by ~1/L) from depth-muP (~L^-1/2..-1)
    update_slope = {label: s[label]["slopes_by_step"]["update/mean"][-1] for label in s}
    assert update_slope["completep"] < -0.85 and update_slope["depth_mup"] > update_slope["completep"] + 0.1
    assert update_slope["completep(alpha=0)"] > 0


@pytest.mark.slow
def test_fan_in_readout_init_fails_the_width_check(corpus, monkeypatch):
    """The check uses the model's own initializer, so a wrong readout rule (init shrinking with fan-in on top of
    muP's 1/m_N multiplier) shows up: the backward signal into the blocks shrinks with width."""
    original = Parameterization.init_std

    def fan_in_readout(self, spec, *rest):
        if spec.role == "readout":
            return self.cfg.parameterization.init_std / math.sqrt(self.m_width)
        return original(self, spec, *rest)

    monkeypatch.setattr(Parameterization, "init_std", fan_in_readout)
    base = small_base(parameterization__base_depth=1)
    result = cc.run(
        base, "width", [32, 64, 128, 256], [cc.Variant("mup")], seeds=2, steps=4, corpus=corpus, log=lambda s: None
    )
    v = cc.verdict(result)["series"]["mup"]
    assert not v["pass"], v["max_slope_by_curve"]


def test_outputs_and_cli_errors(width_verdict, tmp_path):
    # the plot and JSON from a tiny synthetic result (no training)
    result = {
        "axis": "width",
        "sizes": [32, 64],
        "steps": 2,
        "seeds": 1,
        "lr": 0.01,
        "series": {"mup": {"embed": [[[1, 1, 1]], [[1, 1, 1]]], "logits": [[[1, 2, 3]], [[1, 2, 3]]]}},
    }
    v = cc.write(result, str(tmp_path))
    assert v["series"]["mup"]["pass"] and json.load(open(tmp_path / "coord_check.json"))["verdict"] == v
    png = tmp_path / "coord_check.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size < 200_000
    tool = [sys.executable, str(REPO / "tools" / "coord_check.py"), "--config=configs/tiny.py"]
    for bad in (
        ["--axis=height", "--out=x"],
        ["--sizes=64", "--out=x"],
        ["--parameterizations=mu", "--out=x"],
        ["--sizes=64,100", "--out=x"],
        ["--lr=fast", "--out=x"],
    ):
        out = subprocess.run(tool + bad, capture_output=True, text=True, cwd=REPO, timeout=120)
        assert out.returncode == 2, (bad, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1 and out.stderr.startswith("coord_check: error:"), out.stderr


def test_coordinate_check_over_experts_records_routing_and_passes_at_fixed_k_over_e(corpus):
    """E grows with k/E fixed: router logits, combine weights, routed-expert outputs and the residual stream stay
    the same size (E enters no rule). Also runs the k-fixed control axis."""
    base = small_base(model__moe__num_experts=4, model__moe__num_active=2, model__moe__expert_ffn_size=32)
    result = cc.run(base, "experts", [4, 8, 16], [cc.Variant("mup")], seeds=2, steps=4, corpus=corpus, log=print)
    assert [cc.size_config(base, "experts", n, cc.Variant("mup")).model.moe.num_active for n in (4, 8, 16)] == [2, 4, 8]
    curves = result["series"]["mup"]
    assert {"router_logits/mean", "gates/mean", "experts/mean", "resid/last"} <= set(curves)
    v = cc.verdict(result)["series"]["mup"]
    assert v["pass"], v["max_slope_by_curve"]
    control = cc.size_config(base, "experts_fixed_k", 16, cc.Variant("mup")).model.moe
    assert (control.num_experts, control.num_active, control.capacity_factor) == (16, 2, 8.0)
