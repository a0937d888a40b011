"""Decoder-only transformer in Flax NNX, with stacked block parameters scanned over depth.

Shapes in names: B batch, T sequence, D width, H query heads, G key/value heads, K head dim, F ffn size, V vocab,
L layers, E experts. Every parameter is an `nnx.Param` whose metadata (`role`, `axes`, `fan_in`) is the single input
of the parameterization (init std, LR/WD/eps factors) and of the sharding rules; forward multipliers come from the
same `Parameterization` object. Block parameters carry a leading `layers` axis and the blocks run under
`jax.lax.scan`, so compile time does not grow with depth. A mixture-of-experts model has up to three stacks:
`blocks` (the first `model.moe.first_dense` blocks, dense), then groups of `model.moe.every` blocks, each group
`every - 1` dense blocks (stack `interleaved`) followed by one MoE block (stack `moe_blocks`); the groups are scanned,
and inside a group the dense blocks are scanned too. every = 1 (the default): every block after the first_dense is MoE.
"""

from __future__ import annotations

import functools
from typing import Iterator

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from maxscale.model import attention, mlp
from maxscale.model import moe as moe_lib
from maxscale.model.context import CAPTURES, Context, Recorder
from maxscale.model.layers import DTYPES, Matmul, make_param, mean_abs, norm, readout_loss  # noqa: F401
from maxscale.model.moe_config import MoEConfig
from maxscale.model.output import Output, gather, stats_of  # noqa: F401 - stats_of: part of this API
from maxscale.parallel import sharding
from maxscale.parameterization import Parameterization, ParamSpec, spec_of

PROBE_TOKENS = 8  # positions of the first sequence whose residual increments `capture` returns


def is_moe(cfg: ml_collections.ConfigDict) -> bool:
    return cfg.model.moe.num_experts > 0


def stack_depths(cfg: ml_collections.ConfigDict) -> dict[str, int]:
    """Blocks per stack: {"blocks": leading dense blocks, "interleaved": dense blocks inside the MoE groups,
    "moe_blocks": MoE blocks}, zero-sized stacks left out. Depth order: blocks, then per group its `every - 1`
    interleaved blocks and one MoE block."""
    m = cfg.model
    groups = (m.depth - m.moe.first_dense) // m.moe.every if is_moe(cfg) else 0
    sizes = (("blocks", m.depth - groups * m.moe.every), ("interleaved", groups * (m.moe.every - 1)))
    return {k: v for k, v in (*sizes, ("moe_blocks", groups)) if v}


def block_specs(cfg: ml_collections.ConfigDict, moe: bool = False) -> dict[str, ParamSpec]:
    """The parameters of one block, each with a leading `layers` axis (stacked over depth); with `moe` the
    feed-forward branch is a mixture of experts instead of the dense MLP."""
    L = ("layers",)
    specs = {
        "attn_norm": ParamSpec("norm", L + ("embed",), ()),
        **attention.specs(cfg),
        "mlp_norm": ParamSpec("norm", L + ("embed",), ()),
        **(moe_lib.specs(MoEConfig.from_config(cfg)) if moe else mlp.specs(cfg)),
    }
    if cfg.model.norm == "layernorm":
        specs["attn_norm_bias"] = ParamSpec("bias", L + ("embed",), ())
        specs["mlp_norm_bias"] = ParamSpec("bias", L + ("embed",), ())
    return specs


def build_context(cfg: ml_collections.ConfigDict, mesh=None, quantizer=None) -> Context:
    """The forward's Context for this run on `mesh` (None: one device, no constraints): compute dtype, the
    quantizer (None: full precision; quant/qat.py `context` builds it from cfg.quant) and the attention kernel
    `model.attention_impl` names on the mesh's backend."""
    impl = attention.choose(cfg, attention.platform_of(mesh))
    return Context(mesh=mesh, dtype=DTYPES[cfg.model.dtype], quantizer=quantizer, attention_impl=impl)


def quantized(cfg: ml_collections.ConfigDict) -> bool:
    """Whether cfg.quant asks for any quantized tensor kind (the model then needs a Context with a quantizer)."""
    return any(str(cfg.quant[k]).strip().lower() != "none" for k in ("weights", "activations", "kv"))


# model.remat: what the backward pass may keep of each block's forward instead of recomputing it (the block input,
# the scan carry, is always kept). Names are `checkpoint_name` tags in attention.apply. docs/performance.md
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,  # keep nothing: least memory, recompute the whole block
    "dots": jax.checkpoint_policies.dots_saveable,  # every matmul output, attention logits included
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # weight matmuls only
    "save_attn_out": jax.checkpoint_policies.save_only_these_names("attn_qkv", "attn_out"),  # q, k, v, attention
    "offload": jax.checkpoint_policies.save_and_offload_only_these_names(  # the same, kept in host memory
        names_which_can_be_saved=(),
        names_which_can_be_offloaded=("attn_qkv", "attn_out"),
        offload_src="device",
        offload_dst="pinned_host",
    ),
}


def remat(body, cfg: ml_collections.ConfigDict):
    """`body` under `model.remat`'s policy (none: as it is; true/false from unresolved configs: full/none)."""
    name = {True: "full", False: "none"}.get(cfg.model.remat, cfg.model.remat)
    return body if name == "none" else jax.checkpoint(body, policy=REMAT_POLICIES[name])


def _moe_dispatch(moe: MoEConfig, ctx: Context, recording: bool):
    """On a mesh with an expert axis, the capacity and dropless paths run expert-parallel inside shard_map
    (all-gather + reduce-scatter; capacity drops over the global batch, as on one device: moe_ep.py); the dense
    reference, meshes without an expert axis, and forwards that record (capture quant_errors/moments: nothing may
    leave a shard_map body) use the layer's own table (XLA partitions them)."""
    mesh = ctx.mesh
    ep_paths = {"capacity": moe_lib.capacity_dispatch_ep, "dropless": moe_lib.dropless_dispatch_ep}
    if recording or moe.dispatch not in ep_paths or mesh is None or mesh.shape["expert"] == 1:
        return None
    token_axes = tuple(a for a in sharding.batch_axes() if mesh.shape[a] > 1)
    return functools.partial(ep_paths[moe.dispatch], mesh=mesh, token_axes=token_axes)


# ----------------------------------------------------------------------------------------------------------------
# Pure block math (arrays in, arrays out): what the scan runs.


def block(
    p: dict, x_BTD, cfg: ml_collections.ConfigDict, mults: dict, ctx: Context, capture=frozenset(), bias_E=None, kv=None
):
    """One pre-norm block: x + r * Attn(N(x)); then + r * FF(N(.)), FF the dense MLP or, when `p` holds a router,
    the mixture of experts (routing bias `bias_E`). `p` holds this layer's arrays. Returns (x, out):

    out["stats"]: for an MoE block the routing statistics (moe.apply, keys moe_*); with "stats" in `capture` also
      mean |.| of the attention and feed-forward outputs (before the residual multiplier), of the residual stream
      after the block, and this block's residual increment at PROBE_TOKENS positions of the first row ("probe").
    out["quant_errors"], out["moments"]: with those in `capture`, what the Recorder saw (context.py).
    out["cache"]: with `kv` (decoding: {"k", "v": this layer's cache [B, S, G, K], "pos": the first new position}),
      the cache with the new keys and values written (attention.apply)."""
    m = cfg.model
    rec = Recorder(capture) if capture & {"quant_errors", "moments"} else None
    mm = Matmul(dtype=ctx.dtype, quantizer=ctx.quantizer, recorder=rec)
    res = mults["residual"]
    x_in_BTD = x_BTD
    is_moe_block = "router" in p
    stats = {} if "stats" in capture or is_moe_block else None

    h_BTD = norm(x_BTD, p["attn_norm"], p.get("attn_norm_bias"), m.norm, m.norm_eps)
    cache = None if kv is None else dict(kv)
    x_BTD = x_BTD + res * attention.apply(
        p, h_BTD, cfg, mults, mm, ctx, stats if "stats" in capture else None, cache=cache
    )
    x_BTD = ctx.constrain(x_BTD, ("batch", None, None))

    h_BTD = norm(x_BTD, p["mlp_norm"], p.get("mlp_norm_bias"), m.norm, m.norm_eps)
    if is_moe_block:
        moe = MoEConfig.from_config(cfg)
        ff_BTD = moe_lib.apply(p, h_BTD, moe, mm, bias_E, stats, dispatch=_moe_dispatch(moe, ctx, rec is not None))
        if "stats" in capture:  # the feed-forward output under the dense MLP's name, so both stacks share one series
            stats["mlp"] = stats.pop("moe")
    else:
        ff_BTD = mlp.apply(p, h_BTD, cfg, mm, stats)
    x_BTD = ctx.constrain(x_BTD + res * ff_BTD, ("batch", None, None))
    if "stats" in capture:
        stats["resid"] = mean_abs(x_BTD)
        # this block's residual increment at a few fixed positions: coordinate checks difference it across steps
        stats["probe"] = (x_BTD - x_in_BTD)[0, :PROBE_TOKENS].astype(jnp.float32)
    out = {"stats": stats or {}, **(rec.outputs() if rec is not None else {})}
    if cache is not None:
        out["cache"] = {"k": cache["k"], "v": cache["v"]}
    return x_BTD, out


# ----------------------------------------------------------------------------------------------------------------


class Blocks(nnx.Module):
    """A stack of blocks, parameters stacked on a leading `layers` axis of `depth`."""

    def __init__(self, cfg, par: Parameterization, rngs: nnx.Rngs, depth: int, moe: bool = False):
        dtype = DTYPES[cfg.model.param_dtype]
        specs = block_specs(cfg, moe)
        for name, spec in specs.items():
            setattr(self, name, make_param(rngs, par, name, spec, dtype, layers=depth))
        self._names, self._moe = tuple(specs), moe
        # matrices cast to the compute dtype here, on their shards, so FSDP gathers them in that dtype
        self._matrices = tuple(n for n, spec in specs.items() if spec.role not in ("norm", "bias", "router"))
        self._dtype = cfg.model.dtype

    def arrays(self, ctx: Context) -> dict:
        """{name: [depth, ...] array} of this stack's parameters, matrices in the compute dtype."""
        cast = lambda n: self._dtype if n in self._matrices else None  # noqa: E731
        return {name: compute_weight(getattr(self, name), cast(name), ctx) for name in self._names}

    def __call__(self, x_BTD, cfg, mults, ctx: Context, capture=frozenset(), bias_LE=None, cache=None, pos=0):
        """(x, out): `block`'s out of every layer, stacked on a leading [L] axis (scan outputs); `bias_LE` is an MoE
        stack's routing bias, one row per layer; `cache` this stack's KV cache {"k", "v": [L, B, S, G, K]}."""

        def body(x, xs):
            p, b_E, kv = xs
            return block(p, x, cfg, mults, ctx, capture, bias_E=b_E, kv=None if kv is None else {**kv, "pos": pos})

        xs = (self.arrays(ctx), bias_LE if self._moe else None, cache)
        return jax.lax.scan(remat(body, cfg), x_BTD, xs)


def run_groups(dense: Blocks, moe: Blocks, x_BTD, cfg, mults, ctx: Context, capture, bias_LE, cache=None, pos=0):
    """The MoE groups: scan over G groups of (every - 1 dense blocks, scanned; then one MoE block). Returns
    (x, dense stack's out [G * (every - 1), ...], MoE stack's out [G, ...]), each in its stack's layer order.
    `cache`: {"interleaved": ..., "moe_blocks": ...} KV caches in the stacks' layer order (or None)."""
    G = bias_LE.shape[0]
    by_group = lambda v: v.reshape(G, v.shape[0] // G, *v.shape[1:])  # noqa: E731
    dense_p = jax.tree.map(by_group, dense.arrays(ctx))
    kv_dense, kv_moe = (
        (None, None) if cache is None else (jax.tree.map(by_group, cache["interleaved"]), cache["moe_blocks"])
    )
    with_pos = lambda kv: None if kv is None else {**kv, "pos": pos}  # noqa: E731

    def group(x, xs):
        p_dense, p_moe, b_E, kv_d, kv_m = xs
        dense_body = lambda x, pk: block(pk[0], x, cfg, mults, ctx, capture, kv=with_pos(pk[1]))  # noqa: E731
        x, dense_out = jax.lax.scan(dense_body, x, (p_dense, kv_d))
        x, moe_out = block(p_moe, x, cfg, mults, ctx, capture, bias_E=b_E, kv=with_pos(kv_m))
        return x, (dense_out, moe_out)

    xs = (dense_p, moe.arrays(ctx), bias_LE, kv_dense, kv_moe)
    x_BTD, (dense_out, moe_out) = jax.lax.scan(remat(group, cfg), x_BTD, xs)
    return x_BTD, jax.tree.map(lambda v: v.reshape(-1, *v.shape[2:]), dense_out), moe_out


class Transformer(nnx.Module):
    def __init__(self, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs):
        self.cfg = cfg
        self.par = Parameterization(cfg)
        dtype = DTYPES[cfg.model.param_dtype]
        self.embed = make_param(rngs, self.par, "embed", ParamSpec("embedding", ("vocab", "embed"), ()), dtype)
        depths = stack_depths(cfg)
        if "blocks" in depths:
            self.blocks = Blocks(cfg, self.par, rngs, depths["blocks"])
        if "interleaved" in depths:
            self.interleaved = Blocks(cfg, self.par, rngs, depths["interleaved"])
        if "moe_blocks" in depths:
            self.moe_blocks = Blocks(cfg, self.par, rngs, depths["moe_blocks"], moe=True)
        self.final_norm = make_param(rngs, self.par, "final_norm", ParamSpec("norm", ("embed",), ()), dtype)
        if cfg.model.norm == "layernorm":
            self.final_norm_bias = make_param(
                rngs, self.par, "final_norm_bias", ParamSpec("bias", ("embed",), ()), dtype
            )
        if not cfg.model.tie_embeddings:
            self.unembed = make_param(
                rngs, self.par, "unembed", ParamSpec("readout", ("embed", "vocab"), ("embed",)), dtype
            )

    def __call__(
        self, tokens_BT, ctx: Context, *, targets_BT=None, moe_bias=None, mults=None, capture=(), cache=None, pos=0
    ):
        """The forward pass: an `Output` (see there). `moe_bias`: [L_moe, E] routing bias (zeros if None).
        With `targets_BT` the readout and loss run over chunks of `model.loss_chunk_size` positions
        (`readout_loss`: no [B, T, V] logits held at once) and Output.loss is set; else Output.logits.
        `mults`: forward multipliers that replace the parameterization's (arrays allowed: one compiled step for many
        values, packs of runs). `capture`: names of CAPTURES to record (Output.captured). `cache`: decoding with a
        KV cache ({stack: {"k", "v": [L, B, S, G, K]}}, decode.init_cache), the T tokens at positions pos..pos+T-1;
        Output.cache is the cache with their keys and values written."""
        m = self.cfg.model
        capture = frozenset(capture)
        unknown = capture - set(CAPTURES)
        if unknown:
            raise ValueError(f"capture={sorted(unknown)}: not one of {CAPTURES}")
        if ctx.quantizer is None and quantized(self.cfg):
            raise ValueError("this config quantizes (quant.*) but the Context has no quantizer: quant.qat.context")
        mults = {**self.par.multipliers(), **(mults or {})}
        rec = Recorder(capture) if capture & {"quant_errors", "moments"} else None
        mm = Matmul(dtype=ctx.dtype, quantizer=ctx.quantizer, recorder=rec)
        embed_VD = self.embed[...]
        # Gather from a whole table (FSDP all-gathers it, as it does every weight): a lookup into a table sharded
        # on `embed` yields rows sharded the wrong way, and XLA then replicates them in the backward pass. Rows are
        # gathered in the parameter dtype and cast after, so the gradient's scatter-add stays float32.
        table_VD = mm.table(ctx.constrain(embed_VD, (None, None)))
        x_BTD = ctx.constrain((table_VD[tokens_BT] * mults["input"]).astype(ctx.dtype), ("batch", None, None))
        x_BTD, outs = self._stacks(x_BTD, ctx, mults, capture, moe_bias, cache, pos)
        bias = self.final_norm_bias[...] if m.norm == "layernorm" else None
        x_BTD = norm(x_BTD, self.final_norm[...], bias, m.norm, m.norm_eps)
        readout_DV = embed_VD.T if m.tie_embeddings else self.unembed[...]
        readout_DV = ctx.constrain(readout_DV.astype(ctx.dtype), ("embed", "vocab"))  # cast, then FSDP gathers it
        name = "embed" if m.tie_embeddings else "unembed"
        logits = loss = None
        if targets_BT is not None:  # the plain entry point: nothing is recorded inside the chunked loss's scan
            plain = Matmul(dtype=ctx.dtype, quantizer=ctx.quantizer)
            loss = readout_loss(x_BTD, readout_DV, targets_BT, mults["output"], plain, m.loss_chunk_size, name)
        if targets_BT is None or rec is not None:
            logits = mm("btd,dv->btv", x_BTD, readout_DV, role="readout", name=name, out_dtype=jnp.float32)
            logits = logits * mults["output"]
        moe = {k: v for k, v in outs.get("moe_blocks", {}).get("stats", {}).items() if k.startswith("moe_")}
        G = stack_depths(self.cfg).get("moe_blocks", 0)
        captured = gather(outs, capture, rec, logits, G)
        if "stats" in capture:
            emb_BTD = (table_VD[tokens_BT] * mults["input"]).astype(ctx.dtype)
            captured["stats"]["embed"] = mean_abs(emb_BTD)  # = the first block's input
            captured["stats"]["embed_probe"] = emb_BTD[0, :PROBE_TOKENS].astype(jnp.float32)
        new_cache = None if cache is None else {k: o["cache"] for k, o in outs.items()}
        logits = logits if targets_BT is None else None
        return Output(logits=logits, loss=loss, moe=moe, captured=captured, cache=new_cache)

    def _stacks(self, x_BTD, ctx: Context, mults: dict, capture: frozenset, moe_bias, cache, pos):
        """Runs the block stacks in depth order; returns (x, {stack name: its blocks' out, [layers of stack, ...]})."""
        outs = {}
        kv = (lambda stack: None) if cache is None else cache.get  # noqa: E731
        if hasattr(self, "blocks"):
            x_BTD, outs["blocks"] = self.blocks(x_BTD, self.cfg, mults, ctx, capture, cache=kv("blocks"), pos=pos)
        if hasattr(self, "moe_blocks"):
            if moe_bias is None:
                moe_bias = jnp.zeros((stack_depths(self.cfg)["moe_blocks"], self.cfg.model.moe.num_experts))
            if hasattr(self, "interleaved"):
                groups = (self.interleaved, self.moe_blocks, x_BTD, self.cfg, mults, ctx, capture, moe_bias, cache, pos)
                x_BTD, outs["interleaved"], outs["moe_blocks"] = run_groups(*groups)
            else:
                stack = (x_BTD, self.cfg, mults, ctx, capture, moe_bias, kv("moe_blocks"), pos)
                x_BTD, outs["moe_blocks"] = self.moe_blocks(*stack)
        return x_BTD, outs


def compute_weight(param: nnx.Param, dtype: str | None, ctx: Context):
    """A parameter's value in the compute dtype `dtype` (None: as stored), cast on its own shards: the cast comes
    before the all-gather that FSDP inserts where the weight is used, so the gather moves compute-dtype bytes."""
    value = param[...]
    if dtype is None or value.dtype == DTYPES[dtype]:
        return value
    return ctx.constrain(value.astype(DTYPES[dtype]), param.get_metadata()["axes"])


# ----------------------------------------------------------------------------------------------------------------
# Functional view: the trainer keeps params as a plain nested dict of arrays.


class ModelDef:
    """Pure-function view of the model: params are a nested dict of arrays; `forward` is the one forward pass.
    `ctx`: the run's Context (mesh, compute dtype, quantizer, attention kernel); default: one device, no quantizer
    (a quantized config then refuses to run forward: build its Context with quant.qat.context)."""

    def __init__(self, cfg: ml_collections.ConfigDict, ctx: Context | None = None):
        self.cfg = cfg
        self.ctx = ctx if ctx is not None else build_context(cfg)
        abstract = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
        self.graphdef, state = nnx.split(abstract)
        self._state_treedef = jax.tree.structure(state)
        self.specs = {path: spec_of(v) for path, v in _flat_params(state)}
        self.abstract_params = nnx.to_pure_dict(state)

    def init(self, seed: int) -> dict:
        """Initial params (call under jit with out_shardings to create them sharded)."""
        # a key, not the int: the same numbers as nnx.Rngs(seed), and `seed` may be traced (one compile, many seeds)
        return nnx.to_pure_dict(nnx.state(Transformer(self.cfg, nnx.Rngs(jax.random.key(seed)))))

    def forward(
        self,
        params: dict,
        tokens_BT,
        *,
        targets_BT=None,
        moe_bias=None,
        mults=None,
        qbits=None,
        capture=(),
        cache=None,
        pos=0,
    ) -> Output:
        """The forward pass (`Transformer.__call__`): an `Output`. `qbits`: a pack member's traced quantization
        widths ({kind: int32 array}, quant/qat.py member_bits), replacing the quantizer's constant ones; `cache`,
        `pos`: decoding with a KV cache (model/decode.py)."""
        state = jax.tree.unflatten(self._state_treedef, jax.tree.leaves(params))
        model = nnx.merge(self.graphdef, state)
        kw = {"targets_BT": targets_BT, "moe_bias": moe_bias, "mults": mults, "capture": capture}
        return model(tokens_BT, self.ctx.with_bits(qbits), **kw, cache=cache, pos=pos)

    def apply(self, params: dict, tokens_BT, moe_bias=None) -> jax.Array:
        """Float32 logits [B, T, V]."""
        return self.forward(params, tokens_BT, moe_bias=moe_bias).logits

    def loss(self, params: dict, tokens_BT, targets_BT, moe_bias=None, mults=None, qbits=None):
        """({"ce", "z_loss"}, {"moe": per-layer routing stats} or {}) of next-token prediction of `targets_BT`
        (readout_loss: no [B, T, V] logits held at once with model.loss_chunk_size)."""
        out = self.forward(params, tokens_BT, targets_BT=targets_BT, moe_bias=moe_bias, mults=mults, qbits=qbits)
        return out.loss, ({"moe": out.moe} if out.moe else {})

    def spec_tree(self) -> dict:
        """A tree shaped like params whose leaves are ParamSpecs."""
        return _unflatten({path: spec for path, spec in self.specs.items()})


def _flat_params(state) -> Iterator[tuple[str, nnx.Param]]:
    for path, var in nnx.to_flat_state(state):
        yield "/".join(str(k) for k in path), var


def _unflatten(flat: dict) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        *parents, leaf = path.split("/")
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = value
    return out


def param_specs(cfg: ml_collections.ConfigDict) -> list[tuple[str, ParamSpec, tuple[int, ...]]]:
    """(path, spec, shape) of every parameter, without allocating any."""
    abstract = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
    return [(path, spec_of(v), tuple(v.get_value().shape)) for path, v in _flat_params(nnx.state(abstract))]


def count_params(cfg: ml_collections.ConfigDict) -> dict[str, int]:
    """Parameter counts: total, non_embedding, and active (per token: k of E routed experts, all else)."""
    total = embedding = routed = 0
    for _, spec, shape in param_specs(cfg):
        n = 1
        for s in shape:
            n *= s
        total += n
        if spec.role == "embedding":
            embedding += n
        if spec.role in ("expert_in", "expert_out"):
            routed += n
    e = cfg.model.moe
    active = total - routed + (routed * e.num_active // e.num_experts if e.num_experts else 0)
    return {"total": total, "non_embedding": total - embedding, "active": active}


def flops_per_token(cfg: ml_collections.ConfigDict) -> float:
    """Training FLOPs per token: 6 x active matmul params (readout included) + 12 L T H K for attention (PaLM,
    App. B). Dispatch and capacity padding are not counted: MFU is against the model's useful work."""
    m, e = cfg.model, cfg.model.moe
    n_mlp = 3 if m.mlp == "swiglu" else 2
    attn = m.width * m.head_dim * (2 * m.num_heads + 2 * m.num_kv_heads)
    depths = stack_depths(cfg)
    # MoE blocks: the router, k of E experts and the shared experts act on each token (active parameters only)
    moe_ff = m.width * e.num_experts + n_mlp * m.width * (
        e.num_active * e.expert_ffn_size + e.num_shared * e.shared_ffn_size
    )
    matmul_params = (
        (depths.get("blocks", 0) + depths.get("interleaved", 0)) * (attn + n_mlp * m.width * m.ffn_size)
        + depths.get("moe_blocks", 0) * (attn + moe_ff)
        + m.width * m.vocab_size
    )
    return 6.0 * matmul_params + 12.0 * m.depth * cfg.data.seq_len * m.num_heads * m.head_dim
