"""Test setup: 8 simulated CPU devices (set before jax is imported) and shared tiny configs."""

import os
import sys

# XLA compiles are most of the suite's CPU time, so the suite compiles at XLA's backend (LLVM) optimization level 0:
# the same HLO programs, so the same semantics; machine code made with fewer LLVM passes, in about 40% less
# CPU than the default (2). A level in the user's XLA_FLAGS wins over ours:
# XLA_FLAGS=--xla_backend_optimization_level=2 make test compiles as users' runs do. tests/test_compile_flags.py
# checks that a run's numbers do not move. (XLA's classic fusion emitters, --xla_cpu_use_fusion_emitters=false, would
# halve the compile time again, but they round some sums differently in different programs, and the suite asserts
# bit-equal losses across programs: with and without dyn metrics, nan_policy stop and skip. Only test_composition.py,
# which compares a run only with itself, adds them for its children.)
TEST_XLA_FLAGS = ["--xla_backend_optimization_level=0"]


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for this test process or a test's child with `devices` simulated CPU devices: the user's flags, the
    suite's compile flags (unless the user set them) and the device count. Every process of a test compiles alike, so
    a child's numbers compare bit for bit with this process's."""
    return " ".join(_BASE_XLA_FLAGS + [f"--xla_force_host_platform_device_count={devices}"])


_USER = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
_BASE_XLA_FLAGS = _USER + [f for f in TEST_XLA_FLAGS if f.split("=")[0] not in {u.split("=")[0] for u in _USER}]
os.environ["XLA_FLAGS"] = xla_flags(8)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import pytest  # noqa: E402
from jax.experimental.compilation_cache import compilation_cache as jax_cache  # noqa: E402

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


CACHE_ENV = {  # every program compiled for longer than 0.1 s is stored; a size bound turns on jax's file lock
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.1",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    "JAX_COMPILATION_CACHE_MAX_SIZE": str(8 << 30),
}


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """One persistent compilation cache for the whole run: this process, the other xdist worker and every child
    process (they inherit the environment). The same program (a tiny train step that many tests build, a killed
    child's restart) compiles once per run. It lives in pytest's temporary root of this run, which pytest removes
    after 3 newer runs; JAX_COMPILATION_CACHE_DIR set by the user (e.g. to keep it across runs) is kept as it is.
    Compile times and XLA's compile log are measured with the cache off (compile_check.uncached_compile)."""
    root = tmp_path_factory.getbasetemp()
    root = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root  # the run's root: shared by the workers
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(root / "jax_cache"))
    for key, value in CACHE_ENV.items():
        os.environ.setdefault(key, value)
    env = os.environ
    jax.config.update("jax_compilation_cache_dir", env["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update(
        "jax_persistent_cache_min_compile_time_secs", float(env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"])
    )
    jax.config.update(
        "jax_persistent_cache_min_entry_size_bytes", int(env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"])
    )
    jax.config.update("jax_compilation_cache_max_size", int(env["JAX_COMPILATION_CACHE_MAX_SIZE"]))
    jax_cache.reset_cache()  # a test module's import may have compiled (and settled "no cache") already
    return os.environ["JAX_COMPILATION_CACHE_DIR"]


@pytest.fixture(scope="session")
def child_env(compilation_cache):
    """The environment of a test's `python -m maxscale.train` children: one CPU device, this checkout importable,
    and the run's compilation cache (a restarted child loads its compiled step)."""
    return {**os.environ, "XLA_FLAGS": xla_flags(1), "PYTHONPATH": ROOT}


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
