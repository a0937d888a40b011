"""MoE rows of the parameterization table (the paper's Table 1 as read in docs/parameterizations.md): router init
(D/D0)^-gamma and LR (D/D0)^-1; expert up like a hidden matrix; expert down LR (M/M0)^-1 and mean-field init
sigma (D/D0)^1/2 (M/M0)^-1; the experts axis never counts as fan-in; at base shapes everything equals SP."""

import os

import pytest
from conftest import ROOT

from maxscale import config as config_lib
from maxscale.tools import params_table as table

MOE_TINY = os.path.join(ROOT, "configs", "moe_tiny.py")
ROLES = ("router", "expert_in", "expert_out")


def rows(**overrides) -> dict[str, dict]:
    cfg = config_lib.load(MOE_TINY)
    for key, value in {"parameterization.name": "mup", **overrides}.items():
        config_lib.override(cfg, key, str(value))
    out = {}
    for r in table.describe(config_lib.resolve(cfg))["params"]:
        if r["role"] in ROLES:
            out.setdefault(r["role"], r)
    return out


BASE = {
    "parameterization.base_width": 64,
    "parameterization.base_num_heads": 4,
    "parameterization.base_ffn_size": 128,
    "parameterization.base_expert_ffn_size": 64,
    "parameterization.base_num_experts": 4,
    "parameterization.base_num_active": 2,
}


def test_at_base_shapes_moe_roles_equal_sp():
    mup, sp = rows(**BASE), rows(**BASE, **{"parameterization.name": "sp"})
    for role in ROLES:
        assert mup[role]["init_std"] == sp[role]["init_std"] == 0.02, role
        assert mup[role]["lr"] == sp[role]["lr"] == 1.0, role


def test_doubling_width_scales_router_and_experts_as_the_paper():
    base = rows(**BASE)
    wide = rows(**BASE, **{"model.width": 128, "model.num_heads": 8, "model.ffn_size": 256})
    ratio = {role: {k: wide[role][k] / base[role][k] for k in ("init_std", "lr")} for role in ROLES}
    assert ratio["router"] == pytest.approx({"init_std": 0.5, "lr": 0.5})  # gamma = 1
    assert ratio["expert_in"] == pytest.approx({"init_std": 2**-0.5, "lr": 0.5})
    assert ratio["expert_out"] == pytest.approx({"init_std": 2**0.5, "lr": 1.0})  # mean field, M fixed


def test_doubling_expert_size_scales_only_the_down_projection():
    base = rows(**BASE)
    big = rows(**BASE, **{"model.moe.expert_ffn_size": 128})
    for kind, expected_init in (("mean_field", 0.5), ("fan_in", 2**-0.5)):
        b = rows(**BASE, **{"parameterization.expert_down_init": kind})
        g = rows(**BASE, **{"model.moe.expert_ffn_size": 128, "parameterization.expert_down_init": kind})
        assert g["expert_out"]["init_std"] / b["expert_out"]["init_std"] == pytest.approx(expected_init), kind
    assert big["expert_out"]["lr"] / base["expert_out"]["lr"] == pytest.approx(0.5)
    assert big["expert_in"]["lr"] == base["expert_in"]["lr"] and big["router"] == base["router"]


def test_more_experts_at_fixed_k_over_e_changes_no_factor():
    base = rows(**BASE)
    more = rows(**BASE, **{"model.moe.num_experts": 8, "model.moe.num_active": 4})
    for role in ROLES:
        for key in ("init_std", "lr", "wd", "eps"):
            assert more[role][key] == pytest.approx(base[role][key]), (role, key)


@pytest.mark.parametrize("name", ["sp", "mup"])
def test_maxtext_fan_in_control_shrinks_expert_init_with_experts_only_when_asked(name):
    """E 4 -> 16 at k/E fixed: no rule depends on E, unless the control counts the experts axis as fan-in
    (MaxText's variance_scaling over (E, D, H)): then the expert init halves and nothing else moves."""
    grow = {"parameterization.name": name, "model.moe.num_experts": 16, "model.moe.num_active": 8}
    base, big = rows(**BASE, **{"parameterization.name": name}), rows(**BASE, **grow)
    ctrl = rows(**BASE, **grow, **{"parameterization.expert_init_counts_experts": True})
    for role in ROLES:
        assert big[role]["init_std"] == base[role]["init_std"] and big[role]["lr"] == base[role]["lr"], role
        factor = 0.5 if role != "router" else 1.0
        assert ctrl[role]["init_std"] == pytest.approx(factor * base[role]["init_std"]), role
        assert ctrl[role]["lr"] == base[role]["lr"], role
