"""Causal self-attention: its parameters, the projections, and THE attention-kernel entry point.

Shapes: B batch, T sequence, D width, H query heads, G key/value heads (grouped-query attention), K head dim.
`attend` is the one call of an attention kernel; implementations are chosen from `IMPLEMENTATIONS` by name
(`model.attention_impl`, `auto` resolved per backend by `choose`), each tested against the plain XLA one.
`check` refuses, in one line, the combinations a backend cannot run (before anything is compiled).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
from jax.ad_checkpoint import checkpoint_name

from maxscale.errors import ConfigError
from maxscale.model import kernels
from maxscale.model.layers import Matmul, mean_abs, norm, rope
from maxscale.parallel import sharding
from maxscale.parameterization import ParamSpec


def specs(cfg: ml_collections.ConfigDict) -> dict[str, ParamSpec]:
    """The attention parameters of one block, each with a leading `layers` axis."""
    L = ("layers",)
    out = {
        "wq": ParamSpec("hidden", L + ("embed", "heads", "head_dim"), ("embed",), "query"),
        "wk": ParamSpec("hidden", L + ("embed", "kv_heads", "head_dim"), ("embed",), "key"),
        "wv": ParamSpec("hidden", L + ("embed", "kv_heads", "head_dim"), ("embed",), "value"),
        "wo": ParamSpec("hidden", L + ("heads", "head_dim", "embed"), ("heads", "head_dim"), "attn_out"),
    }
    if cfg.model.qk_norm:
        out["q_norm"] = ParamSpec("norm", L + ("head_dim",), ())
        out["k_norm"] = ParamSpec("norm", L + ("head_dim",), ())
    return out


IMPLEMENTATIONS: dict[str, Callable] = {
    "xla": kernels.xla_attention,  # jax.nn.dot_product_attention's XLA path: [B, H, T, T] float32 logits
    "explicit": kernels.explicit_attention,  # written out; the only one taking a probabilities hook
    "chunked": kernels.chunked_attention,  # blockwise online softmax in plain JAX: O(T x chunk) memory, any backend
    "cudnn": kernels.cudnn_attention,  # fused flash attention, NVIDIA GPUs, bfloat16
    "splash": kernels.splash_attention,  # Pallas splash attention, TPUs
}


def platform_of(mesh=None) -> str:
    """'nvidia', 'gpu' (another vendor), 'tpu' or 'cpu': the backend of `mesh` (default: JAX's default devices)."""
    device = mesh.devices.flat[0] if mesh is not None else jax.devices()[0]
    if device.platform in ("gpu", "cuda"):
        kind = f"{getattr(device, 'device_kind', '')} {getattr(device.client, 'platform_version', '')}".lower()
        return "nvidia" if "nvidia" in kind or "cuda" in kind else "gpu"
    return device.platform


def choose(cfg: ml_collections.ConfigDict, platform: str) -> str:
    """The implementation `model.attention_impl` names on `platform`: `auto` is cudnn on NVIDIA GPUs (bfloat16
    compute), splash on TPUs (sequences a multiple of 128), xla otherwise."""
    m = cfg.model
    if m.attention_impl != "auto":
        return m.attention_impl
    if platform == "nvidia" and m.dtype == "bfloat16" and m.head_dim % 8 == 0 and m.head_dim <= 256:
        return "cudnn"
    if platform == "tpu" and cfg.data.seq_len % 128 == 0:
        return "splash"
    return "xla"


def check(cfg: ml_collections.ConfigDict, platform: str) -> None:
    """ConfigError (one line, naming the field and the fix) when `cfg`'s attention cannot run on `platform`."""
    m, impl = cfg.model, choose(cfg, platform)
    field = f"model.attention_impl={m.attention_impl}"
    if impl == "cudnn":
        if platform != "nvidia":
            raise ConfigError(f"{field} needs an NVIDIA GPU (this mesh is {platform}); use auto, chunked or xla")
        if m.dtype != "bfloat16":
            raise ConfigError(f"{field} needs model.dtype=bfloat16 (is {m.dtype}); set it or use attention_impl=auto")
        if m.head_dim % 8 or m.head_dim > 256:
            raise ConfigError(f"{field} needs model.head_dim a multiple of 8 up to 256 (is {m.head_dim}); use chunked")
    if impl == "splash":
        if platform != "tpu":
            raise ConfigError(f"{field} needs a TPU (this mesh is {platform}); use auto, chunked or xla")
        if cfg.data.seq_len % 128:
            raise ConfigError(f"{field} needs data.seq_len a multiple of 128 (is {cfg.data.seq_len}); use chunked")


def attend(
    q_BTHK,
    k_BTGK,
    v_BTGK,
    *,
    scale: float,
    impl: str = "xla",
    probs_hook: Callable | None = None,
    chunk: int = 512,
    mesh=None,
):
    """Causal softmax(scale q.k) v with H query heads sharing G key/value heads; returns [B, T, H, K].
    `probs_hook` transforms the attention probabilities (only kernels that form them explicitly take one);
    `chunk`: block length of the chunked kernel; `mesh`: where a kernel XLA cannot partition runs per shard."""
    kernel = IMPLEMENTATIONS[impl]
    if impl == "chunked":
        kernel = functools.partial(kernel, chunk=chunk)
    if impl == "splash":
        return _per_shard(kernel, q_BTHK, k_BTGK, v_BTGK, scale, mesh)
    return kernel(q_BTHK, k_BTGK, v_BTGK, scale, probs_hook)


def _per_shard(kernel, q_BTHK, k_BTGK, v_BTGK, scale: float, mesh):
    """Runs a kernel XLA cannot partition (Pallas) on each device's rows and heads under shard_map."""
    if mesh is None or mesh.size == 1:
        return kernel(q_BTHK, k_BTGK, v_BTGK, scale)
    q_spec = sharding.logical_to_spec(("batch", None, "heads", None), mesh, q_BTHK.shape)
    kv_spec = sharding.logical_to_spec(("batch", None, "kv_heads", None), mesh, k_BTGK.shape)
    if q_spec[2] != kv_spec[2]:  # heads split but key/value heads not: keep all heads on each device
        q_spec = kv_spec = sharding.logical_to_spec(("batch", None, None, None), mesh, q_BTHK.shape)
    body = lambda q, k, v: kernel(q, k, v, scale)  # noqa: E731
    return jax.shard_map(body, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec, check_vma=False)(
        q_BTHK, k_BTGK, v_BTGK
    )


def apply(
    p: dict,
    h_BTD,
    cfg: ml_collections.ConfigDict,
    mults: dict,
    mm: Matmul,
    ctx,
    stats: dict | None = None,
    cache: dict | None = None,
):
    """Attention branch output [B, T, D] (before the residual multiplier) for this layer's params `p`, with the
    kernel and mesh of `ctx` (context.Context). When `stats` is a dict, mean |.| of intermediate values are added
    to it (coordinate checks). `cache`: decoding with a KV cache, {"k", "v": [B, S, G, K] (this layer's keys and
    values of the positions before), "pos": where the T new positions start}; the new keys and values (quantized
    as training quantizes them) are written into it, "k" and "v" replaced by the updated arrays, as `stats` is
    filled, and the T queries attend over the S cached positions up to their own."""
    m = cfg.model
    q_BTHK = mm("btd,dhk->bthk", h_BTD, p["wq"], role="hidden", name="wq")
    k_BTGK = mm("btd,dgk->btgk", h_BTD, p["wk"], role="hidden", name="wk")
    v_BTGK = mm("btd,dgk->btgk", h_BTD, p["wv"], role="hidden", name="wv")
    if m.qk_norm:
        q_BTHK = norm(q_BTHK, p["q_norm"], None, "rmsnorm", m.norm_eps)
        k_BTGK = norm(k_BTGK, p["k_norm"], None, "rmsnorm", m.norm_eps)
    pos = 0 if cache is None else cache["pos"]
    q_BTHK, k_BTGK = rope(q_BTHK, m.rope_theta, pos), rope(k_BTGK, m.rope_theta, pos)
    # remat policies (transformer.REMAT_POLICIES) may keep these named values instead of recomputing them
    q_BTHK, k_BTGK, v_BTGK = (checkpoint_name(x, "attn_qkv") for x in (q_BTHK, k_BTGK, v_BTGK))
    impl, probs_hook = ctx.attention_impl, None
    if mm.quantizes_kv:  # P_kv: keys and values as the attention kernel reads them
        k_BTGK, v_BTGK = mm.kv(k_BTGK), mm.kv(v_BTGK)
        if mm.whole_attention:  # the paper's "whole attention": queries and probabilities too
            q_BTHK, impl, probs_hook = mm.kv(q_BTHK), "explicit", mm.probs
    scale, chunk = mults["attn_scale"], m.attention_chunk_size
    if cache is not None:  # the cached keys and values, with the new ones written at pos
        at = (0, pos, 0, 0)
        cache["k"] = jax.lax.dynamic_update_slice(cache["k"], k_BTGK.astype(cache["k"].dtype), at)
        cache["v"] = jax.lax.dynamic_update_slice(cache["v"], v_BTGK.astype(cache["v"].dtype), at)
        att_BTHK = kernels.explicit_attention(q_BTHK, cache["k"], cache["v"], scale, probs_hook, q_offset=pos)
    else:
        kw = {"impl": impl, "probs_hook": probs_hook, "chunk": chunk, "mesh": ctx.mesh}
        att_BTHK = attend(q_BTHK, k_BTGK, v_BTGK, scale=scale, **kw)
    att_BTHK = checkpoint_name(att_BTHK, "attn_out")
    out_BTD = mm("bthk,hkd->btd", att_BTHK, p["wo"], role="hidden", name="wo")
    if stats is not None:
        stats["attn"] = mean_abs(out_BTD)
        stats["attn_logits"] = kernels.logit_abs_mean(q_BTHK, k_BTGK, mults["attn_scale"])
        # the first sequence's queries and keys (each query head with its key head): coordinate checks form the
        # learned part of the logits, scale (q_t - q_0).(k_t - k_0), across training steps
        k_BTHK = jnp.repeat(k_BTGK, q_BTHK.shape[2] // k_BTGK.shape[2], axis=2)
        stats["qk_probe"] = jnp.stack([q_BTHK[0], k_BTHK[0]]).astype(jnp.float32)  # [2, T, H, K]
        stats["attn_mix"] = mean_abs(att_BTHK)  # softmax(.) v, before the output projection
    return out_BTD
