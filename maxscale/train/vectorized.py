"""Vectorized runs: K small models that differ only in hyperparameters, trained as one compiled program.

`VectorizedRun(cfgs, run_dirs)` stacks the K members' train states along a leading member axis M and applies the
one training update (step.Setup.update, a single run's, with the member's hyperparameters) over it: vmapped, or one
member after another inside the step on CPU (mesh.member_batch, vectorized_mesh.over_members). The hyperparameters
that differ enter as [M] float32 arrays, so one compilation serves every member, and each step is one dispatch of M
models.

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
                                        and mantissa bits): int32 per member into the fake quantizer (ModelDef.loss(
                                        qbits=...): the bits of a constant width); kinds the same in every member
                                        stay constants. On vs off and int vs float are refused (qat.member_bits)
Anything else that differs is a ConfigError naming the field; train.debug_nan_at_step is not supported. MoE models
are: each member's routing bias (balance=bias) is stacked with its state and updated from its own load, and its
moe/ metrics and moe_load.jsonl are those of its run alone; expert parallelism (mesh.expert > 1) needs the
members on the whole mesh (mesh.members = 1). Where the members live: each on the whole mesh (mesh.members = 1,
the default) or split over groups of devices (mesh.members = n; vectorized_mesh.py says when to choose which).

Each member writes its run directory as a single run does (config.json, metrics.jsonl and TensorBoard with the
same records at the same steps, quant/*_rel_err of quantized runs included; tokens_per_s and mfu are per member,
the pack's are K times these); the caller writes result.json (tools/sweep.py --vectorize). Exactness: a member
equals its run alone up to float32 rounding (vmapped matmuls may sum in another order; one after another, as on
CPU, the 28 runs of docs/transfer.md's benchmark agreed to 1e-7); at LRs near the edge of
stability such differences grow over hundreds of steps as they would between two devices (docs/transfer.md,
"Vectorized sweeps"), sooner in quantized runs, where one ulp can flip a quantization level. A member whose
non-finite count rises at a logged step (train.nan_policy=stop) is stopped exactly where a single run would
stop: its state is frozen (a mask in the state), its metrics end there, and the others go on.

The pack is trained by the one training loop (loop.Trainer; `Single` is a run as a pack of one), so it does all a
single run does: eval, dyn/ metrics (train.dyn_every; each member's probe on a Setup of its own config), quant
errors, MoE load, the sample, both checkpoint tiers of the stacked state under `pack_dir` (checkpoints/ and
checkpoints_local/, checkpoint_tiers.py), which resume the pack exactly after a kill, and preemption: SIGTERM saves
and run_pack raises faults.Preempted (exit 75); the same command resumes the pack.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from maxscale import config as config_lib
from maxscale import defaults as schema
from maxscale import paths
from maxscale.errors import ConfigError
from maxscale.model import transformer
from maxscale.parameterization import Parameterization
from maxscale.quant import metrics as quant_metrics
from maxscale.quant import qat
from maxscale.train import checkpoint as ckpt_lib
from maxscale.train import data as data_lib
from maxscale.train import optim
from maxscale.train import step as step_lib
from maxscale.train import vectorized_mesh as vmesh

OPT_FIELDS = ("lr", "weight_decay", "b1", "b2", "eps")
MULT_FIELDS = ("output_mult", "input_mult", "attn_mult")
# What may differ between members: derived from the config schema (the `pack` kind in maxscale/defaults.py).
VECTORIZABLE = schema.PACKABLE_FIELDS


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


class Single:
    """A single run as loop.Trainer's pack of one: its state as step.Setup keeps it (no member axis, so checkpoints
    and numbers are a single run's, bit for bit), its metrics scalars, a non-finite stop raised (NonFiniteError).
    VectorizedRun answers the same calls for K stacked members."""

    stacked = False

    def __init__(self, cfg: ml_collections.ConfigDict, workdir: str, setup: step_lib.Setup, corpus):
        self.cfg, self.cfgs, self.run_dirs = cfg, [cfg], [workdir]
        self.setup, self.mesh, self.corpus, self.M = setup, setup.mesh, corpus, 1
        self.quantized = qat.make_quantizer(cfg) is not None

    def iterator(self, process_index: int, process_count: int):
        return iter(data_lib.train_dataset(self.corpus, self.cfg, process_index, process_count))

    def batch(self, iterator) -> jax.Array:
        return self.setup.global_batch(next(iterator)["tokens"])

    def abstract_state(self):
        return self.setup.abstract_state()

    def init_state(self):
        return self.setup.init_state()

    def train_step(self, state, batch):
        return self.setup.train_step(state, batch)  # looked up per call: tests wrap it

    def eval_loss(self, state, batch):
        return self.setup.eval_step(state["params"], batch, state.get("moe_bias"))

    def quant_errors(self, state, batch) -> dict:
        if not self.quantized:
            return {}
        if not hasattr(self, "_quant_errors"):
            self._quant_errors = quant_metrics.quant_errors_fn(self.setup.model)
        return self._quant_errors(state["params"], batch[:, :-1], state.get("moe_bias"))

    def counters(self, state) -> tuple[list[int], list[bool]]:
        return [int(jax.device_get(state["nonfinite_steps"]))], [True]

    @staticmethod
    def member(values: dict, i: int) -> dict:
        return values

    def member_state(self, state: dict, i: int) -> dict:
        return state

    def member_setup(self, i: int) -> step_lib.Setup:
        return self.setup


class VectorizedRun:
    """The K members of a pack: their stacked state, the one update over them, their data, eval and quant errors.
    loop.Trainer trains it (`run`) as it trains a single run."""

    stacked = True  # metrics are [M] arrays; a member whose run would stop is frozen and the others go on

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
        # step.Setup.update's per-member hyperparameters: [M, ...] arrays, one row per member
        self.hp = {"opt": self.opt_hp, "peak_lr": self.peak_lr, "mults": self.mults, "qbits": self.qbits}
        self._setups: dict = {}  # member_setup's, by the config less the fields that do not change the forward
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
                model = transformer.ModelDef(c, qat.context(c, self.mesh))
                inits[key] = jax.jit(model.init, out_shardings=self.setup.state_shardings["params"])
            members.append(self._member(i, inits[key](c.train.seed)))
        stack = jax.jit(lambda ms: jax.tree.map(lambda *xs: jnp.stack(xs), *ms), out_shardings=self.state_sh["members"])
        return {"step": jax.device_put(jnp.zeros([], jnp.int32), self.state_sh["step"]), "members": stack(members)}

    # -- the step ----------------------------------------------------------------------------------------------------
    def _member_update(self, member, step, tokens_BT1, hp):
        """One member's step: step.Setup.update on its state (applied over the members by vmesh.over_members)."""
        new, metrics = self.setup.update({**member, "step": step}, tokens_BT1, hp)
        del new["step"]  # the pack's step counter is shared by the members
        return new, metrics

    def train_step(self, state, tokens):
        """The pack's step: the one update over the members; returns (state, {metric: [M]})."""
        if not hasattr(self, "_train_step"):
            data_axis = 0 if self.per_member_data else None
            # spmd_axis_name: the model's sharding constraints keep the member axis on its devices
            in_axes = (0, None, data_axis, 0)
            vstep = vmesh.over_members(self._member_update, in_axes, self.axis, self.member_batch, self.M)

            def step(state, tokens, hp):
                members, metrics = vstep(state["members"], state["step"], tokens, hp)
                return {"step": state["step"] + 1, "members": members}, metrics

            ms = self.member_sh
            self._train_step = jax.jit(
                step,
                in_shardings=(self.state_sh, self.batch_sh, ms),
                out_shardings=(self.state_sh, ms),
                donate_argnums=0,
            )
        return self._train_step(state, tokens, self.hp)

    def eval_loss(self, state: dict, tokens_BT1) -> jax.Array:
        """[M] cross-entropy of one eval batch (the same batch for every member; each with its routing bias)."""
        if not hasattr(self, "_eval"):

            def one(p, b, m, q, t):
                return self.setup.loss_and_aux(p, t, b, m or None, q)[1]["ce"]

            ms, sh = self.member_sh, self.state_sh["members"]
            self._eval = jax.jit(
                jax.vmap(one, in_axes=(0, 0, 0, 0, None), spmd_axis_name=self.axis),
                in_shardings=(sh["params"], ms, ms, ms, self.setup.batch_sharding),
                out_shardings=ms,
            )
        members = state["members"]
        return self._eval(members["params"], members.get("moe_bias"), self.mults, self.qbits, tokens_BT1)

    def quant_errors(self, state: dict, tokens) -> dict:
        """{"quant/<kind>_rel_err": [M]} of each member on its step's batch, as a single run logs them."""
        if not self.quantized:
            return {}
        if not hasattr(self, "_quant_errors"):

            def one(p, b, q, t):
                return quant_metrics.quant_errors(self.setup.model, p, t[:, :-1], b, q)

            ms, sh = self.member_sh, self.state_sh["members"]
            data_axis = 0 if self.per_member_data else None
            self._quant_errors = jax.jit(
                jax.vmap(one, in_axes=(0, 0, 0, data_axis), spmd_axis_name=self.axis),
                in_shardings=(sh["params"], ms, ms, self.batch_sh),
                out_shardings=ms,
            )
        members = state["members"]
        return self._quant_errors(members["params"], members.get("moe_bias"), self.qbits, tokens)

    # -- what the trainer (loop.Trainer) asks of its members ---------------------------------------------------------
    def iterator(self, process_index: int = 0, process_count: int = 1) -> _Iterators:
        """The members' data iterators (one, shared, unless data.seed differs), checkpointed as one item."""
        n = self.M if self.per_member_data else 1
        return _Iterators(
            [iter(data_lib.train_dataset(self.corpus, c, process_index, process_count)) for c in self.cfgs[:n]]
        )

    def batch(self, iterators: _Iterators) -> jax.Array:
        its = iterators.iterators
        if self.per_member_data:
            return jax.device_put(np.stack([next(it)["tokens"] for it in its]), self.batch_sh)
        return jax.device_put(next(its[0])["tokens"], self.batch_sh)

    def abstract_state(self):
        return ckpt_lib.abstract_with_shardings(self.shapes, self.state_sh)

    def counters(self, state) -> tuple[list[int], list[bool]]:
        """Per member: the non-finite step count and whether it is still training."""
        m = jax.device_get({k: state["members"][k] for k in ("nonfinite_steps", "active")})
        return [int(n) for n in m["nonfinite_steps"]], [bool(a) for a in m["active"]]

    def freeze(self, state: dict, active: list[bool]) -> dict:
        """The state with the members not in `active` frozen (their updates are dropped from now on)."""
        on = jax.device_put(np.asarray(active), self.state_sh["members"]["active"])
        return {**state, "members": {**state["members"], "active": on}}

    @staticmethod
    def member(values: dict, i: int) -> dict:
        """Member i's row of fetched [M, ...] metrics."""
        return {k: v[i] for k, v in values.items()}

    def member_state(self, state: dict, i: int) -> dict:
        """Member i's params and routing bias (for its dynamics probe and sample)."""
        pick = {k: state["members"][k] for k in ("params", "moe_bias") if k in state["members"]}
        return jax.tree.map(lambda x: x[i], pick)

    def member_setup(self, i: int) -> step_lib.Setup:
        """A Setup of member i's own config (its forward multipliers, quant widths, seed as constants) on the pack's
        mesh, for the dynamics probe and the sample; shared by members that differ only in optimizer or data seed."""
        flat = _flat(json.loads(config_lib.to_json(self.cfgs[i])))
        key = json.dumps({k: v for k, v in flat.items() if not k.startswith("optimizer.") and k != "data.seed"})
        if key not in self._setups:
            self._setups[key] = step_lib.Setup.build(self.cfgs[i], self.mesh)
        return self._setups[key]
