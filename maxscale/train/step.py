"""The pure training step: loss, gradients, update; built once per (config, mesh) and shared by the trainer, the
benchmark, the coordinate check and the compile check. No files, no logging: `loop.py` does IO around it.

Params and optimizer state live on the mesh as one pytree; the jitted step has explicit in/out shardings and
donates the state.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from maxscale.errors import ConfigError
from maxscale.model import attention, transformer
from maxscale.model import moe as moe_lib
from maxscale.parallel import sharding
from maxscale.quant import qat
from maxscale.train import checkpoint as ckpt_lib
from maxscale.train import dyn as dyn_lib
from maxscale.train import optim


def cross_entropy(logits_BTV, targets_BT) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT).mean()


@dataclasses.dataclass
class Setup:
    """Everything a run needs, built from a resolved config on a mesh; no files written."""

    cfg: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    model: transformer.ModelDef
    tx: optax.GradientTransformation
    state_shardings: Any
    batch_sharding: jax.sharding.NamedSharding

    @classmethod
    def build(cls, cfg, mesh) -> "Setup":
        dp, k = sharding.data_parallel_size(mesh), cfg.train.microbatches
        if cfg.train.batch_size % dp:
            raise ConfigError(
                f"train.batch_size={cfg.train.batch_size} is not divisible by the data-parallel size "
                f"mesh.data x mesh.fsdp x mesh.expert = {dp}; use a multiple of {dp}"
            )
        if cfg.train.batch_size % (k * dp):  # each slice splits over the devices like the batch
            raise ConfigError(
                f"train.batch_size={cfg.train.batch_size} does not split into train.microbatches={k} slices of a "
                f"multiple of the data-parallel size {dp}; use a batch size that is a multiple of {k * dp}"
            )
        attention.check(cfg, attention.platform_of(mesh))
        dyn_lib.check(cfg)
        model = transformer.ModelDef(cfg, qat.context(cfg, mesh))  # the one Context: mesh, quantizer, kernel
        shapes = {path: tuple(leaf.shape) for path, leaf in _flat(model.abstract_params)}
        sharding.check_divisible(model.specs, shapes, mesh)
        spec_tree = model.spec_tree()
        tx = optim.make_optimizer(cfg, spec_tree)
        param_sh = sharding.param_shardings(spec_tree, mesh, model.abstract_params)
        opt_shapes = jax.eval_shape(tx.init, model.abstract_params)
        rep = sharding.replicated(mesh)
        opt_sh = _mirror_param_shardings(opt_shapes, param_sh, model.abstract_params, rep)
        state_sh = {
            "params": param_sh,
            "opt_state": opt_sh,
            "step": rep,
            "rng": rep,
            "nonfinite_steps": rep,
            "last_nonfinite_step": rep,
        }
        if transformer.is_moe(cfg):
            state_sh["moe_bias"] = rep  # [L_moe, E] routing bias: state, not a parameter (no gradient, no optimizer)
        return cls(cfg, mesh, model, tx, state_sh, sharding.batch_sharding(mesh))

    # -- jitted functions ------------------------------------------------------------------------------------------
    @functools.cached_property
    def init_state(self):
        seed = self.cfg.train.seed
        return jax.jit(lambda: self.initial_state(self.model.init(seed), seed), out_shardings=self.state_shardings)

    def initial_state(self, params, seed: int) -> dict:
        """The train state at step 0 around `params`: a fresh optimizer state, zero counters and routing bias, the
        RNG of `seed` (traceable; init_state jits it, the coordinate check uses it per seed)."""
        return {
            "params": params,
            "opt_state": self.tx.init(params),
            "step": jnp.zeros([], jnp.int32),
            "rng": jax.random.key_data(jax.random.key(seed)),
            "nonfinite_steps": jnp.zeros([], jnp.int32),
            "last_nonfinite_step": jnp.zeros([], jnp.int32),
            **({"moe_bias": jnp.zeros(self.moe_bias_shape, jnp.float32)} if self.moe_bias_shape else {}),
        }

    @property
    def moe_bias_shape(self) -> tuple[int, int] | None:
        """[MoE blocks, experts] of the routing bias; None for a dense model."""
        if not transformer.is_moe(self.cfg):
            return None
        return transformer.stack_depths(self.cfg)["moe_blocks"], self.cfg.model.moe.num_experts

    def abstract_state(self):
        shapes = jax.eval_shape(self.init_state)
        return ckpt_lib.abstract_with_shardings(shapes, self.state_shardings)

    def loss_fn(self, params, tokens_BT1, moe_bias=None):
        """Mean next-token cross-entropy (nats per token)."""
        return self.loss_and_aux(params, tokens_BT1, moe_bias)[1]["ce"]

    def loss_and_aux(self, params, tokens_BT1, moe_bias=None, mults=None, qbits=None):
        """(loss to differentiate, aux): the cross-entropy plus the weighted output z-loss and, for MoE, the
        weighted balance and z losses; aux["ce"] is the cross-entropy alone and aux["moe"] the per-layer routing
        stats. The readout and loss run over chunks of model.loss_chunk_size positions (transformer.readout_loss).
        `mults`, `qbits`: a pack member's forward multipliers and quant widths (Setup.update's hp)."""
        tokens_BT, targets_BT = tokens_BT1[:, :-1], tokens_BT1[:, 1:]
        out, aux = self.model.loss(params, tokens_BT, targets_BT, moe_bias=moe_bias, mults=mults, qbits=qbits)
        ce = out["ce"]
        loss = ce + self.cfg.model.output_z_loss * out["z_loss"] if self.cfg.model.output_z_loss else ce
        if "moe" in aux:
            e = self.cfg.model.moe
            if e.balance == "aux":
                loss = loss + e.aux_loss_weight * aux["moe"]["moe_aux_loss"].mean()
            if e.z_loss_weight:
                loss = loss + e.z_loss_weight * aux["moe"]["moe_z_loss"].mean()
        return loss, {**aux, "ce": ce}

    def update(self, state: dict, tokens_BT1, hp: dict | None = None) -> tuple[dict, dict]:
        """The one training update (pure; traced by train_step for a run, over the members of a pack by
        train/vectorized.py, by the coordinate check): gradients, the finite check, the optimizer, the MoE routing
        bias, the step's metrics. Returns (new state, metrics).

        `hp`: a pack member's hyperparameters that differ between members, as traced arrays: "opt" {optimizer field:
        f32} (optim.make_optimizer's hparams), "peak_lr" f32, "mults" {forward multiplier: f32}, "qbits" {quant kind:
        int32 widths}; None (a single run): the config's constants. A state with "active" (a pack member) is frozen
        once that flag is off, as a diverged member stops."""
        hp = hp or {}
        cfg = self.cfg
        tx = optim.make_optimizer(cfg, self.model.spec_tree(), hp["opt"]) if hp.get("opt") else self.tx
        moe_bias, mults = state.get("moe_bias"), hp.get("mults") or None
        loss, grads, aux = self._gradients(state["params"], tokens_BT1, moe_bias, mults, hp.get("qbits"))
        done = state["step"] + 1
        if cfg.train.debug_nan_at_step:  # fault injection for tests: only this config compiles it in
            poison = jnp.where(done == cfg.train.debug_nan_at_step, jnp.nan, 0.0)
            loss = loss + poison
            grads = jax.tree.map(lambda g: g + poison.astype(g.dtype), grads)
        grad_norm = optax.global_norm(grads)
        # A non-finite step keeps the old params and optimizer state (select on device, no host sync); it is
        # counted, and train.nan_policy decides on the host whether the run stops (faults.NonFiniteWatch).
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        apply = finite & state["active"] if "active" in state else finite
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(apply, a, b), new, old)  # noqa: E731
        new = {
            **state,
            "params": keep(params, state["params"]),
            "opt_state": keep(opt_state, state["opt_state"]),
            "step": done,
            "nonfinite_steps": state["nonfinite_steps"] + jnp.where(finite, 0, 1).astype(jnp.int32),
            "last_nonfinite_step": jnp.where(finite, state["last_nonfinite_step"], done),
        }
        metrics = {}
        if "moe" in aux:  # the routing bias follows this run's (member's) own load
            new["moe_bias"] = keep(self._updated_bias(moe_bias, aux["moe"]), moe_bias)
            metrics.update(moe_step_metrics(aux["moe"]))
        peak_lr = hp.get("peak_lr", cfg.optimizer.lr)
        metrics.update(
            {
                "train/loss": loss,
                "grad_norm": grad_norm,
                "lr": peak_lr * optim.schedule(cfg)(state["step"]),
                "nonfinite_steps": new["nonfinite_steps"],
                "last_nonfinite_step": new["last_nonfinite_step"],
            }
        )
        if cfg.train.dyn_every:  # per-group RMS of weights, gradients, updates (train/dyn.py); fetched on dyn steps
            metrics.update(dyn_lib.weight_metrics(self.model.specs, new["params"], grads, updates))
        return new, metrics

    @functools.cached_property
    def train_step(self):
        """`update` of one run, jitted with the state's shardings; donates the state."""
        rep = sharding.replicated(self.mesh)
        return jax.jit(
            lambda state, tokens_BT1: self.update(state, tokens_BT1),
            in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, rep),
            donate_argnums=0,
        )

    @functools.cached_property
    def dyn_probe(self):
        """The training-dynamics probe (train/dyn.py), compiled once per Setup."""
        return dyn_lib.probe_fn(self)

    def _gradients(self, params, tokens_BT1, moe_bias, mults=None, qbits=None):
        """(cross-entropy, gradients, aux) of the batch. With train.microbatches = k > 1 the batch runs as k slices
        in a scan (one slice's activations live at a time) and the results are their means: equal slices, so the
        mean gradient is the whole batch's. Slice i holds rows i, i + k, ...: every device keeps its own rows
        (a local reshape, no communication). MoE stats (the load the routing bias follows) are means too."""
        grad_fn = jax.value_and_grad(self.loss_and_aux, has_aux=True)
        k = self.cfg.train.microbatches
        if k == 1:
            (_, aux), grads = grad_fn(params, tokens_BT1, moe_bias, mults, qbits)
            return aux["ce"], grads, aux
        B, T1 = tokens_BT1.shape
        slices_kBT1 = tokens_BT1.reshape(B // k, k, T1).swapaxes(0, 1)
        spec = jax.sharding.PartitionSpec(None, *sharding.logical_to_spec(("batch", None), self.mesh))
        slices_kBT1 = jax.lax.with_sharding_constraint(slices_kBT1, jax.sharding.NamedSharding(self.mesh, spec))
        grad_sh = self.state_shardings["params"]

        def one(acc, tokens_BT1):
            part = _sum_part(grad_fn(params, tokens_BT1, moe_bias, mults, qbits))
            part["grads"] = jax.lax.with_sharding_constraint(part["grads"], grad_sh)
            return jax.tree.map(lambda a, x: a + x.astype(jnp.float32), acc, part), None

        part_shapes = jax.eval_shape(lambda t: _sum_part(grad_fn(params, t, moe_bias, mults, qbits)), slices_kBT1[0])
        zero = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), part_shapes)
        total, _ = jax.lax.scan(one, zero, slices_kBT1)
        mean = jax.tree.map(lambda x: x / k, total)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), mean["grads"], params)
        return mean["ce"], grads, {"ce": mean["ce"], **({"moe": mean["moe"]} if "moe" in mean else {})}

    def _updated_bias(self, bias_LE, moe_stats):
        e = self.cfg.model.moe
        if e.balance != "bias":
            return bias_LE
        update = functools.partial(moe_lib.update_bias, rate=e.bias_rate, rule=e.bias_rule, num_active=e.num_active)
        return jax.vmap(update)(bias_LE, moe_stats["moe_load"])  # the load of the global batch, per layer

    def eval_step(self, params, tokens_BT1, moe_bias=None):
        """Cross-entropy of a batch (a replicated scalar). `moe_bias`: the run's routing bias (state["moe_bias"])."""
        if moe_bias is None:
            return self._eval(params, tokens_BT1)
        return self._eval_with_bias(params, tokens_BT1, moe_bias)

    @functools.cached_property
    def _eval(self):
        return jax.jit(
            self.loss_fn,
            in_shardings=(self.state_shardings["params"], self.batch_sharding),
            out_shardings=sharding.replicated(self.mesh),
        )

    @functools.cached_property
    def _eval_with_bias(self):
        rep = sharding.replicated(self.mesh)
        return jax.jit(
            self.loss_fn, in_shardings=(self.state_shardings["params"], self.batch_sharding, rep), out_shardings=rep
        )

    def global_batch(self, local_tokens: np.ndarray) -> jax.Array:
        shape = (self.cfg.train.batch_size, self.cfg.data.seq_len + 1)
        return jax.make_array_from_process_local_data(self.batch_sharding, local_tokens, shape)


def _sum_part(grad_out) -> dict:
    """What one microbatch adds to the accumulator: its gradients, cross-entropy and MoE stats."""
    (_, aux), grads = grad_out
    return {"grads": grads, "ce": aux["ce"], **({"moe": aux["moe"]} if "moe" in aux else {})}


def moe_step_metrics(moe_stats: dict) -> dict:
    """Logged routing metrics from per-layer stats [L_moe, ...]: means over layers, the worst layer's max/mean
    load, and the per-layer, per-expert load [L_moe, E] under `moe/load` (written to moe_load.jsonl)."""
    return {
        "moe/aux_loss": moe_stats["moe_aux_loss"].mean(),
        "moe/z_loss": moe_stats["moe_z_loss"].mean(),
        "moe/load_max": moe_stats["moe_max_load"].max(),
        "moe/dropped_fraction": moe_stats["moe_dropped_fraction"].mean(),
        "moe/router_entropy": moe_stats["moe_router_entropy"].mean(),
        "moe/load": moe_stats["moe_load"],
    }


def _mirror_param_shardings(opt_shapes, param_sh, abstract_params, default):
    """Optimizer-state leaves that mirror a parameter (Adam moments) take its sharding; the rest are replicated."""
    by_path = {
        tuple(path.split("/")): (param_sh_leaf, tuple(abstract_leaf.shape))
        for (path, param_sh_leaf), (_, abstract_leaf) in zip(_flat(param_sh), _flat(abstract_params))
    }

    def pick(key_path, leaf):
        keys = tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in key_path)
        for n in range(len(keys), 0, -1):
            hit = by_path.get(keys[-n:])
            if hit is not None and hit[1] == tuple(leaf.shape):
                return hit[0]
        return default

    return jax.tree_util.tree_map_with_path(pick, opt_shapes)


def _flat(tree, prefix=""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}/")
        else:
            yield f"{prefix}{k}", v


def shape_line(cfg: ml_collections.ConfigDict) -> str:
    """The model's shape for the banner: width x depth, the MoE layout and the quantized formats when set."""
    m, e, q = cfg.model, cfg.model.moe, cfg.quant
    out = f"width {m.width} x depth {m.depth}"
    if e.num_experts:
        layout = f", first {e.first_dense} dense" if e.first_dense else ""
        layout += f", every {e.every}" if e.every > 1 else ""
        shared = f" + {e.num_shared} shared" if e.num_shared else ""
        routing = f"{e.dispatch}, {e.score}, {e.combine}{layout}"
        out += f", MoE {e.num_experts} experts top-{e.num_active}{shared} ({routing})"
    formats = {k: q[k] for k in ("weights", "activations", "kv") if q[k] != "none"}
    if formats:
        out += ", quant " + " ".join(f"{k}={v}" for k, v in formats.items())
    return out
