"""The trainer: `train(cfg, workdir)`, which `python -m maxscale.train` (command.py) calls once its flags are read.

The loop around the pure step (step.py): data, metrics, eval, checkpoints, signals. Metrics of step t are fetched
only after step t+1 is dispatched, so logging never stalls the device. Restarting the same command resumes from
the latest checkpoint (state, data iterator, RNG).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import time

import jax
import ml_collections
import numpy as np

from maxscale import config as config_lib
from maxscale import errors, paths
from maxscale.errors import ConfigError
from maxscale.model import transformer
from maxscale.parallel import distributed, sharding
from maxscale.train import checkpoint_tiers, faults, sample, vectorized
from maxscale.train import data as data_lib
from maxscale.train import dyn as dyn_lib
from maxscale.train import metrics as metrics_lib
from maxscale.train import step as step_lib
from maxscale.train.workdir import RESUMABLE_FIELDS, check_workdir  # noqa: F401 - part of this module's API

# ----------------------------------------------------------------------------------------------------------------
# The run


class Trainer:
    """The one training loop, for a run or a pack of K runs (`pack`: a vectorized.VectorizedRun): data, metrics and
    TensorBoard per run directory, eval, dynamics, quant errors, MoE load, both checkpoint tiers, preemption,
    non-finite steps and spikes, the sample. Metrics of step t are fetched after step t+1 is dispatched."""

    def __init__(
        self, cfg: ml_collections.ConfigDict, workdir: str, mesh=None, corpus=None, setup=None, pack=None, log=None
    ):
        """`setup`: a Setup built from this cfg and mesh, to reuse its compiled functions (tests, notebooks).
        `pack`: K members trained as one program; `workdir` then holds the pack's checkpoints (the members' run
        directories are the pack's). `log`: where messages go (default: the progress stream)."""
        self.cfg, self.workdir, self.log = cfg, workdir, log
        if pack is not None:
            self.mesh, self.setup, self.corpus, self.members = pack.mesh, pack.setup, pack.corpus, pack
        else:
            self.mesh = mesh if mesh is not None else setup.mesh if setup is not None else sharding.make_mesh(cfg)
            self.setup = setup if setup is not None else step_lib.Setup.build(cfg, self.mesh)
            self.corpus = corpus if corpus is not None else data_lib.load_corpus(cfg)
            self.members = vectorized.Single(cfg, workdir, self.setup, self.corpus)
        self.primary = jax.process_index() == 0
        checkpoint_tiers.check_shared(cfg, workdir)  # several processes: the local tier must be shared storage

    def run(self) -> dict:
        """Trains to train.steps, resuming from the newest checkpoint that restores. Returns the last logged
        metrics, `state`, and `preempted` (a signal stopped the run early, after saving); a pack's per-member
        results are under `members`. Raises faults.RunStopped (NonFiniteError of a single run,
        checkpoint.CheckpointError) when the run cannot go on; earlier checkpoints stay intact."""
        cfg = self.cfg
        t0 = time.perf_counter()
        self._start()
        faults.point("startup")  # restored (or initialised), before the first step (faults.POINTS: chaos moments)
        with faults.PreemptionWatch(cfg.train.preempt_grace_s, jax.process_count()) as preempt:
            try:
                for step in range(self.start, cfg.train.steps):
                    if not any(self.active) or self._step(step, preempt):
                        break
                self._flush()
                self.checkpointer.close()
            except BaseException:
                _close_quietly(self.checkpointer, self.writers)  # lets an earlier (good) save still in flight commit
                raise
            self._finish(preempt)
        if not self.preempted:
            self._say(
                f"done: {cfg.train.steps} steps in {(time.perf_counter() - t0) / 60:.1f} min; final train/loss "
                + ", ".join(f"{r.get('train/loss', float('nan')):.4f}" for r in self.results)
                + ", eval/loss "
                + ", ".join(f"{r.get('eval/loss', float('nan')):.4f}" for r in self.results)
                + f"; run dir {', '.join(map(str, self.members.run_dirs))}"
            )
        for w in self.writers:
            w.close()
        if self.members.stacked:
            return {"members": self.results, "preempted": self.preempted, "state": self.state}
        return {**self.results[0], "preempted": self.preempted, "state": self.state}

    # -- start ---------------------------------------------------------------------------------------------------------
    def _start(self) -> None:
        """Run directories, the checkpointer, data, the restored (or initial) state, writers and watches."""
        cfg, members = self.cfg, self.members
        pid, pcount = jax.process_index(), jax.process_count()
        self.progress = metrics_lib.Progress(cfg.train.steps, enabled=self.primary)
        for c, d in zip(members.cfgs, members.run_dirs):
            paths.as_path(d).mkdir(parents=True, exist_ok=True)
            if self.primary:
                paths.write_text_atomic(paths.join(d, "config.json"), config_lib.to_json(c))
        self.checkpointer = checkpoint_tiers.TieredCheckpointer(self.workdir, cfg, primary=self.primary)
        self.data_iter = members.iterator(pid, pcount)
        self.eval_data = [
            self.setup.global_batch(b["tokens"]) for b in data_lib.eval_batches(self.corpus, cfg, pid, pcount)
        ]
        report = _warn if self.primary else lambda line: None
        start, state = self.checkpointer.restore_latest(members.abstract_state(), self.data_iter, report=report)
        if start is not None:
            self._say(f"resumed from {self.checkpointer.directory} at step {start}")
        else:
            state, start = members.init_state(), 0
        self.start, self.state, self.pending, self.preempted = start, state, None, False
        self.last_time, self.last_step = None, start
        self._open_members(start, state)
        self.dyns = None  # training-dynamics probes (train/dyn.py): dispatched after the step on dyn steps only
        if cfg.train.dyn_every:
            self.dyns = []
            for i in range(members.M):
                setup_i = members.member_setup(i)
                probe = dyn_lib.probe_batch(setup_i, self.corpus, self.eval_data, pid, pcount)
                self.dyns.append(dyn_lib.Dynamics(setup_i, probe))
                self.dyns[-1].begin(members.member_state(state, i), start)
        self._banner()

    def _open_members(self, start: int, state) -> None:
        """Per member: its run log rewound to `start`, writer, spike detector, non-finite watch and result."""
        cfg = self.cfg
        seen, self.active = self.members.counters(state)
        self.writers, self.spikes, self.watches, self.results = [], [], [], []
        for i, (c, d) in enumerate(zip(self.members.cfgs, self.members.run_dirs)):
            # metrics.jsonl describes one run: what a killed run logged after its last checkpoint is logged again.
            logged = faults.rewind_metrics(d, start) if self.primary else []
            purge = start + 1 if start else 0
            self.writers.append(metrics_lib.MetricWriter(d, enabled=self.primary, purge_step=purge, config=c))
            self.spikes.append(faults.SpikeDetector(cfg.train.spike_factor))
            self.watches.append(faults.NonFiniteWatch(cfg.train.nan_policy, seen=seen[i]))
            result = {}
            for record in logged:  # a resumed run reports the last values logged before it (all when complete)
                if "train/loss" in record:
                    self.spikes[i].observe(record["train/loss"])
                result.update({k: v for k, v in record.items() if isinstance(v, (int, float))})
            if not self.active[i]:
                result.update({"train/loss": float("nan"), "eval/loss": float("nan"), "stopped": "diverged"})
            self.results.append(result)

    def _banner(self) -> None:
        cfg = self.cfg
        n_params = transformer.count_params(cfg)
        peak, peak_src = metrics_lib.device_peak_flops(cfg.train.peak_flops)
        self.peak_total = peak * self.mesh.size
        self.flops_tok = transformer.flops_per_token(cfg)
        self.tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
        pack = f"{self.members.M} runs packed, " if self.members.stacked else ""
        self._say(
            f"maxscale: {pack}{n_params['total'] / 1e6:.2f}M params ({n_params['non_embedding'] / 1e6:.2f}M "
            "non-embedding"
            + (f", {n_params['active'] / 1e6:.2f}M active" if n_params["active"] != n_params["total"] else "")
            + "), "
            f"{cfg.parameterization.name}, {step_lib.shape_line(cfg)}, "
            f"mesh {dict(self.mesh.shape)}, {self.mesh.size} x "
            f"{jax.devices()[0].device_kind}, peak {peak / 1e12:.3g} TFLOP/s/device [{peak_src}]; "
            f"data: {self.corpus.description}"
        )

    # -- one step --------------------------------------------------------------------------------------------------
    def _step(self, step: int, preempt: faults.PreemptionWatch) -> bool:
        """Trains step `step` + 1 and does that step's duties; True when the run stops after it (preemption)."""
        cfg, members = self.cfg, self.members
        batch = members.batch(self.data_iter)
        self.state, dev_metrics = members.train_step(self.state, batch)
        faults.point("step")  # the step dispatched, its metrics, eval and save not yet done
        if self.pending is not None:
            self._flush()
            self.checkpointer.poll()
        done = step + 1
        stop = done < cfg.train.steps and preempt.requested(done, cfg.train.log_every)
        tier = checkpoint_tiers.save_tier(cfg, done, stop)  # persistent, local or None
        if done % cfg.train.log_every == 0 or tier or step == self.start or dyn_lib.is_dyn_step(cfg, done):
            dev_metrics = {**dev_metrics, **members.quant_errors(self.state, batch)}  # fetched with the step's
            if not dyn_lib.is_dyn_step(cfg, done):  # dyn/ metrics on dyn steps only
                dev_metrics = {k: v for k, v in dev_metrics.items() if not k.startswith("dyn/")}
            probes = [self._probe(i, done) for i in range(members.M)]
            self.pending = (done, dev_metrics, probes)
        if cfg.train.eval_steps and (done % cfg.train.eval_every == 0 or done == cfg.train.steps):
            self._eval(done)
        if tier:
            self._flush()  # metrics first: with nan_policy=stop, a non-finite step raises here and is never saved
            self.checkpointer.save(done, self.state, self.data_iter, cfg, tier)
        self.preempted = stop
        return stop

    def _probe(self, i: int, done: int) -> dict:
        """Member i's dynamics probe on a dyn step (dispatched now, fetched with the step's metrics), else {}."""
        if self.dyns is None or not self.active[i]:
            return {}
        return self.dyns[i].add({}, self.members.member_state(self.state, i), done)

    def _eval(self, done: int) -> None:
        self._flush()
        losses = [self.members.eval_loss(self.state, b) for b in self.eval_data]
        faults.point("eval")  # the eval losses dispatched, not yet written
        losses = np.mean(np.stack(jax.device_get(losses)), 0)
        for i in range(self.members.M):
            if self.active[i]:
                loss = float(self.members.member({"l": losses}, i)["l"])
                self.writers[i].write(done, {"eval/loss": loss})
                self.results[i]["eval/loss"] = loss
                self._say(f"step {done}: eval/loss {loss:.4f}" + self._who(i))
        self.last_time = None if self.last_time is None else time.perf_counter()

    def _flush(self) -> None:
        """Fetches and writes the pending step's metrics (each member's), then applies the non-finite policy."""
        if self.pending is None:
            return
        (step, dev_metrics, probes), self.pending = self.pending, None
        values, probes = jax.device_get((dev_metrics, probes))
        now = time.perf_counter()
        if self.last_time is None:  # the first logged step includes compilation: no rate yet
            rate, sec_per_step = 0.0, 0.0
        else:
            sec_per_step = (now - self.last_time) / max(step - self.last_step, 1)
            rate = self.tokens_per_step / sec_per_step
        self.last_time, self.last_step = now, step
        timing = dict(tokens_seen=float(step * self.tokens_per_step))
        mfu = rate * self.flops_tok / self.peak_total
        if sec_per_step > 0:  # the first logged step of an attempt has no rate: no speed fields, rather than zeros
            timing.update(tokens_per_s=rate, mfu=mfu)
        stopped = []
        for i in range(self.members.M):
            if self.active[i] and not self._write_member(
                i, step, {**self.members.member(values, i), **probes[i]}, timing
            ):
                stopped.append(i)
        if stopped:
            self.state = self.members.freeze(self.state, self.active)
        first = next((i for i in range(self.members.M) if self.active[i]), None)
        if first is not None and "train/loss" in self.results[first]:
            r = self.results[first]
            extra = ""
            if "moe/dropped_fraction" in r:  # routing at a glance: dropped pairs, worst layer's max/mean load, entropy
                extra = (
                    f"  moe drop {100 * r['moe/dropped_fraction']:.1f}% max load {r['moe/load_max']:.2f}"
                    f" H {r['moe/router_entropy']:.2f}"
                )
            self.progress.update(step, r["train/loss"], rate, mfu, sec_per_step, extra)

    def _write_member(self, i: int, step: int, values: dict, timing: dict) -> bool:
        """Writes member i's metrics of `step`; False when the member stopped there (a pack's nan_policy=stop)."""
        cfg = self.cfg
        load_LE = values.pop("moe/load", None)
        if load_LE is not None:  # per-layer, per-expert load: an array, written beside metrics.jsonl
            self.writers[i].write_array(step, "moe_load", load_LE)
        values = {k: float(v) for k, v in values.items()}
        last_nonfinite = int(values.pop("last_nonfinite_step"))
        values.update(timing)
        spike = self.spikes[i].observe(values["train/loss"])
        if spike is not None:
            values["loss_spike"] = spike
        self.writers[i].write(step, values)
        self.results[i].update(values, step=step)
        if spike is not None:
            self._say(
                f"step {step}: loss spike: train/loss {values['train/loss']:.4f} is {spike:.2f}x "
                f"its running mean (train.spike_factor={cfg.train.spike_factor:g})" + self._who(i)
            )
        try:
            note = self.watches[i].check(
                step, int(values["nonfinite_steps"]), last_nonfinite, self.checkpointer.newest_step()
            )
        except faults.NonFiniteError as e:
            if not self.members.stacked:
                raise
            self.results[i].update({"train/loss": float("nan"), "eval/loss": float("nan"), "stopped": str(e)})
            self.active[i] = False  # this member stops here, as its single run would; the others go on
            self._say(f"member {i} stopped: {e}" + self._who(i))
            return False
        if note:
            self._say(note + self._who(i))
        return True

    # -- the end -----------------------------------------------------------------------------------------------------
    def _finish(self, preempt: faults.PreemptionWatch) -> None:
        """The preemption message, or each member's sample (not after a signal: all is saved)."""
        cfg = self.cfg
        if self.preempted:
            step = self.last_step
            self._say(
                f"{preempt.signal_name}: stopped after step {step} with checkpoint {step} committed; run the same "
                "command again to resume"
            )
            return
        if not (cfg.train.sample_tokens and cfg.data.source != "" and self.start < cfg.train.steps):
            return
        if preempt.signal_name is not None:
            return
        for i in range(self.members.M):
            if self.active[i]:
                state = self.members.member_state(self.state, i)
                c = self.members.cfgs[i]
                text = sample.generate(
                    self.members.member_setup(i),
                    state["params"],
                    c.train.sample_prompt,
                    c.train.sample_tokens,
                    c.train.seed,
                    moe_bias=state.get("moe_bias"),
                )
                self._say("sample" + self._who(i) + ":\n" + text + "\n")

    def _who(self, i: int) -> str:
        """` (member i: its run directory)` in a pack's messages; nothing for a single run."""
        return f" (member {i}: {self.members.run_dirs[i]})" if self.members.stacked else ""

    def _say(self, text: str) -> None:
        (self.log or self.progress.message)(text)


def _warn(line: str) -> None:
    print(f"maxscale.train: warning: {line}", file=sys.stderr, flush=True)


def _close_quietly(checkpointer, writers) -> None:
    try:
        checkpointer.close()
    except Exception as e:  # noqa: BLE001 - the error being raised is the one to report; mention this one
        _warn(" ".join(str(e).split()))
    for w in writers:
        w.close()


def train_pack(pack: vectorized.VectorizedRun, log=print) -> list[dict]:
    """Trains every member of `pack` to train.steps with the one training loop, resuming from the pack's newest
    checkpoint. Returns per member {"train/loss", "eval/loss", "step"[, "stopped"]}; sets `pack.preempted` (a
    signal stopped the pack after saving)."""
    out = Trainer(pack.cfg, pack.pack_dir, pack=pack, log=log).run()
    pack.preempted = out["preempted"]
    return out["members"]


def run_pack(cfgs, run_dirs, write_result, keep_checkpoints=False, corpus=None, mesh=None, log=print) -> list[dict]:
    """Checks each run directory, trains the pack (checkpoints in <sweep>/packs/<hash of the run ids>/, removed
    after unless `keep_checkpoints`) and calls write_result(run_dir, cfg, out, wall_s, True, pack_size=K) for each
    member (tools/sweep.py: the result.json of a single run; wall_s is the pack's time shared out). A signal
    (SIGTERM, SIGINT) saves the pack and raises faults.Preempted (exit code errors.EXIT_PREEMPTED)."""
    for d, cfg in zip(run_dirs, cfgs):
        check_workdir(d, cfg)
    ids = ",".join(os.path.basename(os.path.normpath(d)) for d in run_dirs)
    parent = os.path.dirname(os.path.normpath(run_dirs[0]))
    pack_dir = paths.join(parent, "packs", hashlib.sha256(ids.encode()).hexdigest()[:10])
    t0 = time.perf_counter()
    pack = vectorized.VectorizedRun(cfgs, run_dirs, os.fspath(pack_dir), mesh=mesh, corpus=corpus)
    outs = train_pack(pack, log=log)
    if pack.preempted:  # the checkpoint is committed; the same command resumes the pack (exit 75)
        raise faults.Preempted()
    wall_s = (time.perf_counter() - t0) / len(run_dirs)
    results = [write_result(d, c, o, wall_s, True, pack_size=len(cfgs)) for d, c, o in zip(run_dirs, cfgs, outs)]
    if not keep_checkpoints and pack_dir.exists():
        pack_dir.rmtree()
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(os.fspath(pack_dir)))  # packs/, once empty (a local directory)
    return results


def train(cfg: ml_collections.ConfigDict, workdir: str) -> int:
    """Trains the run of a resolved `cfg` in `workdir` (resuming it); the exit code. `python -m maxscale.train`
    (command.py) reads the command line and the config before it imports this module."""
    check_workdir(workdir, cfg)
    faults.armed()  # a malformed $MAXSCALE_FAULT is refused (exit 2) before anything is written
    try:
        distributed.initialize(cfg.distributed)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    result = Trainer(cfg, workdir).run()
    return errors.EXIT_PREEMPTED if result["preempted"] else 0
