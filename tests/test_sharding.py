"""On 8 simulated CPU devices, data / fsdp / tensor meshes give the same losses as one device, with parameters,
optimizer state and activations sharded as the rules say; hybrid (DCN x ICI) meshes lay devices out as documented."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import one_device_mesh, tiny_config
from conftest import train_losses as losses
from jax.experimental import mesh_utils
from jax.sharding import PartitionSpec as P

from maxscale.errors import ConfigError
from maxscale.parallel import sharding
from maxscale.train import step as step_lib

# ffn 192 (not 2 x width) so a hidden activation's shape cannot be mistaken for a residual-stream one in the HLO
FFN = 192


@pytest.fixture(scope="module")
def reference(tiny_corpus):
    cfg = tiny_config(**{"model.ffn_size": FFN})
    return losses(cfg, one_device_mesh(cfg), tiny_corpus)[0]


def expected_specs(fsdp: int, tensor: int) -> dict[str, P]:
    """The rules written out: embed dims over fsdp; heads, MLP hidden units and vocab over tensor."""
    f = "fsdp" if fsdp > 1 else None
    t = "tensor" if tensor > 1 else None
    return {
        "blocks/wq": P(None, f, t, None),
        "blocks/wk": P(None, f, t, None),
        "blocks/wv": P(None, f, t, None),
        "blocks/wo": P(None, t, None, f),
        "blocks/w_up": P(None, f, t),
        "blocks/w_gate": P(None, f, t),
        "blocks/w_down": P(None, t, f),
        "blocks/attn_norm": P(None, f),
        "embed": P(t, f),
        "unembed": P(f, t),
        "final_norm": P(f),
    }


def leaf(tree, path):
    for k in path.split("/"):
        tree = tree[k]
    return tree


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_mesh_matches_one_device_with_the_rules_shardings(shape, reference, tiny_corpus):
    n_data, fsdp, tensor = shape
    cfg = tiny_config(**{"mesh.data": n_data, "mesh.fsdp": fsdp, "mesh.tensor": tensor, "model.ffn_size": FFN})
    got, setup, state = losses(cfg, sharding.make_mesh(cfg), tiny_corpus)
    np.testing.assert_allclose(got, reference, rtol=1e-4)

    m = cfg.model
    L, D, H, K, F, V = m.depth, m.width, m.num_heads, m.head_dim, m.ffn_size, m.vocab_size
    for path, spec in expected_specs(fsdp, tensor).items():
        assert leaf(state["params"], path).sharding.spec == spec, path
    # what one device holds: heads and MLP hidden units split over tensor, the embed dim over fsdp
    local = {
        p: leaf(state["params"], p).addressable_shards[0].data.shape
        for p in ("blocks/wq", "blocks/wo", "blocks/w_up", "blocks/w_down", "embed")
    }
    assert local == {
        "blocks/wq": (L, D // fsdp, H // tensor, K),
        "blocks/wo": (L, H // tensor, K, D // fsdp),
        "blocks/w_up": (L, D // fsdp, F // tensor),
        "blocks/w_down": (L, F // tensor, D // fsdp),
        "embed": (V // tensor, D // fsdp),
    }
    # Adam's moments take their parameter's sharding
    mu = [x for x in jax.tree.leaves(state["opt_state"]) if x.shape == (L, D, F)]
    assert mu and all(x.sharding.spec == expected_specs(fsdp, tensor)["blocks/w_up"] for x in mu)


def test_tensor_parallel_activations_hold_a_share_of_heads_and_hidden_units():
    """The compiled step of a (2, 2, 2) mesh computes on [B/4, T, H/2, K] queries and [B/4, T, F/2] MLP hidden
    activations, and never on the full heads or hidden units of its rows."""
    cfg = tiny_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2, "model.ffn_size": FFN})
    setup = step_lib.Setup.build(cfg, sharding.make_mesh(cfg))
    batch = jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.data.seq_len + 1), jnp.int32, sharding=setup.batch_sharding)
    hlo = setup.train_step.lower(setup.abstract_state(), batch).compile().as_text()
    B, T, H, K = cfg.train.batch_size // 4, cfg.data.seq_len, cfg.model.num_heads, cfg.model.head_dim
    assert f"f32[{B},{T},{H // 2},{K}]" in hlo and f"f32[{B},{T},{FFN // 2}]" in hlo
    assert f"f32[{B},{T},{H},{K}]" not in hlo and f"f32[{B},{T},{FFN}]" not in hlo


def test_logical_rules_drop_size_one_axes():
    cfg = tiny_config(**{"mesh.data": 8})
    mesh = sharding.make_mesh(cfg)
    assert sharding.logical_to_spec(("embed", "mlp"), mesh) == P(None, None)
    assert sharding.logical_to_spec(("batch", None), mesh) == P("data", None)


# -- hybrid meshes: each axis is dcn (outer, across slices) x ici (inner, within a slice) --------------------------


def ids(mesh_or_grid):
    grid = mesh_or_grid.devices if hasattr(mesh_or_grid, "devices") else mesh_or_grid
    return np.vectorize(lambda d: d.id)(grid)


def test_hybrid_mesh_puts_the_slice_outermost_on_each_axis():
    devices = jax.devices()  # 8 simulated CPU devices: no slices, so groups of 4 consecutive devices stand in
    cfg = tiny_config(**{"mesh.data": 4, "mesh.fsdp": 2, "mesh.dcn_data": 2})
    grid = ids(sharding.make_mesh(cfg, devices))[:, :, 0, 0]
    # data index i: slice i // 2, row i % 2 inside it; each slice is a 2 x 2 (data x fsdp) block
    assert grid.tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    cfg = tiny_config(**{"mesh.data": 2, "mesh.fsdp": 4, "mesh.dcn_fsdp": 2})
    grid = ids(sharding.make_mesh(cfg, devices))[:, :, 0, 0]
    # fsdp index j: slice j // 2; so fsdp neighbours 0,1 share a slice and 1,2 do not
    assert grid.tolist() == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert sharding.make_mesh(cfg, devices).shape == {"data": 2, "fsdp": 4, "tensor": 1, "expert": 1}


@dataclasses.dataclass(frozen=True)
class FakeDevice:
    id: int
    slice_index: int
    process_index: int = 0
    platform: str = "cpu"
    device_kind: str = "cpu"


@pytest.mark.parametrize(
    "sizes, dcn", [((4, 2, 1, 1), (2, 1, 1, 1)), ((2, 4, 1, 1), (1, 2, 1, 1)), ((2, 2, 2, 2), (1, 2, 1, 2))]
)
def test_grouped_fallback_equals_jax_hybrid_mesh_on_real_slices(sizes, dcn):
    n, per_slice = int(np.prod(sizes)), int(np.prod(sizes) // np.prod(dcn))
    on_slices = [FakeDevice(i, slice_index=i // per_slice) for i in range(n)]
    one_slice = [FakeDevice(i, slice_index=0) for i in range(n)]  # what multi-process CPU/GPU devices report
    ici = tuple(s // d for s, d in zip(sizes, dcn))
    expected = ids(mesh_utils.create_hybrid_device_mesh(ici, dcn, on_slices))
    size_of, dcn_of = dict(zip(sharding.MESH_AXES, sizes)), dict(zip(sharding.MESH_AXES, dcn))
    assert (ids(sharding.device_grid(size_of, dcn_of, on_slices)) == expected).all()
    assert (ids(sharding.device_grid(size_of, dcn_of, one_slice)) == expected).all()


def test_hybrid_mesh_errors_are_one_line():
    with pytest.raises(ConfigError, match="mesh.dcn_fsdp=3 does not divide mesh.fsdp=4"):
        tiny_config(**{"mesh.data": 2, "mesh.fsdp": 4, "mesh.dcn_fsdp": 3})
    cfg = tiny_config(**{"mesh.data": -1, "mesh.dcn_data": 3})  # -1 resolves to 8, which 3 does not divide
    with pytest.raises(ConfigError, match="mesh.dcn_data=3 does not divide mesh.data=8"):
        sharding.make_mesh(cfg)
    devices = [FakeDevice(i, slice_index=i // 2) for i in range(8)]  # 4 slices, but dcn asks for 2
    with pytest.raises(ConfigError, match="number of slices"):
        sharding.device_grid(
            {"data": 8, "fsdp": 1, "tensor": 1, "expert": 1}, {"data": 2, "fsdp": 1, "tensor": 1, "expert": 1}, devices
        )


def test_docs_rules_table_is_the_rules_dict():
    """docs/sharding.md shows sharding.RULES; this keeps the two from drifting apart."""
    import os
    import re

    text = open(os.path.join(os.path.dirname(__file__), "..", "docs", "sharding.md")).read()
    table = text.split("## The rules table")[1].split("\n\n")[2]
    documented = {}
    for row in table.splitlines()[2:]:
        name, mesh_axes = (re.findall(r"`(\w+)`", cell) for cell in row.split("|")[1:3])
        documented[name[0]] = None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else tuple(mesh_axes)
    assert documented == sharding.RULES
