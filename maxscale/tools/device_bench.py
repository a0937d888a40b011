#!/usr/bin/env python3
"""Device benchmark: the train step of a ~1.3B dense model and a ~1.6B-total / ~0.5B-active MoE model on this
machine's accelerators, set up for speed: bfloat16 compute with float32 master weights and optimizer state, cuDNN
flash attention, the readout and loss in chunks, and the lightest remat policy that fits. Prints one line per model
and writes JSON: tokens/s, MFU against the bf16 peak (989 TFLOP/s dense for H100/H200 SXM), device memory.

    tools/device_bench.sh [args]     # picks a Python with CUDA JAX (or makes .venv-gpu), then runs this command
    maxscale device-bench [--models=dense,moe] [--steps=10] [--batch_per_device=4] [--seq_len=4096]
        [--remat=none,save_attn_out,dots_no_batch,full] [--attention=cudnn] [--loss_chunk=4096]
        [--moe_dispatch=capacity] [--check_attention]
        [--peak_tflops=989] [--out=runs/device_bench.json] [--config.<section>.<field>=<value> ...]

Measured on one H200 (docs/performance.md): each model took 25-40 s in all (JAX start-up, compile, autotuning, 11
steps); a policy that runs out of memory costs one more compile (the next policy in --remat is tried). The whole
default run ends in about 2 minutes. `mfu` counts attention as PaLM does (the full T x T, as the trainer logs
it); `mfu_causal` counts only the causal half, as MaxText reports. XLA's GPU flags (maxscale/launch/common.py)
are set unless XLA_FLAGS already holds them; XLA_PYTHON_CLIENT_MEM_FRACTION defaults to 0.92 here.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time

from maxscale import cli
from maxscale.launch import common as launch_common  # imports no JAX: the XLA flags set in main still apply

MODELS = ("dense", "moe")
REMAT_ORDER = "none,save_attn_out,dots_no_batch,full"  # fastest first; the first that fits is kept


def parse_args(argv) -> argparse.Namespace:
    """The flags; `--config.<section>.<field>=<value>` overrides go to every model's config (`overrides`)."""
    ap = cli.Parser("device_bench", __doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated: dense, moe")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per model (after the compile step)")
    ap.add_argument("--batch_per_device", type=int, default=4, help="sequences per device per step")
    ap.add_argument("--seq_len", type=int, default=4096)
    ap.add_argument("--remat", default=REMAT_ORDER, help="policies to try in order; the first that fits is kept")
    ap.add_argument("--attention", default="cudnn", help="model.attention_impl (auto, cudnn, chunked, xla, ...)")
    ap.add_argument("--loss_chunk", type=int, default=4096, help="model.loss_chunk_size (positions; 0 = off)")
    ap.add_argument(
        "--moe_dispatch", default="capacity", help="model.moe.dispatch of the MoE model (capacity, dropless, dense)"
    )
    ap.add_argument("--peak_tflops", type=float, default=0.0, help="per-device bf16 peak; 0 = the device table")
    ap.add_argument("--out", default="runs/device_bench.json")
    ap.add_argument("--check_attention", action="store_true", help="first compare the attention kernels' numbers")
    args, rest = ap.parse_known_args(argv)  # the overrides apply to each model's config, set up below
    for a in rest:
        if not (a.startswith("--config.") and "=" in a):
            ap.error(ap.unknown(a))
    args.overrides = [a[len("--config.") :].split("=", 1) for a in rest]
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not args.models or any(m not in MODELS for m in args.models):
        ap.error(f"--models={','.join(args.models)}: choose from {', '.join(MODELS)}")
    args.remat = [r.strip() for r in args.remat.split(",") if r.strip()]
    if args.steps < 1 or args.batch_per_device < 1:
        ap.error("--steps and --batch_per_device must be >= 1")
    return args


def model_config(name: str, args: argparse.Namespace, num_devices: int = 1):
    """The unresolved config of model `name` ('dense' or 'moe') for `args` on `num_devices` devices."""
    from maxscale import config as config_lib

    c = config_lib.defaults()
    # Llama-3.2-1B's shape (16 blocks of width 2048, SwiGLU 8192, a 128k vocabulary, tied embeddings), with 16 query
    # and 8 key/value heads of 128 (cuDNN's best head dim): 1.27B parameters
    c.model.update(width=2048, depth=16, num_heads=16, num_kv_heads=8, ffn_size=8192, vocab_size=128256)
    c.model.update(tie_embeddings=True, dtype="bfloat16", param_dtype="float32", attention_impl=args.attention)
    c.model.update(loss_chunk_size=args.loss_chunk, remat=args.remat[0] if args.remat else "none")
    if name == "moe":  # 32 experts, 4 active + 1 shared, after one dense block: ~1.6B total, ~0.5B active
        c.model.update(width=1536, depth=12, num_heads=12, num_kv_heads=4, ffn_size=4096)
        c.model.moe.update(
            num_experts=32, num_active=4, expert_ffn_size=768, num_shared=1, shared_ffn_size=1536, first_dense=1
        )
        # capacity: on one H200 (jax 0.11.2) dropless's jax.lax.ragged_dot ran 5.2x slower (docs/performance.md)
        c.model.moe.dispatch = args.moe_dispatch
    c.data.seq_len = args.seq_len  # random tokens: the bench reads no corpus
    c.train.update(batch_size=args.batch_per_device * num_devices, peak_flops=args.peak_tflops * 1e12)
    for key, value in args.overrides:
        config_lib.override(c, key, value)
    return c


def _out_of_memory(e: BaseException) -> bool:
    text = f"{type(e).__name__}: {e}"
    return any(s in text for s in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "OOM"))


def bench_model(name: str, args: argparse.Namespace) -> dict:
    """The first policy of --remat that fits: its bench.run result, MFU with causal attention, what was tried."""
    import jax

    from maxscale import config as config_lib
    from maxscale.model import transformer
    from maxscale.tools import bench

    tried = []
    for policy in args.remat or ["none"]:
        cfg = model_config(name, args, jax.device_count())
        cfg.model.remat = policy
        cfg = config_lib.resolve(cfg)
        t0 = time.perf_counter()
        try:
            result = bench.run(cfg, steps=args.steps, reference=False)
        except Exception as e:  # noqa: BLE001 - out of memory: try the next policy; anything else is reported
            tried.append({"remat": policy, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"})
            jax.clear_caches()
            gc.collect()
            if _out_of_memory(e):
                continue
            break
        m = cfg.model
        attention_flops = 12.0 * m.depth * cfg.data.seq_len * m.num_heads * m.head_dim
        causal_flops = transformer.flops_per_token(cfg) - attention_flops / 2
        peak_total = result["peak_flops_per_device"] * result["config"]["devices"]
        result.update(
            model=name,
            remat_tried=tried + [{"remat": policy, "seconds": round(time.perf_counter() - t0, 1)}],
            mfu_causal=round(result["tokens_per_s"] * causal_flops / peak_total, 4),
        )
        return result
    return {"model": name, "remat_tried": tried, "error": "no policy in --remat ran; see remat_tried"}


def measured_matmul_tflops(n: int = 8192, repeats: int = 10) -> float:
    """bf16 TFLOP/s of one n x n x n matmul on random data (zeros run faster and would flatter the ceiling), the
    median of `repeats` after a warm-up: the ceiling this device really reaches, beside the datasheet's."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.bfloat16)
    b = jax.random.normal(kb, (n, n), jnp.bfloat16)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / float(np.median(times)) / 1e12


def check_attention(B: int = 2, T: int = 2048, H: int = 16, G: int = 8, K: int = 128) -> dict:
    """Each attention kernel this backend has, on bfloat16 operands, against the XLA path on the same operands in
    float32: ||x - ref|| / ||ref|| of the output and of dq, dk, dv (causal, GQA). bf16 operands land near 1e-2;
    a wrong kernel lands near 1."""
    import jax
    import jax.numpy as jnp

    from maxscale.model import kernels

    kq, kk, kv, kg = jax.random.split(jax.random.key(1), 4)
    q = jax.random.normal(kq, (B, T, H, K), jnp.float32)
    k = jax.random.normal(kk, (B, T, G, K), jnp.float32)
    v = jax.random.normal(kv, (B, T, G, K), jnp.float32)
    g = jax.random.normal(kg, (B, T, H, K), jnp.float32)
    scale = K**-0.5

    def out_and_grads(fn, dtype):
        args = [x.astype(dtype) for x in (q, k, v)]
        out, vjp = jax.vjp(lambda *a: fn(*a, scale), *args)
        return [x.astype(jnp.float32) for x in (out, *vjp(g.astype(dtype)))]

    ref = jax.jit(lambda: out_and_grads(kernels.xla_attention, jnp.float32))()
    impls = {"xla": kernels.xla_attention, "chunked": kernels.chunked_attention}
    if jax.devices()[0].platform == "gpu":
        impls["cudnn"] = kernels.cudnn_attention
    result = {}
    for name, fn in impls.items():
        try:
            got = jax.jit(lambda fn=fn: out_and_grads(fn, jnp.bfloat16))()
            errs = [float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) for a, b in zip(got, ref)]
            result[name] = dict(zip(("out", "dq", "dk", "dv"), (round(e, 5) for e in errs)))
        except Exception as e:  # noqa: BLE001 - reported, the benchmark goes on
            result[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    return result


def summary(result: dict) -> str:
    if "error" in result:
        return f"{result['model']}: failed ({result['remat_tried'][-1]['error'] if result['remat_tried'] else ''})"
    mem = result.get("device_memory", {})
    return (
        f"{result['model']}: {result['params']['total'] / 1e9:.2f}B params ({result['params']['active'] / 1e9:.2f}B "
        f"active), remat {result['config']['remat']}, {result['tokens_per_s']:,.0f} tokens/s, MFU "
        f"{100 * result['mfu']:.1f}% ({100 * result['mfu_causal']:.1f}% causal) of "
        f"{result['peak_flops_per_device'] / 1e12:.0f} TFLOP/s x {result['config']['devices']}, peak memory "
        f"{mem.get('peak_gib', '?')} of {mem.get('limit_gib', '?')} GiB, compile {result['compile_s']:.0f} s"
    )


@cli.command("device_bench")
def main(argv: list[str]) -> int:
    args = parse_args(argv)
    for key, value in launch_common.xla_env("gpu").items():  # before JAX starts; the user's flags come last
        os.environ[key] = value
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
    import jax

    out = {"devices": [d.device_kind for d in jax.devices()], "jax": jax.__version__, "models": {}}
    print(f"device_bench: {len(jax.devices())} x {out['devices'][0]}, jax {jax.__version__}", flush=True)
    if jax.devices()[0].platform == "gpu":
        out["measured_matmul_tflops"] = round(measured_matmul_tflops(), 1)
        print(f"bf16 8192^3 matmul, random data: {out['measured_matmul_tflops']} TFLOP/s", flush=True)
    if args.check_attention:
        out["attention_check"] = check_attention()
        print(f"attention vs float32 XLA (relative error, bf16 operands): {out['attention_check']}", flush=True)
    for name in args.models:
        out["models"][name] = result = bench_model(name, args)
        if "measured_matmul_tflops" in out and "error" not in result:  # MFU against the ceiling measured here
            ratio = result["peak_flops_per_device"] / (out["measured_matmul_tflops"] * 1e12)
            result["mfu_of_measured_matmul"] = round(result["mfu"] * ratio, 4)
        print(summary(result), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {args.out}")
    return 0 if all("error" not in r for r in out["models"].values()) else 1


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
