"""Vectorized runs: K small models that differ only in hyperparameters, trained as one compiled program.

`VectorizedRun(cfgs, run_dirs)` stacks the K members' train states along a leading member axis M and applies the
single-member step (step.py's gradients, optim.py's chain) over it: vmapped, or one member after another inside the
step on CPU (mesh.member_batch, vectorized_mesh.over_members). The hyperparameters that differ enter as [M] float32
arrays, so one compilation serves every member, and each step is one dispatch of M models.

What may differ between members (VECTORIZABLE), and how each is kept exact:
  optimizer.lr weight_decay b1 b2 eps   traced into the optimizer chain (optim.make_optimizer(hparams=...)); only
                                        the fields that differ are traced, the rest stay Python constants
  parameterization.output_mult input_mult attn_mult
                                        the forward multipliers each member's own Parameterization computes,
                                        passed as arrays (ModelDef.loss(mults=...)); the same f32 values
  parameterization.init_std embed_init_std, train.seed
                                        init only: each member is initialised from its own config and seed
  data.seed                             each member reads its own batch stream (stacked [M, B, T+1])
  quant.weights activations kv          the width within one family (int3 int4 int8, or e4m3 e5m2 e2m1: exponent
                                        and mantissa bits): int32 per member into the fake quantizer (qat.traced_bits,
                                        match_constant: the bits of a constant width); kinds the same in every member
                                        stay constants. On vs off and int vs float are refused (qat.member_bits)
Anything else that differs is a ConfigError naming the field; train.debug_nan_at_step is not supported. MoE models
are: each member's routing bias (balance=bias) is stacked with its state and updated from its own load, and its
moe/ metrics and moe_load.jsonl are those of its run alone; expert parallelism (mesh.expert > 1) is refused. Where
the members live: each on the whole mesh (mesh.members = 1, the default) or split over groups of devices
(mesh.members = n; vectorized_mesh.py says when to choose which).

Each member writes its run directory as a single run does (config.json, metrics.jsonl and TensorBoard with the
same records at the same steps, quant/*_rel_err of quantized runs included; tokens_per_s and mfu are per member,
the pack's are K times these); the caller writes result.json (tools/sweep.py --vectorize). Exactness: a member
equals its run alone up to float32 rounding (vmapped matmuls may sum in another order; one after another, as on
CPU, the 28 runs of docs/transfer.md's benchmark agreed to 1e-7); at LRs near the edge of
stability such differences grow over hundreds of steps as they would between two devices (docs/transfer.md,
"Vectorized sweeps"), sooner in quantized runs, where one ulp can flip a quantization level. A member whose
non-finite count rises at a logged step (train.nan_policy=stop) is stopped exactly where a single run would
stop: its state is frozen (a mask in the state), its metrics end there, and the others go on. One orbax
checkpoint of the stacked state (checkpoint.Checkpointer, in `pack_dir`) resumes the pack exactly after a kill.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from maxscale import config as config_lib
from maxscale import paths
from maxscale.errors import ConfigError
from maxscale.model import transformer
from maxscale.parameterization import Parameterization
from maxscale.quant import metrics as quant_metrics
from maxscale.quant import qat
from maxscale.train import checkpoint as ckpt_lib
from maxscale.train import checkpoint_tiers, faults, optim
from maxscale.train import data as data_lib
from maxscale.train import metrics as metrics_lib
from maxscale.train import step as step_lib
from maxscale.train import vectorized_mesh as vmesh

OPT_FIELDS = ("lr", "weight_decay", "b1", "b2", "eps")
MULT_FIELDS = ("output_mult", "input_mult", "attn_mult")
VECTORIZABLE = (
    *(f"optimizer.{f}" for f in OPT_FIELDS),
    *(f"parameterization.{f}" for f in MULT_FIELDS),
    "parameterization.init_std",
    "parameterization.embed_init_std",
    "train.seed",
    "data.seed",
    *(f"quant.{k}" for k in qat.KINDS),  # the bit width within one format family (qat.member_bits)
)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def pack_key(cfg: ml_collections.ConfigDict) -> str:
    """Configs with the same key may share one vectorized run: the resolved config less the VECTORIZABLE fields
    (of quant.weights/activations/kv only the width: the family, none, int or float, stays in the key)."""
    flat = _flat(json.loads(config_lib.to_json(cfg)))
    key = {k: v for k, v in flat.items() if k not in VECTORIZABLE}
    key.update({f"quant.{k}": qat.family(flat[f"quant.{k}"]) for k in qat.KINDS if f"quant.{k}" in flat})
    return json.dumps(key, sort_keys=True)


def packs(runs: list[dict], k: int, log=print) -> list[list[dict]]:
    """Sweep runs ({"config": resolved config, ...}) grouped by pack_key, in order, at most `k` to a group."""
    groups: dict[str, list] = {}
    for r in runs:
        groups.setdefault(pack_key(r["config"]), []).append(r)
    out = [g[i : i + k] for g in groups.values() for i in range(0, len(g), k)]
    log(f"sweep: {len(runs)} runs in {len(out)} vectorized programs of up to {k} (--vectorize={k})")
    return out


PACK_LIST = "packs.txt"


def write_pack_list(runs: list[dict], k: int, sweep_dir: str, log=print) -> int:
    """Writes <sweep_dir>/packs.txt, a pack a line (its run directories joined by commas, as `tools/sweep.py
    --run_dir=` takes them) for the --slurm array of --vectorize=K: one task per pack. Returns the number of packs."""
    lines = "".join(",".join(r["dir"] for r in unit) + "\n" for unit in packs(runs, k, log))
    paths.write_text_atomic(paths.join(sweep_dir, PACK_LIST), lines)
    return lines.count("\n")


def check_members(cfgs: list) -> None:
    """ConfigError (one line) unless the resolved configs differ only in VECTORIZABLE fields and are supported."""
    if not cfgs:
        raise ConfigError("a vectorized run needs at least one member config")
    flats = [_flat(json.loads(config_lib.to_json(c))) for c in cfgs]
    for i, flat in enumerate(flats[1:], 1):
        for field in sorted(set(flat) | set(flats[0])):
            if field not in VECTORIZABLE and flat.get(field) != flats[0].get(field):
                raise ConfigError(
                    f"vectorized run: member {i} differs from member 0 in {field} ({flats[0].get(field)!r} vs "
                    f"{flat.get(field)!r}), which is not vectorizable; only {', '.join(VECTORIZABLE)} may differ"
                )
    qat.member_bits(cfgs)  # quant formats: the same family (on/off, int/float) in every member
    cfg = cfgs[0]
    if cfg.train.debug_nan_at_step:
        raise ConfigError("vectorized run: train.debug_nan_at_step is not supported; set it to 0")


def _differing(values: list) -> bool:
    return any(v != values[0] for v in values)


class _Iterators:
    """The members' data iterators as one object with get_state/set_state (what Checkpointer.save expects)."""

    def __init__(self, iterators: list):
        self.iterators = iterators

    def get_state(self):
        return {"members": [it.get_state() for it in self.iterators]}

    def set_state(self, state):
        for it, s in zip(self.iterators, state["members"]):
            it.set_state(s)


class VectorizedRun:
    def __init__(self, cfgs: list, run_dirs: list[str], pack_dir: str, mesh=None, corpus=None):
        """`cfgs`: resolved member configs; `run_dirs`: one run directory each; `pack_dir`: the pack's checkpoints."""
        check_members(cfgs)
        if len(run_dirs) != len(cfgs):
            raise ConfigError(f"vectorized run: {len(cfgs)} configs but {len(run_dirs)} run directories")
        self.cfgs, self.run_dirs, self.pack_dir = list(cfgs), list(run_dirs), pack_dir
        cfg = self.cfg = cfgs[0]
        M = self.M = len(cfgs)
        self.mesh = mesh if mesh is not None else vmesh.make_mesh(cfg, M)
        vmesh.check(self.mesh, M)
        self.setup = step_lib.Setup.build(cfg, self.mesh)
        self.axis = vmesh.member_axis(self.mesh)  # None: every member on the whole mesh
        self.member_batch = vmesh.member_batch(cfg, M, self.mesh.devices.flat[0].platform)  # side by side in a step
        self.corpus = corpus if corpus is not None else data_lib.load_corpus(cfg)
        self.member_sh = NamedSharding(self.mesh, P(self.axis))  # [M, ...] per-member values
        put = lambda v: jax.device_put(jnp.asarray(v, jnp.float32), self.member_sh)  # noqa: E731
        opt = {f: [float(c.optimizer[f]) for c in cfgs] for f in OPT_FIELDS}
        self.opt_values = {f: v for f, v in opt.items() if _differing(v)}
        self.opt_hp = {f: put(v) for f, v in self.opt_values.items()}
        self.peak_lr = put(opt["lr"])
        mults = [Parameterization(c).multipliers() for c in cfgs]
        self.mults = {k: put([m[k] for m in mults]) for k in mults[0] if _differing([m[k] for m in mults])}
        self.qbits = {k: jax.device_put(v, self.member_sh) for k, v in qat.member_bits(cfgs).items()}  # int32
        self.quantized = qat.make_quantizer(cfg) is not None
        self.per_member_data = _differing([c.data.seed for c in cfgs])
        bs = self.setup.batch_sharding
        self.batch_sh = vmesh.stacked(bs, self.axis) if self.per_member_data else bs
        one = jax.eval_shape(lambda p: self._member(0, p), self.setup.model.abstract_params)
        self.state_sh = vmesh.state_shardings(self.setup, one)
        stack = lambda s: jax.ShapeDtypeStruct((M, *s.shape), s.dtype)  # noqa: E731
        self.shapes = {"step": jax.ShapeDtypeStruct((), jnp.int32), "members": jax.tree.map(stack, one)}

    # -- state -------------------------------------------------------------------------------------------------------
    def _member(self, i: int, params) -> dict:
        """Member i's initial state around its `params` (its optimizer state, RNG, counters, MoE routing bias)."""
        hp = {f: jnp.asarray(v[i], jnp.float32) for f, v in self.opt_values.items()}
        tx = optim.make_optimizer(self.cfg, self.setup.model.spec_tree(), hp or None)
        out = {
            "params": params,
            "opt_state": tx.init(params),
            "rng": jax.random.key_data(jax.random.key(self.cfgs[i].train.seed)),
            "nonfinite_steps": jnp.zeros([], jnp.int32),
            "last_nonfinite_step": jnp.zeros([], jnp.int32),
            "active": jnp.ones([], jnp.bool_),
        }
        if self.setup.moe_bias_shape:  # [MoE blocks, experts]: state beside the params, as in a single run
            out["moe_bias"] = jnp.zeros(self.setup.moe_bias_shape, jnp.float32)
        return out

    def init_state(self) -> dict:
        """The stacked initial state: each member's params from its own config and seed, sharded as the pack's."""
        inits, members = {}, []
        for i, c in enumerate(self.cfgs):
            p = c.parameterization
            key = (p.init_std, p.embed_init_std)
            if key not in inits:  # one compile per distinct init config; the seed is traced
                inits[key] = jax.jit(transformer.ModelDef(c).init, out_shardings=self.setup.state_shardings["params"])
            members.append(self._member(i, inits[key](c.train.seed)))
        stack = jax.jit(lambda ms: jax.tree.map(lambda *xs: jnp.stack(xs), *ms), out_shardings=self.state_sh["members"])
        return {"step": jax.device_put(jnp.zeros([], jnp.int32), self.state_sh["step"]), "members": stack(members)}

    # -- the step ----------------------------------------------------------------------------------------------------
    def _member_step(self, state, step, tokens_BT1, opt_hp, mults, peak_lr, qbits):
        """One member's update (applied over the members by vmesh.over_members); `step`: the steps done so far."""
        setup, cfg = self.setup, self.cfg
        tx = optim.make_optimizer(cfg, setup.model.spec_tree(), opt_hp or None)
        with qat.traced_bits(qbits):  # this member's quant widths, where they differ between members
            loss, grads, aux = setup._gradients(state["params"], tokens_BT1, state.get("moe_bias"), mults or None)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        apply = finite & state["active"]  # a stopped member is frozen
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(apply, a, b), new, old)  # noqa: E731
        done = step + 1
        bad = jnp.where(finite, 0, 1).astype(jnp.int32)
        new = {
            "params": keep(params, state["params"]),
            "opt_state": keep(opt_state, state["opt_state"]),
            "rng": state["rng"],
            "nonfinite_steps": state["nonfinite_steps"] + bad,
            "last_nonfinite_step": jnp.where(finite, state["last_nonfinite_step"], done),
            "active": state["active"],
        }
        metrics = {
            "train/loss": loss,
            "grad_norm": grad_norm,
            "lr": peak_lr * optim.schedule(cfg)(step),
            "nonfinite_steps": new["nonfinite_steps"],
            "last_nonfinite_step": new["last_nonfinite_step"],
        }
        if "moe" in aux:  # the routing bias follows this member's own load (step.Setup.train_step's rule)
            new["moe_bias"] = keep(setup._updated_bias(state["moe_bias"], aux["moe"]), state["moe_bias"])
            metrics.update(step_lib.moe_step_metrics(aux["moe"]))
        return new, metrics

    def train_step(self, state, tokens):
        if not hasattr(self, "_train_step"):
            data_axis = 0 if self.per_member_data else None
            # spmd_axis_name: the model's sharding constraints keep the member axis on its devices
            in_axes = (0, None, data_axis, 0, 0, 0, 0)
            vstep = vmesh.over_members(self._member_step, in_axes, self.axis, self.member_batch, self.M)

            def step(state, tokens, opt_hp, mults, peak_lr, qbits):
                members, metrics = vstep(state["members"], state["step"], tokens, opt_hp, mults, peak_lr, qbits)
                return {"step": state["step"] + 1, "members": members}, metrics

            ms = self.member_sh
            self._train_step = jax.jit(
                step,
                in_shardings=(self.state_sh, self.batch_sh, ms, ms, ms, ms),
                out_shardings=(self.state_sh, ms),
                donate_argnums=0,
            )
        return self._train_step(state, tokens, self.opt_hp, self.mults, self.peak_lr, self.qbits)

    def eval_losses(self, members: dict, tokens_BT1) -> jax.Array:
        """[M] cross-entropy of one eval batch (the same batch for every member; each with its routing bias)."""
        if not hasattr(self, "_eval"):

            def one(p, b, m, q, t):
                with qat.traced_bits(q):
                    return self.setup.loss_and_aux(p, t, b, m or None)[1]["ce"]

            ms, sh = self.member_sh, self.state_sh["members"]
            self._eval = jax.jit(
                jax.vmap(one, in_axes=(0, 0, 0, 0, None), spmd_axis_name=self.axis),
                in_shardings=(sh["params"], ms, ms, ms, self.setup.batch_sharding),
                out_shardings=ms,
            )
        return self._eval(members["params"], members.get("moe_bias"), self.mults, self.qbits, tokens_BT1)

    def quant_errors(self, members: dict, tokens) -> dict:
        """{"quant/<kind>_rel_err": [M]} of each member on its step's batch, as a single run logs them."""
        if not hasattr(self, "_quant_errors"):

            def one(p, q, t):
                with qat.traced_bits(q):
                    return quant_metrics.quant_errors(self.cfg, p, t[:, :-1])

            ms = self.member_sh
            data_axis = 0 if self.per_member_data else None
            self._quant_errors = jax.jit(
                jax.vmap(one, in_axes=(0, 0, data_axis), spmd_axis_name=self.axis),
                in_shardings=(self.state_sh["members"]["params"], ms, self.batch_sh),
                out_shardings=ms,
            )
        return self._quant_errors(members["params"], self.qbits, tokens)

    def _batch(self, iterators):
        if self.per_member_data:
            return jax.device_put(np.stack([next(it)["tokens"] for it in iterators]), self.batch_sh)
        return jax.device_put(next(iterators[0])["tokens"], self.batch_sh)

    # -- the loop ----------------------------------------------------------------------------------------------------
    def run(self, log=print) -> list[dict]:
        """Trains every member to train.steps (resuming from the pack's newest checkpoint). Returns per member
        {"train/loss", "eval/loss", "step"[, "stopped"]} as the trainer's result (loop.Trainer.run) would have."""
        cfg, M = self.cfg, self.M
        for c, d in zip(self.cfgs, self.run_dirs):
            paths.as_path(d).mkdir(parents=True, exist_ok=True)
            paths.write_text_atomic(paths.join(d, "config.json"), config_lib.to_json(c))
        n_iters = M if self.per_member_data else 1
        iterators = [iter(data_lib.train_dataset(self.corpus, c)) for c in self.cfgs[:n_iters]]
        eval_sh = self.setup.batch_sharding
        eval_data = [jax.device_put(b["tokens"], eval_sh) for b in data_lib.eval_batches(self.corpus, cfg)]
        checkpointer = ckpt_lib.Checkpointer(self.pack_dir, cfg)
        abstract = ckpt_lib.abstract_with_shardings(self.shapes, self.state_sh)
        start, state = checkpointer.restore_latest(abstract, _Iterators(iterators), report=log)
        if start is None:
            start, state = 0, self.init_state()
        else:
            log(f"vectorized: resumed {M} members from {self.pack_dir} at step {start}")
        active = [bool(a) for a in jax.device_get(state["members"]["active"])]
        seen = [int(n) for n in jax.device_get(state["members"]["nonfinite_steps"])]
        results, writers, spikes, watches = [], [], [], []
        for i, d in enumerate(self.run_dirs):
            logged = faults.rewind_metrics(d, start)
            writers.append(metrics_lib.MetricWriter(d, purge_step=start + 1 if start else 0, config=self.cfgs[i]))
            spikes.append(faults.SpikeDetector(cfg.train.spike_factor))
            for record in logged:
                if "train/loss" in record:
                    spikes[i].observe(record["train/loss"])
            watches.append(faults.NonFiniteWatch(cfg.train.nan_policy, seen=seen[i]))
            last = next((r for r in reversed(logged) if "train/loss" in r), {})
            results.append({k: v for k, v in last.items() if k != "step"} | ({"step": start} if start else {}))
            if not active[i]:
                results[i].update({"train/loss": float("nan"), "eval/loss": float("nan"), "stopped": "diverged"})
        tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
        flops_tok = transformer.flops_per_token(cfg)
        peak_total = metrics_lib.device_peak_flops(cfg.train.peak_flops)[0] * self.mesh.size
        last_time, last_step = None, start

        def flush(step, dev_metrics):
            nonlocal last_time, last_step, state
            values = jax.device_get(dev_metrics)
            load_MLE = values.pop("moe/load", None)  # per member, layer and expert: moe_load.jsonl, as alone
            now = time.perf_counter()
            rate = 0.0 if last_time is None else tokens_per_step / ((now - last_time) / max(step - last_step, 1))
            last_time, last_step = now, step
            stop = []
            for i in range(M):
                if not active[i]:
                    continue
                v = {k: float(x[i]) for k, x in values.items()}
                last_nonfinite = int(v.pop("last_nonfinite_step"))
                v.update(
                    tokens_seen=float(step * tokens_per_step), tokens_per_s=rate, mfu=rate * flops_tok / peak_total
                )
                spike = spikes[i].observe(v["train/loss"])
                if spike is not None:
                    v["loss_spike"] = spike
                writers[i].write(step, v)
                if load_MLE is not None:
                    writers[i].write_array(step, "moe_load", load_MLE[i])
                results[i].update(v, step=step)
                try:
                    watches[i].check(step, int(v["nonfinite_steps"]), last_nonfinite, checkpointer.newest_step())
                except faults.NonFiniteError as e:  # this member stops here, as its single run would
                    results[i].update({"train/loss": float("nan"), "eval/loss": float("nan"), "stopped": str(e)})
                    active[i] = False
                    stop.append(i)
                    log(f"vectorized: member {i} ({self.run_dirs[i]}) stopped: {e}")
            if stop:
                on = jax.device_put(np.asarray(active), self.state_sh["members"]["active"])
                members = {**state["members"], "active": on}
                state = {**state, "members": members}

        try:
            for step in range(start, cfg.train.steps):
                if not any(active):
                    break
                batch = self._batch(iterators)
                state, dev_metrics = self.train_step(state, batch)
                done = step + 1
                save = checkpoint_tiers.save_tier(cfg, done, False) is not None
                if done % cfg.train.log_every == 0 or save or step == start:
                    if self.quantized:  # relative quantization errors per kind, as a single run logs them
                        dev_metrics = {**dev_metrics, **self.quant_errors(state["members"], batch)}
                    flush(done, dev_metrics)
                if cfg.train.eval_steps and (done % cfg.train.eval_every == 0 or done == cfg.train.steps):
                    losses = np.mean(
                        np.stack(jax.device_get([self.eval_losses(state["members"], b) for b in eval_data])),
                        0,
                    )
                    for i in range(M):
                        if active[i]:
                            writers[i].write(done, {"eval/loss": float(losses[i])})
                            results[i]["eval/loss"] = float(losses[i])
                    last_time = None if last_time is None else time.perf_counter()
                if save:
                    checkpointer.save(done, state, _Iterators(iterators), cfg)
            checkpointer.close()
        finally:
            for w in writers:
                w.close()
        return results


def run_pack(cfgs, run_dirs, write_result, keep_checkpoints=False, corpus=None, mesh=None, log=print) -> list[dict]:
    """Checks each run directory, trains the pack (checkpoints in <sweep>/packs/<hash of the run ids>/, removed
    after unless `keep_checkpoints`) and calls write_result(run_dir, cfg, out, wall_s, True, pack_size=K) for each
    member (tools/sweep.py: the result.json of a single run; wall_s is the pack's time shared out)."""
    from maxscale.train import loop

    for d, cfg in zip(run_dirs, cfgs):
        loop.check_workdir(d, cfg)
    ids = ",".join(os.path.basename(os.path.normpath(d)) for d in run_dirs)
    parent = os.path.dirname(os.path.normpath(run_dirs[0]))
    pack_dir = paths.join(parent, "packs", hashlib.sha256(ids.encode()).hexdigest()[:10])
    t0 = time.perf_counter()
    outs = VectorizedRun(cfgs, run_dirs, os.fspath(pack_dir), mesh=mesh, corpus=corpus).run(log=log)
    wall_s = (time.perf_counter() - t0) / len(run_dirs)
    results = [write_result(d, c, o, wall_s, True, pack_size=len(cfgs)) for d, c, o in zip(run_dirs, cfgs, outs)]
    if not keep_checkpoints and pack_dir.exists():
        pack_dir.rmtree()
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(os.fspath(pack_dir)))  # packs/, once empty (a local directory)
    return results
