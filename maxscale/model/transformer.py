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
from maxscale.model.layers import DTYPES, Matmul, make_param, mean_abs, norm
from maxscale.model.moe_config import MoEConfig
from maxscale.parallel import sharding
from maxscale.parameterization import Parameterization, ParamSpec, spec_of
from maxscale.quant import qat

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


def matmul_for(cfg: ml_collections.ConfigDict) -> Matmul:
    """The matmul entry point configured for this run: compute dtype and, with `quant.*` set, fake quantization."""
    return Matmul(dtype=DTYPES[cfg.model.dtype], quantizer=qat.make_quantizer(cfg))


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


def _moe_dispatch(moe: MoEConfig):
    """On a mesh with an expert axis, the capacity and dropless paths run expert-parallel inside shard_map
    (all_to_all, resp. all-gather + reduce-scatter); the dense reference, and meshes without an expert axis, use
    the layer's own table (XLA partitions them)."""
    mesh = sharding.active_mesh()
    ep_paths = {"capacity": moe_lib.capacity_dispatch_ep, "dropless": moe_lib.dropless_dispatch_ep}
    if moe.dispatch not in ep_paths or mesh is None or mesh.shape["expert"] == 1:
        return None
    token_axes = tuple(a for a in sharding.batch_axes() if mesh.shape[a] > 1)
    return functools.partial(ep_paths[moe.dispatch], mesh=mesh, token_axes=token_axes)


# ----------------------------------------------------------------------------------------------------------------
# Pure block math (arrays in, arrays out): what the scan runs.


def block(p: dict, x_BTD, cfg: ml_collections.ConfigDict, mults: dict, capture: bool = False, bias_E=None, mm=None):
    """One pre-norm block: x + r * Attn(N(x)); then + r * FF(N(.)), FF the dense MLP or, when `p` holds a router,
    the mixture of experts (routing bias `bias_E`). `p` holds this layer's arrays.

    Returns x, or (x, stats) with `capture` or for an MoE block. Stats: with `capture`, mean |.| of the attention
    and feed-forward outputs (before the residual multiplier) and of the residual stream after the block, for the
    coordinate check; for MoE blocks also the routing statistics (moe.apply). `mm`: the matmul entry point to use
    (default: the run's own, `matmul_for(cfg)`); post-training quantization passes an observing one."""
    m = cfg.model
    mm = matmul_for(cfg) if mm is None else mm
    res = mults["residual"]
    x_in_BTD = x_BTD
    is_moe_block = "router" in p
    stats = {} if capture or is_moe_block else None

    h_BTD = norm(x_BTD, p["attn_norm"], p.get("attn_norm_bias"), m.norm, m.norm_eps)
    x_BTD = x_BTD + res * attention.apply(p, h_BTD, cfg, mults, mm, stats)
    x_BTD = sharding.constrain(x_BTD, ("batch", None, None))

    h_BTD = norm(x_BTD, p["mlp_norm"], p.get("mlp_norm_bias"), m.norm, m.norm_eps)
    if is_moe_block:
        moe = MoEConfig.from_config(cfg)
        ff_BTD = moe_lib.apply(p, h_BTD, moe, mm, bias_E, stats, dispatch=_moe_dispatch(moe))
        if capture:  # the feed-forward output under the dense MLP's name, so both stacks share one series
            stats["mlp"] = stats.pop("moe")
    else:
        ff_BTD = mlp.apply(p, h_BTD, cfg, mm, stats)
    x_BTD = sharding.constrain(x_BTD + res * ff_BTD, ("batch", None, None))
    if capture:
        stats["resid"] = mean_abs(x_BTD)
        # this block's residual increment at a few fixed positions: coordinate checks difference it across steps
        stats["probe"] = (x_BTD - x_in_BTD)[0, :PROBE_TOKENS].astype(jnp.float32)
    return x_BTD if stats is None else (x_BTD, stats)


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

    def arrays(self) -> dict:
        """{name: [depth, ...] array} of this stack's parameters, matrices in the compute dtype."""
        cast = lambda n: self._dtype if n in self._matrices else None  # noqa: E731
        return {name: compute_weight(getattr(self, name), cast(name)) for name in self._names}

    def __call__(self, x_BTD, cfg, mults, capture: bool = False, bias_LE=None):
        """Returns x, or (x, {stat: [L, ...]}) with `capture` or for an MoE stack (per-layer stats as scan outputs;
        `bias_LE` is the MoE stack's routing bias, one row per layer)."""
        stacked = self.arrays()
        if self._moe:
            body = lambda x, pb: block(pb[0], x, cfg, mults, capture, bias_E=pb[1])
            xs = (stacked, bias_LE)
        elif capture:
            body, xs = (lambda x, p: block(p, x, cfg, mults, capture=True)), stacked
        else:
            body, xs = (lambda x, p: (block(p, x, cfg, mults), None)), stacked
        x_BTD, stats = jax.lax.scan(remat(body, cfg), x_BTD, xs)
        return (x_BTD, stats) if capture or self._moe else x_BTD


def run_groups(dense: Blocks, moe: Blocks, x_BTD, cfg, mults, capture: bool, bias_LE):
    """The MoE groups: scan over G groups of (every - 1 dense blocks, scanned; then one MoE block). Returns
    (x, stats) like an MoE stack's call: the MoE block's stats ([G, ...]) and, with `capture`, every block's
    per-layer series in depth order ([G * every, ...])."""
    G = bias_LE.shape[0]
    dense_p = {k: v.reshape(G, v.shape[0] // G, *v.shape[1:]) for k, v in dense.arrays().items()}

    def dense_body(x, p):
        out = block(p, x, cfg, mults, capture)
        return out if capture else (out, None)

    def group(x, xs):
        p_dense, p_moe, b_E = xs
        x, dense_stats = jax.lax.scan(dense_body, x, p_dense)
        x, stats = block(p_moe, x, cfg, mults, capture, bias_E=b_E)
        # per-block series of this group (its dense blocks, then the MoE block) apart from the MoE-only stats
        series = {k: jnp.concatenate([v, stats.pop(k)[None]]) for k, v in (dense_stats or {}).items()}
        return x, (series, stats)

    x_BTD, (series, stats) = jax.lax.scan(remat(group, cfg), x_BTD, (dense_p, moe.arrays(), bias_LE))
    return x_BTD, {**stats, **{k: v.reshape(-1, *v.shape[2:]) for k, v in series.items()}}


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

    def __call__(self, tokens_BT, capture: bool = False, moe_bias=None, targets_BT=None, mults=None):
        """Returns (float32 logits [B, T, V], aux). aux["moe"]: per MoE layer ([L_moe, ...]) routing stats, for an
        MoE model; with `capture`, aux also holds mean |x| of the embedding output, the logits, and per layer ([L])
        the attention and feed-forward outputs and the residual stream. `moe_bias`: [L_moe, E] routing bias.
        With `targets_BT`, ({"ce": mean cross-entropy, "z_loss": mean log(Z)^2}, aux) instead of the logits,
        computed over chunks of `model.loss_chunk_size` positions (`readout_loss`). `mults`: forward multipliers
        that replace the parameterization's (arrays allowed: one compiled step for many values, train/vectorized)."""
        m = self.cfg.model
        dt = DTYPES[m.dtype]
        mults = {**self.par.multipliers(), **(mults or {})}
        embed_VD = self.embed[...]
        # Gather from a whole table (FSDP all-gathers it, as it does every weight): a lookup into a table sharded
        # on `embed` yields rows sharded the wrong way, and XLA then replicates them in the backward pass. Rows are
        # gathered in the parameter dtype and cast after, so the gradient's scatter-add stays float32.
        table_VD = sharding.constrain(embed_VD, (None, None))
        quantizer = qat.make_quantizer(self.cfg)
        if quantizer is not None:
            table_VD = quantizer.table(table_VD)
        x_BTD = (table_VD[tokens_BT] * mults["input"]).astype(dt)
        x_BTD = sharding.constrain(x_BTD, ("batch", None, None))
        aux, layer_stats = ({"embed": mean_abs(x_BTD)} if capture else {}), []
        if hasattr(self, "blocks"):
            out = self.blocks(x_BTD, self.cfg, mults, capture=capture)
            x_BTD, dense_stats = out if capture else (out, None)
            layer_stats.append(dense_stats)
        if hasattr(self, "moe_blocks"):
            if moe_bias is None:
                moe_bias = jnp.zeros((stack_depths(self.cfg)["moe_blocks"], m.moe.num_experts), jnp.float32)
            if hasattr(self, "interleaved"):
                groups = (self.interleaved, self.moe_blocks, x_BTD, self.cfg, mults, capture, moe_bias)
                x_BTD, moe_stats = run_groups(*groups)
            else:
                x_BTD, moe_stats = self.moe_blocks(x_BTD, self.cfg, mults, capture=capture, bias_LE=moe_bias)
            aux["moe"] = {k: v for k, v in moe_stats.items() if k.startswith("moe_")}
            layer_stats.append({k: v for k, v in moe_stats.items() if not k.startswith("moe")})
        if capture:  # one [L] series per statistic over both stacks, in depth order
            aux["layers"] = {k: jnp.concatenate([s[k] for s in layer_stats]) for k in layer_stats[0]}
        bias = self.final_norm_bias[...] if m.norm == "layernorm" else None
        x_BTD = norm(x_BTD, self.final_norm[...], bias, m.norm, m.norm_eps)
        readout_DV = embed_VD.T if m.tie_embeddings else self.unembed[...]
        readout_DV = sharding.constrain(readout_DV.astype(dt), ("embed", "vocab"))  # cast, then FSDP gathers it
        if targets_BT is not None:
            mm = matmul_for(self.cfg)
            return readout_loss(x_BTD, readout_DV, targets_BT, mults["output"], mm, m.loss_chunk_size), aux
        logits = matmul_for(self.cfg)("btd,dv->btv", x_BTD, readout_DV, role="readout", out_dtype=jnp.float32)
        logits = logits * mults["output"]
        if capture:
            aux["logits"] = mean_abs(logits)
        return logits, aux


def compute_weight(param: nnx.Param, dtype: str | None):
    """A parameter's value in the compute dtype `dtype` (None: as stored), cast on its own shards: the cast comes
    before the all-gather that FSDP inserts where the weight is used, so the gather moves compute-dtype bytes."""
    value = param[...]
    if dtype is None or value.dtype == DTYPES[dtype]:
        return value
    return sharding.constrain(value.astype(DTYPES[dtype]), param.get_metadata()["axes"])


def readout_loss(x_BTD, w_DV, targets_BT, output_mult, mm: Matmul, chunk: int) -> dict:
    """Mean next-token cross-entropy and mean log(Z)^2 (the output z-loss; Z the softmax normaliser), float32,
    of the readout logits x.w * output_mult. With `chunk` (positions per chunk, a divisor of T; 0 = all at once)
    the logits are formed chunk by chunk in a scan whose body is rematerialised, so neither the forward nor the
    backward pass holds [B, T, V] float32 logits: at most one chunk's [B, chunk, V]."""
    B, T, D = x_BTD.shape

    def sums(x_BCD, t_BC):
        logits_BCV = mm("btd,dv->btv", x_BCD, w_DV, role="readout", out_dtype=jnp.float32) * output_mult
        lse_BC = jax.nn.logsumexp(logits_BCV, axis=-1)
        nll_BC = lse_BC - jnp.take_along_axis(logits_BCV, t_BC[..., None], axis=-1)[..., 0]
        return nll_BC.sum(), (lse_BC * lse_BC).sum()

    if not chunk or chunk >= T:
        nll, z = sums(x_BTD, targets_BT)
    else:
        n = T // chunk  # chunks along the sequence: each one spans the batch, so it stays split over the devices
        xs = (x_BTD.reshape(B, n, chunk, D).swapaxes(0, 1), targets_BT.reshape(B, n, chunk).swapaxes(0, 1))
        body = jax.checkpoint(lambda acc, xs: (jax.tree.map(jnp.add, acc, sums(*xs)), None))
        zero = jnp.zeros((), jnp.float32)
        (nll, z), _ = jax.lax.scan(body, (zero, zero), xs)
    return {"ce": nll / (B * T), "z_loss": z / (B * T)}


# ----------------------------------------------------------------------------------------------------------------
# Functional view: the trainer keeps params as a plain nested dict of arrays.


class ModelDef:
    """Pure-function view of the model: `apply(params, tokens)`; params are a nested dict of arrays."""

    def __init__(self, cfg: ml_collections.ConfigDict):
        self.cfg = cfg
        abstract = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
        self.graphdef, state = nnx.split(abstract)
        self._state_treedef = jax.tree.structure(state)
        self.specs = {path: spec_of(v) for path, v in _flat_params(state)}
        self.abstract_params = nnx.to_pure_dict(state)

    def init(self, seed: int) -> dict:
        """Initial params (call under jit with out_shardings to create them sharded)."""
        # a key, not the int: the same numbers as nnx.Rngs(seed), and `seed` may be traced (one compile, many seeds)
        return nnx.to_pure_dict(nnx.state(Transformer(self.cfg, nnx.Rngs(jax.random.key(seed)))))

    def apply(self, params: dict, tokens_BT, capture: bool = False, moe_bias=None):
        """Logits [B, T, V]; with `capture`, (logits, stats) as in `Transformer.__call__` (coordinate checks)."""
        logits, aux = self.apply_aux(params, tokens_BT, capture=capture, moe_bias=moe_bias)
        return (logits, aux) if capture else logits

    def apply_aux(self, params: dict, tokens_BT, capture: bool = False, moe_bias=None):
        """(logits [B, T, V], aux) as in `Transformer.__call__`: the MoE routing stats the train step needs."""
        state = jax.tree.unflatten(self._state_treedef, jax.tree.leaves(params))
        return nnx.merge(self.graphdef, state)(tokens_BT, capture=capture, moe_bias=moe_bias)

    def loss(self, params: dict, tokens_BT, targets_BT, moe_bias=None, mults=None):
        """({"ce", "z_loss"}, aux) of next-token prediction of `targets_BT` (readout_loss; no [B, T, V] logits
        held at once with model.loss_chunk_size); aux as in `apply_aux`."""
        state = jax.tree.unflatten(self._state_treedef, jax.tree.leaves(params))
        return nnx.merge(self.graphdef, state)(tokens_BT, moe_bias=moe_bias, targets_BT=targets_BT, mults=mults)

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
