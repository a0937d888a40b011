"""Test setup: 8 simulated CPU devices (set before jax is imported) and shared tiny configs."""

import os
import sys

os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    + ["--xla_force_host_platform_device_count=8"]
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import pytest  # noqa: E402

from maxscale import config as config_lib  # noqa: E402


def tiny_config(**overrides):
    """configs/tiny.py with dotted overrides, e.g. tiny_config(**{"model.width": 32})."""
    cfg = config_lib.load(os.path.join(ROOT, "configs", "tiny.py"))
    cfg.data.max_bytes = 400_000
    cfg.mesh.update(data=1, fsdp=1, tensor=1, expert=1)
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config_lib.resolve(cfg)


def one_device_mesh(cfg):
    from maxscale.parallel import sharding

    return sharding.make_mesh(cfg, jax.devices()[:1])


@pytest.fixture(scope="session")
def child_env(tmp_path_factory):
    """The environment of a test's `python -m maxscale.train` children: one CPU device, this checkout importable,
    and a compilation cache shared by the session (a restarted child loads its compiled step)."""
    cache = str(tmp_path_factory.getbasetemp() / "jax_cache")
    return {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
        "JAX_COMPILATION_CACHE_DIR": cache,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        "PYTHONPATH": ROOT,
    }


@pytest.fixture(scope="session")
def tiny_corpus():
    from maxscale.train import data

    return data.load_corpus(tiny_config())


def train_losses(cfg, mesh, corpus, steps=5):
    """(train/loss of the first `steps` steps, the Setup, the final state) of `cfg` on `mesh`."""
    from maxscale.train import data
    from maxscale.train import step as step_lib

    setup = step_lib.Setup.build(cfg, mesh)
    state = setup.init_state()
    it = iter(data.train_dataset(corpus, cfg))
    out = []
    for _ in range(steps):
        state, m = setup.train_step(state, setup.global_batch(next(it)["tokens"]))
        out.append(float(m["train/loss"]))
    return out, setup, state
