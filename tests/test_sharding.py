"""On 8 simulated CPU devices, data / fsdp / tensor meshes give the same losses as one device."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import one_device_mesh, tiny_config
from maxscale import sharding, train


def losses(cfg, mesh, corpus, steps=5):
    setup = train.Setup.build(cfg, mesh)
    state = setup.init_state()
    from maxscale import data
    it = iter(data.train_dataset(corpus, cfg))
    out = []
    for _ in range(steps):
        state, m = setup.train_step(state, setup.global_batch(next(it)["tokens"]))
        out.append(float(m["train/loss"]))
    return out, setup, state


@pytest.fixture(scope="module")
def reference(tiny_corpus):
    cfg = tiny_config()
    return losses(cfg, one_device_mesh(cfg), tiny_corpus)[0]


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_mesh_matches_one_device(shape, reference, tiny_corpus):
    data, fsdp, tensor = shape
    cfg = tiny_config(**{"mesh.data": data, "mesh.fsdp": fsdp, "mesh.tensor": tensor})
    mesh = sharding.make_mesh(cfg)
    got, setup, state = losses(cfg, mesh, tiny_corpus)
    np.testing.assert_allclose(got, reference, rtol=1e-4)
    # the parameters really are sharded as the rules say
    wq = state["params"]["blocks"]["wq"]
    expect = P(None, "fsdp" if fsdp > 1 else None, "tensor" if tensor > 1 else None, None)
    assert wq.sharding.spec == expect
    if tensor > 1:
        assert state["params"]["blocks"]["w_up"].sharding.spec == P(None, "fsdp" if fsdp > 1 else None, "tensor")


def test_logical_rules_drop_size_one_axes():
    cfg = tiny_config(**{"mesh.data": 8})
    mesh = sharding.make_mesh(cfg)
    assert sharding.logical_to_spec(("embed", "mlp"), mesh) == P(None, None)
    assert sharding.logical_to_spec(("batch", None), mesh) == P("data", None)
