"""Training-dynamics metrics (`dyn/` in metrics.jsonl; `train.dyn_every`, docs/analysis.md).

Two parts, neither of which touches the training numbers:

* In the train step (step.py), when train.dyn_every > 0: per parameter group the RMS of the weights (after the
  step's update), of the raw gradients (before clipping) and of the optimizer's updates, and RMS(update) /
  RMS(weight). A few scalars per group, computed every step (a traced `cond` would make XLA:GPU sync the host on
  its predicate); the loop fetches them only on dyn steps, with the step's other metrics (no extra host sync).
* A probe (`Dynamics`, loop side), dispatched after the step on dyn steps only: a forward pass with `capture` on a
  fixed probe batch (the first rows of the first eval batch, at most PROBE_LEN positions). Per layer: the relative
  change of the block outputs (the residual stream h_l at transformer.PROBE_TOKENS positions of the first row)
  since step 0, ||h_l(t) - h_l(0)|| / ||h_l(0)||, and since the previous probe, ||h_l(t) - h_l(prev)|| / ||h_l(t)||;
  and the mean entropy of each layer's causal attention distribution, raw (nats) and divided by log(visible keys).

Groups follow the parameterization's roles, the hidden matrices split by what they do: embed, attn_qkv, attn_out,
mlp_in, mlp_out (shared experts included), readout, norm (gains and layernorm biases), router, expert_in,
expert_out; each aggregated over layers (sum of squares over the group / its size).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from maxscale.errors import ConfigError
from maxscale.model import transformer
from maxscale.parallel import sharding
from maxscale.parameterization import Parameterization, ParamSpec
from maxscale.train import data as data_lib

PROBE_LEN = 256  # probe positions at most (a causal model on a prefix: the same as on the whole sequence)
KIND_GROUPS = {"query": "attn_qkv", "key": "attn_qkv", "value": "attn_qkv", "attn_out": "attn_out"}
ROLE_GROUPS = {"embedding": "embed", "norm": "norm", "bias": "norm"}  # other roles are their own group


def check(cfg: ml_collections.ConfigDict) -> None:
    every = cfg.train.dyn_every
    if not isinstance(every, int) or isinstance(every, bool) or every < 0:
        raise ConfigError(f"train.dyn_every={every!r} must be a whole number >= 0 (0 = off, N = every N steps)")


def is_dyn_step(cfg: ml_collections.ConfigDict, done: int) -> bool:
    """Whether the step that brings the run to `done` steps is a dyn step (always a logged step)."""
    return bool(cfg.train.dyn_every) and done % cfg.train.dyn_every == 0


def group_of(path: str, spec: ParamSpec) -> str:
    """The dyn group of the parameter at `path` ("blocks/wq", "unembed", ...)."""
    if spec.role == "hidden":  # what the matrix does, from its ParamSpec
        return KIND_GROUPS.get(spec.kind, spec.kind or "hidden")
    return ROLE_GROUPS.get(spec.role, spec.role)


def weight_metrics(specs: dict[str, ParamSpec], params, grads, updates) -> dict:
    """{dyn/rms_w/<group>, dyn/rms_g/<group>, dyn/rms_u/<group>, dyn/u_over_w/<group>: scalar}, traced in the step.
    `specs`: {path: ParamSpec} (ModelDef.specs); `params`: the weights after the update (the step's output: read
    before it, the old weights would be copied, since the update overwrites them in place); `grads`: before
    clipping; `updates`: the optimizer's. Trees shaped like the params."""
    sizes: dict[str, int] = {}
    for path, leaf in zip(specs, _leaves(params, specs)):
        sizes[group_of(path, specs[path])] = sizes.get(group_of(path, specs[path]), 0) + leaf.size
    out = {}
    for group, sums in sorted(_group_sums(specs, params, grads, updates).items()):
        rms_w, rms_g, rms_u = (jnp.sqrt(s / sizes[group]) for s in sums)
        out.update(
            {
                f"dyn/rms_w/{group}": rms_w,
                f"dyn/rms_g/{group}": rms_g,
                f"dyn/rms_u/{group}": rms_u,
                f"dyn/u_over_w/{group}": rms_u / rms_w,
            }
        )
    return out


def _group_sums(specs: dict, *trees) -> dict:
    """{group: [sum of squares of each tree's leaves in the group]} (float32)."""
    sums: dict[str, list] = {}
    for path, *leaves in zip(specs, *(_leaves(t, specs) for t in trees)):
        acc = sums.setdefault(group_of(path, specs[path]), [0.0] * len(trees))
        for i, x in enumerate(leaves):
            x = x.astype(jnp.float32)
            acc[i] = acc[i] + jnp.sum(x * x)
    return sums


def _leaves(tree: dict, specs: dict) -> list:
    """The leaves of a params-shaped tree in the order of `specs`' paths."""
    out = []
    for path in specs:
        node = tree
        for key in path.split("/"):
            node = node[key]
        out.append(node)
    return out


def attention_entropy(qk_L2THK, scale: float):
    """Per layer ([L] each): the mean over heads and query positions of the entropy (nats) of the causal softmax of
    scale q.k, and its mean over positions t >= 1 divided by log(t + 1), the entropy of the uniform distribution
    over the t + 1 visible keys (1 = uniform attention, 0 = one key). `qk_L2THK`: capture's `qk_probe`, queries
    and keys (each query head with its key head) of one sequence. One layer's [H, T, T] at a time."""
    T = qk_L2THK.shape[2]
    causal_TS = jnp.tril(jnp.ones((T, T), bool))
    uniform_T = jnp.log(jnp.arange(1, T + 1, dtype=jnp.float32))

    def one(qk_2THK):
        logits_HTS = jnp.einsum("thk,shk->hts", qk_2THK[0], qk_2THK[1], precision="highest") * scale
        logp_HTS = jax.nn.log_softmax(jnp.where(causal_TS, logits_HTS, -jnp.inf), axis=-1)
        ent_HT = -jnp.sum(jnp.where(causal_TS, jnp.exp(logp_HTS) * logp_HTS, 0.0), axis=-1)
        normed = (ent_HT[:, 1:] / uniform_T[1:]).mean() if T > 1 else jnp.ones([])
        return ent_HT.mean(), normed

    return jax.lax.map(one, qk_L2THK.astype(jnp.float32))


class Dynamics:
    """The loop's side: the probe batch, the step-0 and previous probe features, and what is fetched per step.

    dh_init is always relative to step 0: after a resume the step-0 features are recomputed from the seed (the init
    is deterministic), so it continues the uninterrupted run's series. dh_step is relative to the previous probe of
    this process, which after a resume is the resume step's: the same as uninterrupted when the resume step is a
    multiple of train.dyn_every (checkpoints usually are)."""

    def __init__(self, setup, batch_BT1: jax.Array):
        """`setup`: the run's step.Setup; `batch_BT1`: a global eval batch (its first rows are probed)."""
        self.setup, self.cfg = setup, setup.cfg
        self.len = min(PROBE_LEN, self.cfg.data.seq_len)
        self.batch = batch_BT1
        self.ref = self.prev = None
        self._probe = setup.dyn_probe

    def begin(self, state: dict, start: int) -> None:
        """Before the first step of this process (step `start`): the step-0 and current probe features. Nothing when
        no dyn step lies ahead (no probe is compiled)."""
        every, steps = self.cfg.train.dyn_every, self.cfg.train.steps
        if not every or steps // every <= start // every:
            return
        bias = state.get("moe_bias")
        if start == 0:
            self.ref = self.prev = self._features(state["params"], bias)
            return
        param_sh = self.setup.state_shardings["params"]
        params0 = jax.jit(lambda: self.setup.model.init(self.cfg.train.seed), out_shardings=param_sh)()
        # the init is a function of the seed alone: these are the run's step-0 params, bit for bit
        bias0 = None if bias is None else jax.device_put(jnp.zeros(bias.shape, bias.dtype), bias.sharding)
        self.ref = self._features(params0, bias0)
        del params0
        self.prev = self._features(state["params"], bias)

    def add(self, dev_metrics: dict, state: dict, done: int) -> dict:
        """The metrics to fetch for logged step `done`: with the probe's on a dyn step, without any dyn/ key else."""
        if not is_dyn_step(self.cfg, done):
            return {k: v for k, v in dev_metrics.items() if not k.startswith("dyn/")}
        h, probe = self._probe(state["params"], self.batch, state.get("moe_bias"), self.ref, self.prev)
        self.prev = h
        return {**dev_metrics, **probe}

    def _features(self, params, bias):
        """The probe features of `params` (its metrics are dropped)."""
        m = self.cfg.model
        ref = self.ref
        if ref is None:
            shape = (m.depth, min(transformer.PROBE_TOKENS, self.len), m.width)  # placed like the probe's outputs
            ref = jax.device_put(jnp.zeros(shape, jnp.float32), sharding.replicated(self.setup.mesh))
        return self._probe(params, self.batch, bias, ref, ref)[0]


def probe_fn(setup):
    """The jitted probe of `setup` (Setup.dyn_probe compiles it once per Setup): (params, global batch, MoE bias,
    step-0 features, previous features) -> (features [L, N, D], {dyn/<metric>/layer_<i>: scalar}), replicated."""
    rows = sharding.data_parallel_size(setup.mesh)  # one row per data-parallel shard; features of the first
    length = min(PROBE_LEN, setup.cfg.data.seq_len)

    def probe(params, batch_BT1, bias, ref_LND, prev_LND):
        h_LND, entropy_L, normed_L = _capture(setup, params, batch_BT1[:rows, :length], bias)
        norm = lambda x: jnp.sqrt(jnp.sum(x * x, axis=(1, 2)))  # noqa: E731 - per layer
        series = {
            "dh_init": norm(h_LND - ref_LND) / norm(ref_LND),
            "dh_step": norm(h_LND - prev_LND) / norm(h_LND),
            "attn_entropy": entropy_L,
            "attn_entropy_norm": normed_L,
        }
        return h_LND, {f"dyn/{k}/layer_{i}": v[i] for k, v in series.items() for i in range(h_LND.shape[0])}

    return jax.jit(probe, out_shardings=sharding.replicated(setup.mesh))


def _capture(setup, params, tokens_BT, bias):
    """(h [L, N, D] float32: the residual stream after each block at the first N = transformer.PROBE_TOKENS
    positions of the first row, attention entropy [L], normalised attention entropy [L]), from the model's forward
    with capture "stats" (its embedding output and each block's residual increment at those positions)."""
    out = setup.model.forward(params, tokens_BT, moe_bias=bias, capture=("stats",))
    stats = out.captured["stats"]
    delta_LND = stats["layers"]["probe"]  # each block's residual increment: h_l = embedding output + their sum
    h_LND = stats["embed_probe"][None, : delta_LND.shape[1]] + jnp.cumsum(delta_LND, axis=0)
    entropy_L, normed_L = attention_entropy(stats["layers"]["qk_probe"], Parameterization(setup.cfg).attn_scale)
    return h_LND, entropy_L, normed_L


def probe_batch(setup, corpus, eval_data: list, process_index: int, process_count: int):
    """The global batch the probe reads: the first eval batch (built here when train.eval_steps is 0)."""
    if eval_data:
        return eval_data[0]
    one = setup.cfg.copy_and_resolve_references()
    one.train.eval_steps = 1
    return setup.global_batch(data_lib.eval_batches(corpus, one, process_index, process_count)[0]["tokens"])
