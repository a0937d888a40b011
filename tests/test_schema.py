"""The config schema (maxscale/defaults.py): the lists that decide run ids, resume and packing are derived from each
field's kinds and equal the hand-kept lists they replaced; run ids of finished sweeps are unchanged; the declared
choice names equal the tables that implement them; every range check refuses a bad value in config.resolve."""

import ast
import json
import os

import pytest
from conftest import ROOT

from maxscale import config as config_lib
from maxscale import defaults as schema
from maxscale import parameterization
from maxscale.configdiff import diff_fields
from maxscale.errors import ConfigError
from maxscale.model import attention, layers, moe, transformer
from maxscale.quant import formats
from maxscale.tools import sweep
from maxscale.train import loop, optim, vectorized

# The hand-kept lists as they were before the schema (loop.py, sweep.py, vectorized.py), plus the fields declared
# since with that kind (model.moe.grouped_impl: which exact grouped matmul dropless uses).
SINCE = {"model.moe.grouped_impl"}
OLD_RESUMABLE = {
    *("train.steps", "train.eval_every", "train.eval_steps", "train.log_every", "train.dyn_every"),
    *("train.sample_tokens", "train.sample_prompt", "train.peak_flops", "checkpoint", "mesh", "distributed"),
    *("model.remat", "train.nan_policy", "train.spike_factor", "train.preempt_grace_s", "train.debug_nan_at_step"),
    "metrics",
}
OLD_NOT_HASHED = {
    *("train.log_every", "train.sample_tokens", "train.sample_prompt", "train.peak_flops", "checkpoint", "mesh"),
    *("distributed", "model.remat"),
}
OLD_VECTORIZABLE = {
    *(f"optimizer.{f}" for f in ("lr", "weight_decay", "b1", "b2", "eps")),
    *(f"parameterization.{f}" for f in ("output_mult", "input_mult", "attn_mult", "init_std", "embed_init_std")),
    *("train.seed", "data.seed", "quant.weights", "quant.activations", "quant.kv"),
}


def test_derived_lists_equal_the_hand_kept_ones_and_are_the_ones_used():
    for derived, old in (
        (schema.RESUMABLE_FIELDS, OLD_RESUMABLE | SINCE),
        (schema.UNHASHED_FIELDS, OLD_NOT_HASHED | SINCE),
        (schema.PACKABLE_FIELDS, OLD_VECTORIZABLE),
    ):
        assert len(derived) == len(set(derived)) and set(derived) == old, set(derived) ^ old
    assert loop.RESUMABLE_FIELDS is schema.RESUMABLE_FIELDS
    assert sweep.NOT_HASHED is schema.UNHASHED_FIELDS
    assert vectorized.VECTORIZABLE is schema.PACKABLE_FIELDS


def known_config():
    c = config_lib.defaults()
    c.model.update(width=64, depth=2, num_heads=2, mlp="gelu", remat="full", attention_impl="xla")
    c.model.moe.update(num_experts=4, num_active=2, dispatch="capacity")
    c.parameterization.update(name="completep", base_width=32)
    c.optimizer.update(lr=1e-3, weight_decay=0.1, grad_clip=0.5)
    c.schedule.update(name="wsd", warmup_steps=10)
    c.quant.update(weights="int8")
    c.train.update(steps=100, log_every=5)
    c.mesh.update(data=1)
    return c


def test_run_ids_are_those_computed_before_the_schema():
    """Ids computed with the hand-kept NOT_HASHED and defaults (before this change): finished sweeps stay found.
    The same check over every point of the 11 loadable configs/sweeps files (685 ids) agreed when it was made."""
    assert sweep.run_id(config_lib.resolve(known_config())) == "1de6d53cc4"
    assert sweep.run_id(config_lib.resolve(config_lib.defaults())) == "f170415837"
    moved = known_config()
    moved.train.update(log_every=7, sample_tokens=0)
    moved.mesh.update(data=2, fsdp=4)
    moved.checkpoint.update(every=9)
    assert sweep.run_id(config_lib.resolve(moved)) == "1de6d53cc4"  # unhashed fields change no id


def test_declared_choices_equal_the_implementing_tables():
    c = schema.CHOICES
    assert set(c["model.remat"]) == set(transformer.REMAT_POLICIES) | {"none"}  # none: no jax.checkpoint
    assert set(c["model.attention_impl"]) == set(attention.IMPLEMENTATIONS) | {"auto"}  # auto: attention.choose
    assert set(c["model.dtype"]) == set(c["model.param_dtype"]) == set(layers.DTYPES)
    assert set(c["schedule.name"]) == set(optim.SCHEDULES)
    assert set(c["parameterization.name"]) == set(parameterization.RULES)
    assert set(c["parameterization.width_grows"]) == set(parameterization.WIDTH_GROWS)
    assert set(c["parameterization.eps_depth_scope"]) == set(parameterization.EPS_DEPTH_SCOPES)
    for kind in ("weights", "activations", "kv"):
        assert set(c[f"quant.{kind}_granularity"]) == set(formats.GRANULARITIES)
    for field, table in (("score", moe.SCORES), ("combine", moe.COMBINES), ("dispatch", moe.DISPATCH)):
        assert set(c[f"model.moe.{field}"]) == set(table)
    assert set(c["model.moe.bias_rule"]) == set(moe.BIAS_RULES)


def test_every_field_is_declared_once_with_a_doc_and_a_valid_default():
    names = [f.name for f in schema.FIELDS]
    assert len(names) == len(set(names)) == len(config_lib._all_fields(config_lib.defaults()))
    for f in schema.FIELDS:
        assert f.doc and "\n" not in f.doc, f.name
        assert f.kinds <= {schema.ID, schema.RESUME, schema.PACK}, f.name
        assert f.problem(f.default) is None, f.name
        assert not (schema.PACK in f.kinds and schema.ID not in f.kinds), f.name  # a pack member is its own run


def _bad_value(f):
    if f.choices:
        return "bogus"
    if f.check[0] == ">":
        bound = float(f.check.lstrip(">="))
        bad = bound - 1 if f.check.startswith(">=") else bound
        return bad - 0.5 if bad == f.allow else bad
    return float(f.check[1:-1].split(",")[1]) + 1  # above the interval


@pytest.mark.parametrize("field", [f for f in schema.FIELDS if f.check or f.choices], ids=lambda f: f.name)
def test_resolve_refuses_a_bad_value_of_every_checked_field_in_one_line(field):
    cfg = config_lib.defaults()
    value = _bad_value(field)
    if isinstance(field.default, int) and not isinstance(field.default, bool) and value != int(value):
        value = int(value) - 1
    config_lib.override(cfg, field.name, str(value))
    with pytest.raises(ConfigError) as e:
        config_lib.resolve(cfg)
    msg = str(e.value)
    assert msg.startswith(f"{field.name}=") and "\n" not in msg, msg


def test_a_removed_field_at_its_only_value_loads_resumes_and_keeps_its_id(tmp_path):
    """optimizer.name (validated to be adamw, never read) is gone; config.json files written with it still load,
    resume and compare equal; a config giving it another value is refused."""
    cfg = config_lib.resolve(known_config())
    old = json.loads(config_lib.to_json(cfg))
    old["optimizer"]["name"] = "adamw"
    (tmp_path / "config.json").write_text(json.dumps(old))
    loop.check_workdir(str(tmp_path), cfg)  # no "different config"
    assert (
        diff_fields(
            old, json.loads(config_lib.to_json(cfg)), defaults=json.loads(config_lib.to_json(config_lib.defaults()))
        )
        == []
    )
    again = config_lib.resolve(config_lib.from_json(json.dumps(old)))
    assert "name" not in again.optimizer and sweep.run_id(again) == "1de6d53cc4"
    old["optimizer"]["name"] = "sgd"
    with pytest.raises(ConfigError, match="optimizer.name='sgd': the field was removed"):
        config_lib.resolve(config_lib.from_json(json.dumps(old)))
    old["optimizer"]["lr"] = 5e-3
    (tmp_path / "config.json").write_text(json.dumps(old))
    with pytest.raises(ConfigError, match="optimizer.lr 0.005 -> 0.001"):  # other fields are still compared
        loop.check_workdir(str(tmp_path), cfg)


def test_the_schema_and_the_config_import_nothing_above_them():
    """errors/defaults/paths -> config -> parameterization -> ... -> model -> train: the schema imports no
    maxscale module, and neither it nor config.py imports the model (the choice names are declared, not imported)."""
    for name, allowed in (("defaults.py", set()), ("config.py", None)):
        tree = ast.parse(open(os.path.join(ROOT, "maxscale", name)).read())
        mods = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        mods |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        ours = {m for m in mods if m.startswith("maxscale")}
        assert not any(m.startswith("maxscale.model") for m in ours), (name, ours)
        if allowed is not None:
            assert ours == allowed, (name, ours)
