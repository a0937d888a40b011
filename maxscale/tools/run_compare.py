"""Run directories read and compared bit for bit: what the chaos tools (chaos.py, chaos_moments.py) and the
reliability tests check a killed and resumed run against."""

from __future__ import annotations

import math
import os

from maxscale import config as config_lib
from maxscale.train import metrics

TIMING_KEYS = ("tokens_per_s", "mfu")  # wall-clock figures: the only fields allowed to differ


def read_records(workdir: str) -> dict:
    """{(step, 'train'|'eval'): record without timing fields} of metrics.jsonl, skipping a torn last line."""
    return {
        (r["step"], "eval" if "eval/loss" in r else "train"): {k: v for k, v in r.items() if k not in TIMING_KEYS}
        for r in metrics.read_metrics(workdir)
    }


def _same(a, b) -> bool:
    if a.keys() != b.keys():
        return False
    return all(
        x == y or (isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y))
        for x, y in ((a[k], b[k]) for k in a)
    )


def compare_records(records: dict, reference: dict) -> tuple[int, list]:
    """(records compared, keys of those that differ from the reference or that it lacks)."""
    bad = [key for key, rec in records.items() if key not in reference or not _same(rec, reference[key])]
    return len(records), bad


def final_state(workdir: str) -> tuple[int, dict]:
    """(step, state as numpy arrays) of the newest checkpoint, restored onto one device."""
    import jax

    from maxscale.parallel import sharding
    from maxscale.train import checkpoint
    from maxscale.train import step as step_lib

    with open(os.path.join(workdir, "config.json")) as fh:
        cfg = config_lib.from_json(fh.read())
    cfg.mesh.update(data=1, fsdp=1, tensor=1, expert=1)
    setup = step_lib.Setup.build(cfg, sharding.make_mesh(cfg, jax.devices()[:1]))
    return checkpoint.load_state(os.path.join(workdir, "checkpoints"), setup.abstract_state())


def same_state(a: dict, b: dict) -> bool:
    import jax
    import numpy as np

    la, lb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    return len(la) == len(lb) and all(
        pa == pb and x.dtype == y.dtype and x.shape == y.shape and np.asarray(x).tobytes() == np.asarray(y).tobytes()
        for (pa, x), (pb, y) in zip(la, lb)
    )


def child_env(workdir: str, compile_cache: bool) -> dict:
    """The training subprocesses' environment: this checkout on PYTHONPATH and, with `compile_cache`, a persistent
    compilation cache (restarts load the compiled step instead of compiling it again: same program, faster)."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    if compile_cache:
        env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(workdir, "jax_cache"))
        env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
        env.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    return env
