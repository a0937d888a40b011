"""Benchmark of the train step: compile time, step time, tokens/s, MFU, peak host memory, and the ratio to a
minimal hand-written `jax.jit` step of the same math (no Flax, no optax, no sharding machinery) timed in the same
process. The hand-written step is the yardstick for framework overhead: it should not be faster. For an MoE model,
also the dense model of equal active size and the other dispatch paths. The steps compared are interleaved (A B C A
B C ...), so that a ratio does not depend on which step ran while another process on the machine was busy.

`checkpoint_blocking` times what a checkpoint save costs the training thread, with the manifest hashed on the
background thread and, for comparison, on the training thread (as before that thread existed).
"""

from __future__ import annotations

import os
import resource
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from maxscale.errors import ConfigError
from maxscale.model import transformer
from maxscale.model.moe_config import CHOICES
from maxscale.parallel import sharding
from maxscale.tools import compile_check
from maxscale.train import checkpoint as ckpt_lib
from maxscale.train import metrics
from maxscale.train import step as step_lib


def _spread(xs) -> dict:
    """Median and interquartile range of per-round figures (the spread a shared machine puts on them)."""
    q25, q50, q75 = np.percentile(np.asarray(xs, np.float64), [25, 50, 75])
    return {"median": float(q50), "iqr": [float(q25), float(q75)]}


class _Variant:
    """One train step being timed: its jitted step, its state (donated and replaced each step) and its batch."""

    def __init__(self, step, state, batch):
        self.step, self.state, self.batch = step, state, batch

    def __call__(self) -> float:
        t = time.perf_counter()
        self.state, m = self.step(self.state, self.batch)
        jax.block_until_ready(m)
        return time.perf_counter() - t


def interleave(variants: dict[str, _Variant], steps: int, rounds: int = 0) -> tuple[dict, dict]:
    """(compile+first-step seconds, per-round seconds per step) of each variant, timed round-robin: every variant
    runs one compile step, then `rounds` rounds (default `steps`) in which each variant in turn runs steps // rounds
    steps (A B C A B C ...). A load swing on a shared machine then hits every variant alike, so per-round ratios
    compare like with like; a ratio is read as the median over the rounds."""
    compile_s = {name: v() for name, v in variants.items()}
    rounds = max(1, min(rounds or steps, steps))
    per_round = max(1, steps // rounds)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, v in variants.items():
            times[name].append(sum(v() for _ in range(per_round)) / per_round)
    return compile_s, times


def _ratio(fast_s: list[float], slow_s: list[float]) -> dict:
    """slow / fast per round, i.e. tokens/s of `fast_s`'s variant over `slow_s`'s, as median and interquartile range
    (rounded)."""
    s = _spread(np.asarray(slow_s) / np.asarray(fast_s))
    return {"median": round(s["median"], 3), "iqr": [round(x, 3) for x in s["iqr"]]}


# -- the hand-written reference: the same model and AdamW, written directly in jax.numpy -------------------------


def _reference_step(cfg: ml_collections.ConfigDict):
    m, o = cfg.model, cfg.optimizer
    scale = m.head_dim**-0.5

    def rms(x, g):
        return x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + m.norm_eps) * g

    def rope(x):
        T, K = x.shape[1], x.shape[-1]
        f = m.rope_theta ** (-jnp.arange(0, K // 2) * 2 / K)
        a = jnp.arange(T)[:, None] * f[None]
        s, c = jnp.sin(a)[None, :, None], jnp.cos(a)[None, :, None]
        x1, x2 = jnp.split(x, 2, -1)
        return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)

    def layer(x, p):
        h = rms(x, p["attn_norm"])
        q = rope(jnp.einsum("btd,dhk->bthk", h, p["wq"]))
        k = rope(jnp.einsum("btd,dhk->bthk", h, p["wk"]))
        v = jnp.einsum("btd,dhk->bthk", h, p["wv"])
        a = jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True)
        x = x + jnp.einsum("bthk,hkd->btd", a, p["wo"])
        h = rms(x, p["mlp_norm"])
        x = x + (jax.nn.silu(h @ p["w_gate"]) * (h @ p["w_up"])) @ p["w_down"]
        return x, None

    def loss(params, tokens):
        x = params["embed"][tokens[:, :-1]]
        x, _ = jax.lax.scan(layer, x, params["blocks"])
        logits = rms(x, params["final_norm"]) @ params["unembed"]
        logp = jax.nn.log_softmax(logits)
        return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()

    def step(state, tokens):
        params, mu, nu, t = state
        l, g = jax.value_and_grad(loss)(params, tokens)
        norm = jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(g)))
        g = jax.tree.map(lambda x: x * jnp.minimum(1.0, o.grad_clip / (norm + 1e-6)), g)
        t = t + 1
        mu = jax.tree.map(lambda a, b: o.b1 * a + (1 - o.b1) * b, mu, g)
        nu = jax.tree.map(lambda a, b: o.b2 * a + (1 - o.b2) * b * b, nu, g)
        c1, c2 = 1 - o.b1**t, 1 - o.b2**t
        params = jax.tree.map(
            lambda p, a, b: p - o.lr * ((a / c1) / (jnp.sqrt(b / c2) + o.eps) + o.weight_decay * p), params, mu, nu
        )
        return (params, mu, nu, t), l

    return jax.jit(step, donate_argnums=0)


def has_reference(cfg: ml_collections.ConfigDict) -> bool:
    """The hand-written step covers dense swiglu + rmsnorm + full multi-head attention without quantization."""
    m = cfg.model
    return (
        m.mlp == "swiglu"
        and m.norm == "rmsnorm"
        and m.num_kv_heads == m.num_heads
        and m.moe.num_experts == 0
        and all(cfg.quant[k] == "none" for k in ("weights", "activations", "kv"))
    )


def dense_equivalent(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The dense model with the MoE model's active parameters: ffn = k x expert size + the shared experts."""
    e = cfg.model.moe
    dense = ml_collections.ConfigDict(cfg.to_dict())
    dense.model.ffn_size = e.num_active * e.expert_ffn_size + e.num_shared * e.shared_ffn_size
    dense.model.moe.num_experts = 0
    return dense


def with_dispatch(cfg: ml_collections.ConfigDict, dispatch: str) -> ml_collections.ConfigDict:
    """`cfg` with `model.moe.dispatch` = `dispatch` (ConfigError naming the field for an unknown one)."""
    if dispatch not in CHOICES["dispatch"]:
        raise ConfigError(f"--dispatches: {dispatch!r} is no model.moe.dispatch; use {', '.join(CHOICES['dispatch'])}")
    other = ml_collections.ConfigDict(cfg.to_dict())
    other.model.moe.dispatch = dispatch
    return other


def _variant(cfg: ml_collections.ConfigDict, mesh, tokens: np.ndarray) -> tuple[_Variant, step_lib.Setup]:
    setup = step_lib.Setup.build(cfg, mesh)
    return _Variant(setup.train_step, setup.init_state(), setup.global_batch(tokens)), setup


def run(
    cfg: ml_collections.ConfigDict,
    steps: int = 10,
    compare_dense: bool = False,
    reference: bool = True,
    dispatches: tuple[str, ...] = (),
    rounds: int = 0,
) -> dict:
    """Times the framework's train step; beside it, the hand-written step of the same math where one exists and
    `reference` (`ratio_to_reference`), with `compare_dense` for an MoE model the dense model of the same active
    parameters (`ratio_to_dense`), and for each of `dispatches` the same MoE model with that `model.moe.dispatch`
    (`ratio_to_<dispatch>`: this config's tokens/s over that one's; `dense_dispatch` for `dense`). All are compiled
    in this process on the same batch, held in memory together and stepped round-robin (`interleave`, `rounds`
    rounds); step times are medians over the rounds, ratios medians of the per-round ratios, each with its
    interquartile range (`*_iqr`). On accelerators, also the peak device memory the step needed (`device_memory`)."""
    others = {d: with_dispatch(cfg, d) for d in dispatches}  # a bad name fails here, before any compile
    mesh = sharding.make_mesh(cfg)
    B, T = cfg.train.batch_size, cfg.data.seq_len
    tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (B, T + 1)).astype(np.int32)
    main, setup = _variant(cfg, mesh, tokens)
    variants = {"main": main}
    if reference and has_reference(cfg):
        params = jax.device_get(main.state["params"])  # 5 GB at 1.3B: only if used
        zeros = jax.tree.map(jnp.zeros_like, params)
        variants["reference"] = _Variant(_reference_step(cfg), (params, zeros, zeros, 0.0), jnp.asarray(tokens))
    if cfg.model.moe.num_experts:
        if compare_dense:
            variants["dense"] = _variant(dense_equivalent(cfg), mesh, tokens)[0]
        for d, other in others.items():
            if d != cfg.model.moe.dispatch:  # the dense dispatch (every expert, masked) is not the dense model
                variants["dense_dispatch" if d == "dense" else d] = _variant(other, mesh, tokens)[0]
    compile_s, times = interleave(variants, steps, rounds)
    del variants, main
    out = _summary(cfg, mesh, compile_s["main"], times["main"])
    out["rounds"] = len(times["main"])
    memory = device_memory()
    if memory:
        out["device_memory"] = memory
    for name in times:
        if name != "main":
            out.update(_beside(cfg, name, compile_s[name], times[name], times["main"]))
    out["peak_host_memory_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


def _beside(cfg: ml_collections.ConfigDict, name: str, compile_s: float, times: list, main_times: list) -> dict:
    """The figures of a variant timed beside the main step: its step time and tokens/s (medians, interquartile
    range) and the main step's tokens/s over its (`ratio_to_<name>`)."""
    tokens = cfg.train.batch_size * cfg.data.seq_len
    s, r = _spread(times), _ratio(main_times, times)
    out = {
        f"{name}_compile_s": round(compile_s, 3),
        f"{name}_step_s": round(s["median"], 5),
        f"{name}_step_s_iqr": [round(x, 5) for x in s["iqr"]],
        f"{name}_tokens_per_s": round(tokens / s["median"], 1),
        f"ratio_to_{name}": r["median"],
        f"ratio_to_{name}_iqr": r["iqr"],
    }
    if name == "dense":
        out["dense_ffn_size"] = dense_equivalent(cfg).model.ffn_size
    return out


def _summary(cfg: ml_collections.ConfigDict, mesh, compile_s: float, times: list) -> dict:
    """The main step's figures: config, parameters, compile time, step time (median, interquartile range), tokens/s,
    model FLOPs per token and MFU."""
    B, T = cfg.train.batch_size, cfg.data.seq_len
    s = _spread(times)
    peak, peak_src = metrics.device_peak_flops(cfg.train.peak_flops)
    flops_tok = transformer.flops_per_token(cfg)
    tok_s = B * T / s["median"]
    moe = cfg.model.moe
    return {
        "config": {
            "width": cfg.model.width,
            "depth": cfg.model.depth,
            "heads": cfg.model.num_heads,
            "seq_len": T,
            "batch": B,
            "dtype": cfg.model.dtype,
            "attention_impl": cfg.model.attention_impl,
            "remat": cfg.model.remat,
            "loss_chunk_size": cfg.model.loss_chunk_size,
            "microbatches": cfg.train.microbatches,
            "devices": mesh.size,
            **(
                {"experts": moe.num_experts, "active": moe.num_active, "dispatch": moe.dispatch}
                if moe.num_experts
                else {}
            ),
        },
        "params": transformer.count_params(cfg),
        "compile_s": round(compile_s, 3),
        "step_s": round(s["median"], 5),
        "step_s_iqr": [round(x, 5) for x in s["iqr"]],
        "tokens_per_s": round(tok_s, 1),
        "model_flops_per_token": flops_tok,
        "peak_flops_per_device": peak,
        "peak_source": peak_src,
        "mfu": round(tok_s * flops_tok / (peak * mesh.size), 4),
    }


def device_memory() -> dict:
    """Peak and capacity of the first device's memory in GiB, where the backend reports them (GPU, TPU)."""
    stats = jax.devices()[0].memory_stats() if jax.devices()[0].platform != "cpu" else None
    if not stats:
        return {}
    gib = lambda key: round(stats.get(key, 0) / 2**30, 2)  # noqa: E731
    return {"peak_gib": gib("peak_bytes_in_use"), "in_use_gib": gib("bytes_in_use"), "limit_gib": gib("bytes_limit")}


def compile_seconds(cfg: ml_collections.ConfigDict) -> float:
    """Seconds to lower and compile the train step for `cfg` (no arrays allocated, no compilation cache)."""
    setup = step_lib.Setup.build(cfg, sharding.make_mesh(cfg))
    state = setup.abstract_state()
    batch = jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.data.seq_len + 1), jnp.int32, sharding=setup.batch_sharding)
    with compile_check.uncached_compile():
        t = time.perf_counter()
        setup.train_step.lower(state, batch).compile()
        return time.perf_counter() - t


class _Position:
    """Stands in for the data iterator: a save only asks it for its state."""

    def __init__(self):
        self.step = 0

    def get_state(self) -> dict:
        return {"next_index": self.step}


def checkpoint_blocking(
    cfg: ml_collections.ConfigDict, saves: int = 3, directory: str | None = None, poll_s: float = 0.05
) -> dict:
    """Seconds the training thread is blocked per save: in Checkpointer.save plus the loop's polls (one every
    `poll_s`, standing in for log steps) until the save is confirmed, i.e. committed, hashed and retention applied.
    `inline` hashes on the training thread (the old path), `background` on the checkpoint thread. Each save writes
    the whole train state (params and Adam moments) under `directory` (default: the system's temporary directory)."""
    setup = step_lib.Setup.build(cfg, sharding.make_mesh(cfg))
    state = jax.block_until_ready(setup.init_state())
    out = {
        "params": transformer.count_params(cfg)["total"],
        "state_gb": round(sum(x.nbytes for x in jax.tree.leaves(state)) / 1e9, 3),
        "saves": saves,
        "async_save": cfg.checkpoint.async_save,
    }
    ckpt_cfg = ml_collections.ConfigDict(cfg.to_dict())
    ckpt_cfg.checkpoint.max_to_keep = 1
    for mode in ("inline", "background"):
        root = tempfile.mkdtemp(prefix="maxscale-bench-ckpt-", dir=directory)
        ckpt = ckpt_lib.Checkpointer(os.path.join(root, "checkpoints"), ckpt_cfg, background=mode == "background")
        position, blocked, confirmed = _Position(), [], []
        try:
            for i in range(1, saves + 1):
                position.step = i
                t0 = time.perf_counter()
                ckpt.save(i, state, position, ckpt_cfg)
                held = time.perf_counter() - t0
                while ckpt.in_flight:  # the loop keeps training and polls at log steps
                    time.sleep(poll_s)
                    t = time.perf_counter()
                    ckpt.poll()
                    held += time.perf_counter() - t
                blocked.append(held)
                confirmed.append(time.perf_counter() - t0)
            t = time.perf_counter()
            ckpt.close()
            close_s = time.perf_counter() - t
        finally:
            shutil.rmtree(root, ignore_errors=True)
        out[mode] = {
            "blocked_s_per_save": [round(b, 3) for b in blocked],
            "blocked_s_median": round(float(np.median(blocked)), 3),
            "confirmed_s_median": round(float(np.median(confirmed)), 3),
            "close_s": round(close_s, 3),
        }
    return out
