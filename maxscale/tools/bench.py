"""Benchmark of the train step: compile time, step time, tokens/s, MFU, peak host memory, and the ratio to a
minimal hand-written `jax.jit` step of the same math (no Flax, no optax, no sharding machinery) timed in the same
process. The hand-written step is the yardstick for framework overhead: it should not be faster.

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

from maxscale.model import transformer
from maxscale.parallel import sharding
from maxscale.train import checkpoint as ckpt_lib
from maxscale.train import metrics
from maxscale.train import step as step_lib


def _time_steps(step, state, batch, steps: int) -> tuple[float, float, object]:
    """(compile+first-step seconds, median seconds per step, final state)."""
    t0 = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m)
    first = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    return first, float(np.median(times)), state


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


def run(cfg: ml_collections.ConfigDict, steps: int = 10, compare_dense: bool = False, reference: bool = True) -> dict:
    """Times the framework's train step; beside it, the hand-written step of the same math where one exists and
    `reference` (`ratio_to_reference`), and with `compare_dense` for an MoE model the dense model of the same active
    parameters (`ratio_to_dense`), each in this process on the same batch. On accelerators, also the peak device
    memory the step needed (`device_memory`)."""
    mesh = sharding.make_mesh(cfg)
    setup = step_lib.Setup.build(cfg, mesh)
    B, T = cfg.train.batch_size, cfg.data.seq_len
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.model.vocab_size, (B, T + 1)).astype(np.int32)

    state = setup.init_state()
    compile_s, step_s, state = _time_steps(setup.train_step, state, setup.global_batch(tokens), steps)
    params = jax.device_get(state["params"]) if reference and has_reference(cfg) else None  # 5 GB at 1.3B: only if used
    del state

    peak, peak_src = metrics.device_peak_flops(cfg.train.peak_flops)
    flops_tok = transformer.flops_per_token(cfg)
    tok_s = B * T / step_s
    out = {
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
                {
                    "experts": cfg.model.moe.num_experts,
                    "active": cfg.model.moe.num_active,
                    "dispatch": cfg.model.moe.dispatch,
                }
                if cfg.model.moe.num_experts
                else {}
            ),
        },
        "params": transformer.count_params(cfg),
        "compile_s": round(compile_s, 3),
        "step_s": round(step_s, 5),
        "tokens_per_s": round(tok_s, 1),
        "model_flops_per_token": flops_tok,
        "peak_flops_per_device": peak,
        "peak_source": peak_src,
        "mfu": round(tok_s * flops_tok / (peak * mesh.size), 4),
    }
    memory = device_memory()
    if memory:
        out["device_memory"] = memory
    if reference and has_reference(cfg):
        ref = _reference_step(cfg)
        ref_state = (params, jax.tree.map(jnp.zeros_like, params), jax.tree.map(jnp.zeros_like, params), 0.0)
        ref_compile_s, ref_step_s, _ = _time_steps(ref, ref_state, jnp.asarray(tokens), steps)
        out.update(
            reference_compile_s=round(ref_compile_s, 3),
            reference_step_s=round(ref_step_s, 5),
            reference_tokens_per_s=round(B * T / ref_step_s, 1),
            ratio_to_reference=round(ref_step_s / step_s, 3),
        )
    if compare_dense and cfg.model.moe.num_experts:
        dense = dense_equivalent(cfg)
        dense_setup = step_lib.Setup.build(dense, mesh)
        _, dense_step_s, _ = _time_steps(
            dense_setup.train_step, dense_setup.init_state(), dense_setup.global_batch(tokens), steps
        )
        out.update(
            dense_ffn_size=dense.model.ffn_size,
            dense_step_s=round(dense_step_s, 5),
            dense_tokens_per_s=round(B * T / dense_step_s, 1),
            ratio_to_dense=round(dense_step_s / step_s, 3),
        )
    out["peak_host_memory_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


def device_memory() -> dict:
    """Peak and capacity of the first device's memory in GiB, where the backend reports them (GPU, TPU)."""
    stats = jax.devices()[0].memory_stats() if jax.devices()[0].platform != "cpu" else None
    if not stats:
        return {}
    gib = lambda key: round(stats.get(key, 0) / 2**30, 2)  # noqa: E731
    return {"peak_gib": gib("peak_bytes_in_use"), "in_use_gib": gib("bytes_in_use"), "limit_gib": gib("bytes_limit")}


def compile_seconds(cfg: ml_collections.ConfigDict) -> float:
    """Seconds to lower and compile the train step for `cfg` (no arrays allocated)."""
    setup = step_lib.Setup.build(cfg, sharding.make_mesh(cfg))
    state = setup.abstract_state()
    batch = jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.data.seq_len + 1), jnp.int32, sharding=setup.batch_sharding)
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
