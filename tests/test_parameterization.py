"""The parameterization table: each rule checked against docs/parameterizations.md, with the numbers."""

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
from maxscale import parameterization  # noqa: E402
from maxscale.errors import ConfigError  # noqa: E402
from maxscale.model import transformer  # noqa: E402
from maxscale.parameterization import Parameterization  # noqa: E402
from maxscale.train import optim  # noqa: E402

NAMES = tuple(parameterization.RULES)


BASE = {"model.width": 64, "model.depth": 2, "model.num_heads": 4, "model.ffn_size": 128}


def _resolved(overrides: dict):
    c = config_lib.defaults()
    for key, value in overrides.items():
        config_lib.override(c, key, value if isinstance(value, str) else repr(value))
    return config_lib.resolve(c)


def _fields(fields: dict) -> dict:
    return {k.replace("__", "."): v for k, v in fields.items()}


def base_cfg(**fields):
    """Width 64, depth 2, 4 heads of 16, ffn 128; `section__field=value` overrides."""
    return _resolved({**BASE, **_fields(fields)})


def scaled(name, width=None, depth=None, grows=None, **fields):
    """The base model scaled to `width`/`depth` (base shapes pinned to the base model) under `name`."""
    shapes = parameterization.scale_shapes(base_cfg(**fields), width=width, depth=depth, grows=grows)
    return _resolved({**BASE, **_fields(fields), **shapes, "parameterization.name": name})


def table(cfg):
    par = Parameterization(cfg)
    return par, {path: (spec, shape) for path, spec, shape in transformer.param_specs(cfg)}


HIDDEN = ("blocks/wq", "blocks/wk", "blocks/wv", "blocks/wo", "blocks/w_up", "blocks/w_gate", "blocks/w_down")


@pytest.mark.parametrize("name", NAMES)
def test_every_parameterization_equals_sp_at_base_shapes(name):
    sp_par, specs = table(base_cfg())
    par, _ = table(base_cfg(parameterization__name=name))
    for path, (spec, _) in specs.items():
        assert par.init_std(spec) == sp_par.init_std(spec), path
        assert par.lr_factor(spec) == 1.0, path
        assert par.eps_factor(spec) == 1.0, path
        assert par.wd_factor(spec) == sp_par.wd_factor(spec), path
    assert par.multipliers() == pytest.approx(sp_par.multipliers())
    assert par.attn_scale == pytest.approx(1 / math.sqrt(16))


@pytest.mark.parametrize("grows", ["head_dim", "heads"])
def test_mup_doubling_width_halves_hidden_lr_and_init_variance_and_leaves_embedding_alone(grows):
    par1, specs1 = table(scaled("mup"))
    par2, specs2 = table(scaled("mup", width=128, grows=grows))
    assert par2.m_width == 2.0
    for path in HIDDEN:
        s1, s2 = specs1[path][0], specs2[path][0]
        assert par2.lr_factor(s2) == pytest.approx(par1.lr_factor(s1) / 2), path
        assert par2.init_std(s2) ** 2 == pytest.approx(par1.init_std(s1) ** 2 / 2), path
    for path in ("embed", "unembed"):
        s2 = specs2[path][0]
        assert par2.lr_factor(s2) == 1.0 and par2.init_std(s2) == 0.02, path
    assert par2.output_mult == pytest.approx(par1.output_mult / 2)  # readout x 1/m_N (TP-V Table 8)
    # 1/d attention: halves when the head dim doubles, unchanged when the heads double
    assert par2.attn_scale == pytest.approx(par1.attn_scale / (2 if grows == "head_dim" else 1))


def test_sp_doubling_width_changes_nothing_but_the_attention_head_dim():
    par1, specs1 = table(scaled("sp"))
    par2, specs2 = table(scaled("sp", width=128))
    for path in HIDDEN + ("embed", "unembed"):
        assert par2.lr_factor(specs2[path][0]) == 1.0
        assert par2.init_std(specs2[path][0]) == 0.02
    assert par2.output_mult == 1.0
    assert par2.attn_scale == pytest.approx(1 / math.sqrt(32))  # SP's 1/sqrt(d_head)


def test_completep_doubling_depth_halves_the_residual_multiplier_and_keeps_the_hidden_lr():
    par1, specs1 = table(scaled("completep"))
    par2, specs2 = table(scaled("completep", depth=4))
    assert par2.residual_mult == pytest.approx(par1.residual_mult / 2) == pytest.approx(0.5)
    for path in HIDDEN + ("blocks/attn_norm", "blocks/mlp_norm", "embed", "unembed", "final_norm"):
        assert par2.lr_factor(specs2[path][0]) == pytest.approx(par1.lr_factor(specs1[path][0])), path
    assert par2.init_std(specs2["blocks/wq"][0]) == 0.02  # no depth factor in the init


def test_depth_mup_doubling_depth_scales_residual_and_block_lr_by_inverse_sqrt2():
    par1, specs1 = table(scaled("depth_mup"))
    par2, specs2 = table(scaled("depth_mup", depth=4))
    r = 2**-0.5
    assert par2.residual_mult == pytest.approx(par1.residual_mult * r)
    for path in HIDDEN + ("blocks/attn_norm", "blocks/mlp_norm"):
        assert par2.lr_factor(specs2[path][0]) == pytest.approx(par1.lr_factor(specs1[path][0]) * r), path
    for path in ("embed", "unembed", "final_norm"):  # outside the blocks: no depth factor
        assert par2.lr_factor(specs2[path][0]) == 1.0, path


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 0.75])
def test_general_depth_exponent(alpha):
    par, specs = table(scaled("completep", depth=8, parameterization__depth_alpha=alpha))
    assert par.alpha == alpha
    assert par.residual_mult == pytest.approx(4.0**-alpha)
    # alpha = 0 is plain muP: no depth factor at all (docs/parameterizations.md, depth table)
    expected_lr = 1.0 if alpha == 0 else 4.0 ** (alpha - 1)
    assert par.lr_factor(specs["blocks/wq"][0]) == pytest.approx(expected_lr)
    assert par.eps_factor(specs["blocks/wq"][0]) == pytest.approx(4.0**-alpha)


def test_mup_ignores_depth():
    par, specs = table(scaled("mup", depth=8))
    assert par.residual_mult == 1.0
    assert all(par.lr_factor(specs[p][0]) == 1.0 for p in HIDDEN)


def test_eps_factors_follow_the_table():
    par, specs = table(scaled("completep", width=128, depth=4))
    # eps x m_N^-1 everywhere, x m_L^-alpha inside the blocks (CompleteP Table 1)
    assert par.eps_factor(specs["blocks/wq"][0]) == pytest.approx(1 / 2 * 1 / 2)
    assert par.eps_factor(specs["blocks/attn_norm"][0]) == pytest.approx(1 / 4)
    assert par.eps_factor(specs["embed"][0]) == pytest.approx(1 / 2)
    assert par.eps_factor(specs["unembed"][0]) == pytest.approx(1 / 2)
    # nanoGPT-mup's completep branch applies the depth factor to every group
    par_all, specs_all = table(scaled("completep", width=128, depth=4, parameterization__eps_depth_scope="all"))
    assert par_all.eps_factor(specs_all["embed"][0]) == pytest.approx(1 / 4)
    par_off, specs_off = table(scaled("completep", width=128, depth=4, parameterization__scale_eps=False))
    assert all(par_off.eps_factor(s) == 1.0 for s, _ in specs_off.values())
    par_sp, specs_sp = table(scaled("sp", width=128))
    assert all(par_sp.eps_factor(s) == 1.0 for s, _ in specs_sp.values())


@pytest.mark.parametrize("mode, hidden_wd", [("coupled", 2.0), ("independent", 1.0)])
def test_weight_decay_factors(mode, hidden_wd):
    par, specs = table(scaled("mup", width=128, optimizer__weight_decay_mode=mode))
    for path in HIDDEN:
        spec = specs[path][0]
        assert par.wd_factor(spec) == hidden_wd, path
        if mode == "coupled":  # lr * wd is width-independent (pitfall 3)
            assert par.lr_factor(spec) * par.wd_factor(spec) == pytest.approx(1.0)
    for path in ("blocks/attn_norm", "blocks/mlp_norm", "final_norm"):
        assert par.wd_factor(specs[path][0]) == 0.0
    assert par.wd_factor(specs["embed"][0]) == 1.0


def test_options_zero_init_multipliers_and_attention_exponent():
    cfg = scaled(
        "mup",
        width=256,
        parameterization__zero_init_readout=True,
        parameterization__zero_init_query=True,
        parameterization__input_mult=3.0,
        parameterization__output_mult=8.0,
        parameterization__attn_mult=2.0,
        parameterization__attn_exponent=0.5,
    )
    par, specs = table(cfg)
    assert par.init_std(specs["unembed"][0]) == 0.0
    assert par.init_std(specs["blocks/wq"][0]) == 0.0
    assert par.init_std(specs["blocks/wk"][0]) == pytest.approx(0.02 / 2)
    assert par.multipliers()["input"] == 3.0
    assert par.output_mult == pytest.approx(8.0 / 4)
    assert par.attn_scale == pytest.approx(2.0 / math.sqrt(64))  # exponent 1/2: SP's 1/sqrt(d)


def test_tied_embeddings_keep_the_embedding_init_and_put_1_over_m_in_the_output():
    par, specs = table(scaled("mup", width=256, model__tie_embeddings=True))
    assert "unembed" not in specs
    assert par.init_std(specs["embed"][0]) == 0.02 and par.lr_factor(specs["embed"][0]) == 1.0
    assert par.output_mult == pytest.approx(1 / 4)


def test_model_init_uses_the_table():
    cfg = scaled("mup", width=256)
    params = transformer.ModelDef(cfg).init(0)
    std_q = float(np.std(np.asarray(params["blocks"]["wq"])))
    std_down = float(np.std(np.asarray(params["blocks"]["w_down"])))
    assert std_q == pytest.approx(0.02 / 2, rel=0.05)
    assert std_down == pytest.approx(0.02 / 2, rel=0.05)
    assert float(np.std(np.asarray(params["embed"]))) == pytest.approx(0.02, rel=0.05)


def test_optimizer_applies_the_lr_factors():
    """Adam's first update is lr * factor * sign(g): measure it per parameter."""
    import jax

    cfg = scaled("mup", width=128, schedule__name="constant", schedule__warmup_steps=0, optimizer__grad_clip=0.0)
    model = transformer.ModelDef(cfg)
    params = model.init(0)
    tx = optim.make_optimizer(cfg, model.spec_tree())
    grads = jax.tree.map(lambda p: np.ones_like(p), params)
    updates, _ = tx.update(grads, tx.init(params), params)
    lr = cfg.optimizer.lr
    assert float(np.abs(np.asarray(updates["blocks"]["wq"])).max()) == pytest.approx(lr / 2, rel=1e-4)
    assert float(np.abs(np.asarray(updates["embed"])).max()) == pytest.approx(lr, rel=1e-4)


def test_scale_shapes_scales_every_width_dimension():
    base = base_cfg()
    o = parameterization.scale_shapes(base, width=256)
    assert (o["model.width"], o["model.ffn_size"], o["model.head_dim"], o["model.num_heads"]) == (256, 512, 64, 4)
    o = parameterization.scale_shapes(base, width=256, grows="heads")
    assert (o["model.num_heads"], o["model.head_dim"]) == (16, 16)
    assert o["parameterization.base_width"] == 64 and o["parameterization.base_head_dim"] == 16
    with pytest.raises(ConfigError, match="whole number"):
        parameterization.scale_shapes(base, width=70)


def test_bad_options_are_one_line_errors():
    for field, value in (
        ("parameterization.name", "mupp"),
        ("parameterization.eps_depth_scope", "some"),
        ("parameterization.width_grows", "ffn"),
        ("parameterization.depth_alpha", "3.0"),
    ):
        c = config_lib.defaults()
        config_lib.override(c, field, value)
        with pytest.raises(ConfigError) as e:
            config_lib.resolve(c)
        assert field.split(".")[-1] in str(e.value) and "\n" not in str(e.value)


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "maxscale.parameterization", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
        timeout=120,
    )


def test_cli_prints_the_table():
    out = _cli(
        "--config=configs/tiny.py",
        "--config.parameterization.name=completep",
        "--config.parameterization.base_width=32",
        "--config.parameterization.base_depth=1",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    t = json.loads(out.stdout)
    assert t["multipliers"]["residual"] == 0.5 and t["multipliers"]["output"] == 0.5
    row = {r["path"]: r for r in t["params"]}["blocks/wq"]
    assert set(row) >= {"path", "shape", "role", "init_std", "lr", "wd", "eps"}
    assert row["lr"] == 0.5 and row["eps"] == 0.25 and row["shape"] == [2, 64, 4, 16]
    bad = _cli("--config=configs/tiny.py", "--config.parameterization.nme=mup")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "did you mean" in bad.stderr


def test_base_width_alone_describes_one_base_model_for_every_width():
    """The documented usage (--config.parameterization.base_width=64 --config.model.width=W): the other base sizes
    follow base_width / width as the model's own do, so runs at different widths share one base (no half-muP)."""
    bases = []
    for width in (128, 256):
        cfg, _ = config_lib.parse_argv(
            [
                f"--config={REPO / 'configs' / 'tiny.py'}",
                "--config.parameterization.name=mup",
                "--config.parameterization.base_width=64",
                f"--config.model.width={width}",
                f"--config.model.ffn_size={2 * width}",
            ],
            extra_flags=(),
        )
        p = config_lib.resolve(cfg).parameterization
        bases.append({k: p[k] for k in ("base_width", "base_num_heads", "base_head_dim", "base_ffn_size")})
    assert bases[0] == bases[1] == {"base_width": 64, "base_num_heads": 4, "base_head_dim": 16, "base_ffn_size": 128}
    with pytest.raises(ConfigError, match="not a whole number; set parameterization.base_head_dim explicitly"):
        cfg, _ = config_lib.parse_argv(
            [f"--config={REPO / 'configs' / 'tiny.py'}", "--config.parameterization.base_width=50"],
            extra_flags=(),
        )
        config_lib.resolve(cfg)
