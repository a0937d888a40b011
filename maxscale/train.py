"""The trainer and `python -m maxscale.train --config=configs/<file>.py[:arg] [--config.a.b=v ...] --workdir=DIR`.

Hot path: params and optimizer state live on the mesh as one pytree; the jitted step has explicit in/out shardings
and donates the state. Metrics of step t are fetched only after step t+1 is dispatched, so logging never stalls the
device. Restarting the same command resumes from the latest checkpoint (state, data iterator, RNG).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from maxscale import checkpoint as ckpt_lib
from maxscale import config as config_lib
from maxscale import data as data_lib
from maxscale import distributed, faults, metrics as metrics_lib, optim, sharding
from maxscale.config import ConfigError
from maxscale.model import transformer

# Fields that may change between a run and its restart; every other field must match the run in the workdir.
RESUMABLE_FIELDS = ("train.steps", "train.eval_every", "train.eval_steps", "train.log_every", "train.sample_tokens",
                    "train.sample_prompt", "train.peak_flops", "checkpoint", "mesh", "distributed", "model.remat",
                    "train.nan_policy", "train.spike_factor", "train.preempt_grace_s", "train.debug_nan_at_step")


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
        if cfg.train.batch_size % sharding.data_parallel_size(mesh):
            dp = sharding.data_parallel_size(mesh)
            raise ConfigError(f"train.batch_size={cfg.train.batch_size} is not divisible by the data-parallel size "
                              f"mesh.data x mesh.fsdp = {dp}; use a multiple of {dp}")
        model = transformer.ModelDef(cfg)
        shapes = {path: tuple(leaf.shape) for path, leaf in _flat(model.abstract_params)}
        sharding.check_divisible(model.specs, shapes, mesh)
        spec_tree = model.spec_tree()
        tx = optim.make_optimizer(cfg, spec_tree)
        param_sh = sharding.param_shardings(spec_tree, mesh, model.abstract_params)
        opt_shapes = jax.eval_shape(tx.init, model.abstract_params)
        rep = sharding.replicated(mesh)
        opt_sh = _mirror_param_shardings(opt_shapes, param_sh, model.abstract_params, rep)
        state_sh = {"params": param_sh, "opt_state": opt_sh, "step": rep, "rng": rep,
                    "nonfinite_steps": rep, "last_nonfinite_step": rep}
        return cls(cfg, mesh, model, tx, state_sh, sharding.batch_sharding(mesh))

    # -- jitted functions ------------------------------------------------------------------------------------------
    @functools.cached_property
    def init_state(self):
        def init():
            params = self.model.init(self.cfg.train.seed)
            return {"params": params, "opt_state": self.tx.init(params), "step": jnp.zeros([], jnp.int32),
                    "rng": jax.random.key_data(jax.random.key(self.cfg.train.seed)),
                    "nonfinite_steps": jnp.zeros([], jnp.int32), "last_nonfinite_step": jnp.zeros([], jnp.int32)}
        return jax.jit(init, out_shardings=self.state_shardings)

    def abstract_state(self):
        shapes = jax.eval_shape(self.init_state)
        return ckpt_lib.abstract_with_shardings(shapes, self.state_shardings)

    def loss_fn(self, params, tokens_BT1):
        with sharding.activation_mesh(self.mesh):
            logits = self.model.apply(params, tokens_BT1[:, :-1])
        return cross_entropy(logits, tokens_BT1[:, 1:])

    @functools.cached_property
    def train_step(self):
        sched = optim.schedule(self.cfg)
        peak_lr = self.cfg.optimizer.lr
        nan_at = self.cfg.train.debug_nan_at_step

        def step(state, tokens_BT1):
            loss, grads = jax.value_and_grad(self.loss_fn)(state["params"], tokens_BT1)
            done = state["step"] + 1
            if nan_at:  # fault injection for tests: only this config compiles it in
                poison = jnp.where(done == nan_at, jnp.nan, 0.0)
                loss = loss + poison
                grads = jax.tree.map(lambda g: g + poison.astype(g.dtype), grads)
            grad_norm = optax.global_norm(grads)
            # A non-finite step keeps the old params and optimizer state (select on device, no host sync); it is
            # counted, and train.nan_policy decides on the host whether the run stops (faults.NonFiniteWatch).
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
            params = optax.apply_updates(state["params"], updates)
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
            new = {"params": keep(params, state["params"]), "opt_state": keep(opt_state, state["opt_state"]),
                   "step": done, "rng": state["rng"],
                   "nonfinite_steps": state["nonfinite_steps"] + jnp.where(finite, 0, 1).astype(jnp.int32),
                   "last_nonfinite_step": jnp.where(finite, state["last_nonfinite_step"], done)}
            metrics = {"train/loss": loss, "grad_norm": grad_norm, "lr": peak_lr * sched(state["step"]),
                       "nonfinite_steps": new["nonfinite_steps"], "last_nonfinite_step": new["last_nonfinite_step"]}
            return new, metrics

        rep = sharding.replicated(self.mesh)
        return jax.jit(step, in_shardings=(self.state_shardings, self.batch_sharding),
                       out_shardings=(self.state_shardings, rep), donate_argnums=0)

    @functools.cached_property
    def eval_step(self):
        return jax.jit(self.loss_fn, in_shardings=(self.state_shardings["params"], self.batch_sharding),
                       out_shardings=sharding.replicated(self.mesh))

    def global_batch(self, local_tokens: np.ndarray) -> jax.Array:
        shape = (self.cfg.train.batch_size, self.cfg.data.seq_len + 1)
        return jax.make_array_from_process_local_data(self.batch_sharding, local_tokens, shape)


def _mirror_param_shardings(opt_shapes, param_sh, abstract_params, default):
    """Optimizer-state leaves that mirror a parameter (Adam moments) take its sharding; the rest are replicated."""
    by_path = {tuple(path.split("/")): (param_sh_leaf, tuple(abstract_leaf.shape))
               for (path, param_sh_leaf), (_, abstract_leaf) in zip(_flat(param_sh), _flat(abstract_params))}

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


# ----------------------------------------------------------------------------------------------------------------
# Sampling

def generate(setup: Setup, params, prompt: str, num_tokens: int, seed: int = 0, temperature: float = 0.8) -> str:
    """Samples `num_tokens` bytes after `prompt` with a window of seq_len tokens (one compiled loop)."""
    tok = data_lib.ByteTokenizer()
    T = setup.cfg.data.seq_len
    ids = tok.encode(prompt)[-T:].astype(np.int32)
    window = np.full((T,), tok.eos_id, np.int32)
    window[T - len(ids):] = ids
    vocab = min(tok.vocab_size, setup.cfg.model.vocab_size)

    @jax.jit
    def run(params, window, key):
        def body(carry, key):
            window = carry
            logits = setup.model.apply(params, window[None])[0, -1, :vocab]
            nxt = jax.random.categorical(key, logits / temperature).astype(jnp.int32)
            return jnp.concatenate([window[1:], nxt[None]]), nxt
        _, out = jax.lax.scan(body, window, jax.random.split(key, num_tokens))
        return out

    with sharding.activation_mesh(setup.mesh):
        out = run(params, jnp.asarray(window), jax.random.key(seed))
    out = np.asarray(jax.device_get(out))
    return prompt + tok.decode(out)


# ----------------------------------------------------------------------------------------------------------------
# The run

def _diff_fields(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        field = f"{prefix}{k}"
        if any(field == f or field.startswith(f + ".") for f in RESUMABLE_FIELDS):
            continue
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff_fields(a, b, field + ".")
        elif a != b and not (isinstance(a, list) and isinstance(b, tuple) and tuple(a) == b):
            out.append(f"{field} {a!r} -> {b!r}")
    return out


def check_workdir(workdir: str, cfg: ml_collections.ConfigDict) -> None:
    """The workdir must be writable and, if it holds a run, a run of the same config: its config.json and its
    newest readable checkpoint (which may come from elsewhere) are both compared. Reads only; ConfigError."""
    probe = workdir
    while not os.path.exists(probe):
        probe = os.path.dirname(os.path.abspath(probe))
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK):
        raise ConfigError(f"--workdir={workdir}: {probe} is not a writable directory; choose another --workdir")
    new = json.loads(config_lib.to_json(cfg))
    existing = os.path.join(workdir, "config.json")
    if os.path.exists(existing):
        try:
            with open(existing) as fh:
                old = json.load(fh)
            if not isinstance(old, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            raise ConfigError(f"--workdir={workdir}: config.json is unreadable ({' '.join(str(e).split())}); "
                              f"restore it (a copy is in each checkpoint's config/metadata) or use a new --workdir") \
                from None
        diff = _diff_fields(old, new)
        if diff:
            raise ConfigError(f"--workdir={workdir} holds a run with a different config ({'; '.join(diff[:3])}); "
                              f"use a new --workdir or the run's own config")
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if os.path.exists(ckpt_dir) and not (os.path.isdir(ckpt_dir) and os.access(ckpt_dir, os.W_OK)):
        raise ConfigError(f"--workdir={workdir}: {ckpt_dir} is not a writable directory; move it away or "
                          f"use a new --workdir")
    saved = ckpt_lib.read_saved_config(ckpt_dir)
    if saved is not None:
        diff = _diff_fields(saved[1], new)
        if diff:
            raise ConfigError(f"--workdir={workdir}: checkpoint {saved[0]} was written with a different config "
                              f"({'; '.join(diff[:3])}) and cannot resume this run; use a new --workdir or move "
                              f"{ckpt_dir} away")


class Trainer:
    def __init__(self, cfg: ml_collections.ConfigDict, workdir: str, mesh=None, corpus=None, setup=None):
        """`setup`: a Setup built from this cfg and mesh, to reuse its compiled functions (tests, notebooks)."""
        self.cfg, self.workdir = cfg, workdir
        self.mesh = mesh if mesh is not None else setup.mesh if setup is not None else sharding.make_mesh(cfg)
        self.setup = setup if setup is not None else Setup.build(cfg, self.mesh)
        self.corpus = corpus if corpus is not None else data_lib.load_corpus(cfg)
        self.primary = jax.process_index() == 0

    def run(self) -> dict:
        """Trains to train.steps, resuming from the newest checkpoint that restores. Returns the last logged
        metrics, `state`, and `preempted` (a signal stopped the run early, after saving). Raises faults.RunStopped
        (NonFiniteError, checkpoint.CheckpointError) when the run cannot go on; earlier checkpoints stay intact."""
        cfg, setup = self.cfg, self.setup
        os.makedirs(self.workdir, exist_ok=True)
        if self.primary:
            _atomic_write(os.path.join(self.workdir, "config.json"), config_lib.to_json(cfg))
        progress = metrics_lib.Progress(cfg.train.steps, enabled=self.primary)
        checkpointer = ckpt_lib.Checkpointer(os.path.join(self.workdir, "checkpoints"), cfg, primary=self.primary)

        pid, pcount = jax.process_index(), jax.process_count()
        data_iter = iter(data_lib.train_dataset(self.corpus, cfg, pid, pcount))
        eval_data = [setup.global_batch(b["tokens"]) for b in data_lib.eval_batches(self.corpus, cfg, pid, pcount)]

        t0 = time.perf_counter()
        start, state = checkpointer.restore_latest(setup.abstract_state(), data_iter,
                                                   report=_warn if self.primary else lambda line: None)
        if start is not None:
            progress.message(f"resumed from {checkpointer.directory} at step {start}")
        else:
            state, start = setup.init_state(), 0
        # metrics.jsonl describes one run: what a killed run logged after its last checkpoint is logged again.
        logged = faults.rewind_metrics(self.workdir, start) if self.primary else []
        writer = metrics_lib.MetricWriter(self.workdir, enabled=self.primary)
        spikes = faults.SpikeDetector(cfg.train.spike_factor)
        for record in logged:
            if "train/loss" in record:
                spikes.observe(record["train/loss"])
        nonfinite = faults.NonFiniteWatch(cfg.train.nan_policy, seen=int(jax.device_get(state["nonfinite_steps"])))

        n_params = transformer.count_params(cfg)
        flops_tok = transformer.flops_per_token(cfg)
        peak, peak_src = metrics_lib.device_peak_flops(cfg.train.peak_flops)
        peak_total = peak * self.mesh.size
        tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
        progress.message(
            f"maxscale: {n_params['total'] / 1e6:.2f}M params ({n_params['non_embedding'] / 1e6:.2f}M non-embedding), "
            f"{cfg.parameterization.name}, mesh {dict(self.mesh.shape)}, {self.mesh.size} x "
            f"{jax.devices()[0].device_kind}, peak {peak / 1e12:.3g} TFLOP/s/device [{peak_src}]; "
            f"data: {self.corpus.description}")

        pending = None  # (step, device metrics) fetched after the next step is dispatched
        last_time, last_step = None, start
        result = {"preempted": False}

        def flush(entry):
            nonlocal last_time, last_step, result
            step, dev_metrics = entry
            values = {k: float(v) for k, v in jax.device_get(dev_metrics).items()}
            last_nonfinite = int(values.pop("last_nonfinite_step"))
            now = time.perf_counter()
            if last_time is None:  # the first logged step includes compilation: no rate yet
                rate, sec_per_step = 0.0, 0.0
            else:
                sec_per_step = (now - last_time) / max(step - last_step, 1)
                rate = tokens_per_step / sec_per_step
            last_time, last_step = now, step
            values.update(tokens_seen=float(step * tokens_per_step), tokens_per_s=rate,
                          mfu=rate * flops_tok / peak_total)
            spike = spikes.observe(values["train/loss"])
            if spike is not None:
                values["loss_spike"] = spike
            writer.write(step, values)
            progress.update(step, values["train/loss"], rate, values["mfu"], sec_per_step)
            result.update(values, step=step)
            if spike is not None:
                progress.message(f"step {step}: loss spike: train/loss {values['train/loss']:.4f} is {spike:.2f}x "
                                 f"its running mean (train.spike_factor={cfg.train.spike_factor:g})")
            note = nonfinite.check(step, int(values["nonfinite_steps"]), last_nonfinite, checkpointer.newest_step())
            if note:
                progress.message(note)

        with faults.PreemptionWatch(cfg.train.preempt_grace_s, pcount) as preempt:
            try:
                for step in range(start, cfg.train.steps):
                    batch = setup.global_batch(next(data_iter)["tokens"])
                    state, dev_metrics = setup.train_step(state, batch)
                    if pending is not None:
                        flush(pending)
                        pending = None
                        checkpointer.poll()
                    done = step + 1
                    stop = done < cfg.train.steps and preempt.requested(done, cfg.train.log_every)
                    save = done % cfg.checkpoint.every == 0 or done == cfg.train.steps or stop
                    if done % cfg.train.log_every == 0 or save or step == start:
                        pending = (done, dev_metrics)
                    if cfg.train.eval_steps and (done % cfg.train.eval_every == 0 or done == cfg.train.steps):
                        if pending is not None:
                            flush(pending)
                            pending = None
                        eval_loss = float(np.mean(jax.device_get([setup.eval_step(state["params"], b)
                                                                  for b in eval_data])))
                        writer.write(done, {"eval/loss": eval_loss})
                        progress.message(f"step {done}: eval/loss {eval_loss:.4f}")
                        result["eval/loss"] = eval_loss
                        last_time = None if last_time is None else time.perf_counter()
                    if save:
                        if pending is not None:  # metrics first: with nan_policy=stop, a non-finite step
                            flush(pending)        # raises here and is never saved
                            pending = None
                        checkpointer.save(done, state, data_iter, cfg)
                    if stop:
                        result["preempted"] = True
                        break
                if pending is not None:
                    flush(pending)
                checkpointer.close()
            except BaseException:
                _close_quietly(checkpointer, writer)  # lets an earlier (good) save still in flight commit
                raise
            if result["preempted"]:
                progress.message(f"{preempt.signal_name}: stopped after step {result['step']} with checkpoint "
                                 f"{result['step']} committed; run the same command again to resume")
            elif (cfg.train.sample_tokens and cfg.data.source != "" and start < cfg.train.steps
                  and preempt.signal_name is None):  # a signal after the last step skips the sample: all is saved
                text = generate(setup, state["params"], cfg.train.sample_prompt, cfg.train.sample_tokens,
                                cfg.train.seed)
                progress.message("sample:\n" + text + "\n")
        elapsed = time.perf_counter() - t0
        if not result["preempted"]:
            progress.message(f"done: {cfg.train.steps} steps in {elapsed / 60:.1f} min; final train/loss "
                             f"{result.get('train/loss', float('nan')):.4f}, eval/loss "
                             f"{result.get('eval/loss', float('nan')):.4f}; run dir {self.workdir}")
        writer.close()
        result["state"] = state
        return result


def _warn(line: str) -> None:
    print(f"maxscale.train: warning: {line}", file=sys.stderr, flush=True)


def _close_quietly(checkpointer, writer) -> None:
    try:
        checkpointer.close()
    except Exception as e:  # noqa: BLE001 - the error being raised is the one to report; mention this one
        _warn(" ".join(str(e).split()))
    writer.close()


def _atomic_write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def main(argv: list[str]) -> int:
    try:
        cfg, flags = config_lib.parse_argv(argv)
        cfg = config_lib.resolve(cfg)
        workdir = flags.get("workdir")
        if not workdir:
            raise ConfigError("--workdir is required, e.g. --workdir=runs/tiny")
        check_workdir(workdir, cfg)
        try:
            distributed.initialize(cfg.distributed)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        trainer = Trainer(cfg, workdir)
    except config_lib.HelpRequested as e:
        print(f"{__doc__.strip()}\n\n{e}\nEvery field and its default: maxscale/config.py (defaults()).")
        return 0
    except ConfigError as e:
        print(f"maxscale.train: error: {e}", file=sys.stderr)
        return config_lib.EXIT_USAGE
    try:
        result = trainer.run()
    except faults.RunStopped as e:  # one line; exit codes in config.py and docs/reliability.md
        print(f"maxscale.train: error: {e}", file=sys.stderr)
        return e.exit_code
    return config_lib.EXIT_PREEMPTED if result["preempted"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
