"""The trainer and `python -m maxscale.train --config=configs/<file>.py[:arg] [--config.a.b=v ...] --workdir=DIR`.

The loop around the pure step (step.py): data, metrics, eval, checkpoints, signals. Metrics of step t are fetched
only after step t+1 is dispatched, so logging never stalls the device. Restarting the same command resumes from
the latest checkpoint (state, data iterator, RNG).
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import ml_collections
import numpy as np

from maxscale import config as config_lib
from maxscale import errors, paths
from maxscale.configdiff import diff_fields
from maxscale.errors import ConfigError
from maxscale.model import transformer
from maxscale.parallel import distributed, sharding
from maxscale.quant import metrics as quant_metrics
from maxscale.quant import qat
from maxscale.train import checkpoint as ckpt_lib
from maxscale.train import checkpoint_tiers, faults, sample
from maxscale.train import data as data_lib
from maxscale.train import dyn as dyn_lib
from maxscale.train import metrics as metrics_lib
from maxscale.train import step as step_lib

# Fields that may change between a run and its restart; every other field must match the run in the workdir.
RESUMABLE_FIELDS = (
    "train.steps",
    "train.eval_every",
    "train.eval_steps",
    "train.log_every",
    "train.dyn_every",
    "train.sample_tokens",
    "train.sample_prompt",
    "train.peak_flops",
    "checkpoint",
    "mesh",
    "distributed",
    "model.remat",
    "train.nan_policy",
    "train.spike_factor",
    "train.preempt_grace_s",
    "train.debug_nan_at_step",
    "metrics",
)


# ----------------------------------------------------------------------------------------------------------------
# The run


def check_workdir(workdir: str, cfg: ml_collections.ConfigDict) -> None:
    """The workdir must be writable and, if it holds a run, a run of the same config: its config.json and its
    newest readable checkpoint (which may come from elsewhere) are both compared. Reads only; ConfigError."""
    problem = paths.writable_dir_problem(workdir)
    if problem:
        raise ConfigError(f"--workdir={workdir}: {problem}; choose another --workdir")
    new = json.loads(config_lib.to_json(cfg))
    existing = paths.join(workdir, "config.json")
    if existing.exists():
        try:
            old = json.loads(existing.read_text())
            if not isinstance(old, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"--workdir={workdir}: config.json is unreadable ({' '.join(str(e).split())}); "
                f"restore it (a copy is in each checkpoint's config/metadata) or use a new --workdir"
            ) from None
        diff = diff_fields(old, new, RESUMABLE_FIELDS, defaults=_default_json())
        if diff:
            raise ConfigError(
                f"--workdir={workdir} holds a run with a different config ({'; '.join(diff[:3])}); "
                f"use a new --workdir or the run's own config"
            )
    ckpt_dir = paths.join(workdir, "checkpoints")
    if not paths.is_url(ckpt_dir) and ckpt_dir.exists() and not (ckpt_dir.is_dir() and os.access(ckpt_dir, os.W_OK)):
        raise ConfigError(
            f"--workdir={workdir}: {ckpt_dir} is not a writable directory; move it away or use a new --workdir"
        )
    saved = ckpt_lib.read_saved_config(ckpt_dir)
    if saved is not None:
        diff = diff_fields(saved[1], new, RESUMABLE_FIELDS, defaults=_default_json())
        if diff:
            raise ConfigError(
                f"--workdir={workdir}: checkpoint {saved[0]} was written with a different config "
                f"({'; '.join(diff[:3])}) and cannot resume this run; use a new --workdir or move "
                f"{ckpt_dir} away"
            )
    checkpoint_tiers.check_local_dir(workdir, cfg, new, RESUMABLE_FIELDS)


def _default_json() -> dict:  # the defaults as JSON: a field added since a run was written, at its default
    return json.loads(config_lib.to_json(config_lib.defaults()))


class Trainer:
    def __init__(self, cfg: ml_collections.ConfigDict, workdir: str, mesh=None, corpus=None, setup=None):
        """`setup`: a Setup built from this cfg and mesh, to reuse its compiled functions (tests, notebooks)."""
        self.cfg, self.workdir = cfg, workdir
        self.mesh = mesh if mesh is not None else setup.mesh if setup is not None else sharding.make_mesh(cfg)
        self.setup = setup if setup is not None else step_lib.Setup.build(cfg, self.mesh)
        self.corpus = corpus if corpus is not None else data_lib.load_corpus(cfg)
        self.primary = jax.process_index() == 0
        checkpoint_tiers.check_shared(cfg, workdir)  # several processes: the local tier must be shared storage

    def run(self) -> dict:
        """Trains to train.steps, resuming from the newest checkpoint that restores. Returns the last logged
        metrics, `state`, and `preempted` (a signal stopped the run early, after saving). Raises faults.RunStopped
        (NonFiniteError, checkpoint.CheckpointError) when the run cannot go on; earlier checkpoints stay intact."""
        cfg, setup = self.cfg, self.setup
        workdir = paths.as_path(self.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        if self.primary:
            paths.write_text_atomic(workdir / "config.json", config_lib.to_json(cfg))
        progress = metrics_lib.Progress(cfg.train.steps, enabled=self.primary)
        checkpointer = checkpoint_tiers.TieredCheckpointer(workdir, cfg, primary=self.primary)

        pid, pcount = jax.process_index(), jax.process_count()
        data_iter = iter(data_lib.train_dataset(self.corpus, cfg, pid, pcount))
        eval_data = [setup.global_batch(b["tokens"]) for b in data_lib.eval_batches(self.corpus, cfg, pid, pcount)]

        t0 = time.perf_counter()
        start, state = checkpointer.restore_latest(
            setup.abstract_state(), data_iter, report=_warn if self.primary else lambda line: None
        )
        if start is not None:
            progress.message(f"resumed from {checkpointer.directory} at step {start}")
        else:
            state, start = setup.init_state(), 0
        # metrics.jsonl describes one run: what a killed run logged after its last checkpoint is logged again.
        logged = faults.rewind_metrics(self.workdir, start) if self.primary else []
        writer = metrics_lib.MetricWriter(
            self.workdir, enabled=self.primary, purge_step=start + 1 if start else 0, config=cfg
        )
        spikes = faults.SpikeDetector(cfg.train.spike_factor)
        for record in logged:
            if "train/loss" in record:
                spikes.observe(record["train/loss"])
        dyn = None  # training-dynamics probe (train/dyn.py): dispatched after the step on dyn steps only
        if cfg.train.dyn_every:
            dyn = dyn_lib.Dynamics(setup, dyn_lib.probe_batch(setup, self.corpus, eval_data, pid, pcount))
            dyn.begin(state, start)
        nonfinite = faults.NonFiniteWatch(cfg.train.nan_policy, seen=int(jax.device_get(state["nonfinite_steps"])))

        n_params = transformer.count_params(cfg)
        flops_tok = transformer.flops_per_token(cfg)
        peak, peak_src = metrics_lib.device_peak_flops(cfg.train.peak_flops)
        peak_total = peak * self.mesh.size
        tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
        progress.message(
            f"maxscale: {n_params['total'] / 1e6:.2f}M params ({n_params['non_embedding'] / 1e6:.2f}M non-embedding"
            + (f", {n_params['active'] / 1e6:.2f}M active" if n_params["active"] != n_params["total"] else "")
            + "), "
            f"{cfg.parameterization.name}, mesh {dict(self.mesh.shape)}, {self.mesh.size} x "
            f"{jax.devices()[0].device_kind}, peak {peak / 1e12:.3g} TFLOP/s/device [{peak_src}]; "
            f"data: {self.corpus.description}"
        )

        # relative quantization error per kind on logged steps (quantized runs only)
        quant_errors = quant_metrics.quant_errors_fn(cfg) if qat.make_quantizer(cfg) is not None else None
        pending = None  # (step, device metrics) fetched after the next step is dispatched
        last_time, last_step = None, start
        result = {"preempted": False}
        for record in logged:  # a resumed run reports the last values logged before it (all of them when complete)
            result.update({k: v for k, v in record.items() if isinstance(v, (int, float))})

        def flush(entry):
            nonlocal last_time, last_step, result
            step, dev_metrics = entry
            values = jax.device_get(dev_metrics)
            load_LE = values.pop("moe/load", None)
            if load_LE is not None:  # per-layer, per-expert load: an array, written beside metrics.jsonl
                writer.write_array(step, "moe_load", load_LE)
            values = {k: float(v) for k, v in values.items()}
            last_nonfinite = int(values.pop("last_nonfinite_step"))
            now = time.perf_counter()
            if last_time is None:  # the first logged step includes compilation: no rate yet
                rate, sec_per_step = 0.0, 0.0
            else:
                sec_per_step = (now - last_time) / max(step - last_step, 1)
                rate = tokens_per_step / sec_per_step
            last_time, last_step = now, step
            values.update(
                tokens_seen=float(step * tokens_per_step), tokens_per_s=rate, mfu=rate * flops_tok / peak_total
            )
            spike = spikes.observe(values["train/loss"])
            if spike is not None:
                values["loss_spike"] = spike
            writer.write(step, values)
            progress.update(step, values["train/loss"], rate, values["mfu"], sec_per_step)
            result.update(values, step=step)
            if spike is not None:
                progress.message(
                    f"step {step}: loss spike: train/loss {values['train/loss']:.4f} is {spike:.2f}x "
                    f"its running mean (train.spike_factor={cfg.train.spike_factor:g})"
                )
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
                    tier = checkpoint_tiers.save_tier(cfg, done, stop)  # persistent, local or None
                    save = tier is not None
                    if done % cfg.train.log_every == 0 or save or step == start or dyn_lib.is_dyn_step(cfg, done):
                        if quant_errors is not None:  # dispatched now, fetched with the step's metrics
                            dev_metrics = {**dev_metrics, **quant_errors(state["params"], batch[:, :-1])}
                        if dyn is not None:  # dyn/ metrics on dyn steps only
                            dev_metrics = dyn.add(dev_metrics, state, done)
                        pending = (done, dev_metrics)
                    if cfg.train.eval_steps and (done % cfg.train.eval_every == 0 or done == cfg.train.steps):
                        if pending is not None:
                            flush(pending)
                            pending = None
                        bias = state.get("moe_bias")
                        losses = [setup.eval_step(state["params"], b, bias) for b in eval_data]
                        eval_loss = float(np.mean(jax.device_get(losses)))
                        writer.write(done, {"eval/loss": eval_loss})
                        progress.message(f"step {done}: eval/loss {eval_loss:.4f}")
                        result["eval/loss"] = eval_loss
                        last_time = None if last_time is None else time.perf_counter()
                    if save:
                        if pending is not None:  # metrics first: with nan_policy=stop, a non-finite step
                            flush(pending)  # raises here and is never saved
                            pending = None
                        checkpointer.save(done, state, data_iter, cfg, tier)
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
                progress.message(
                    f"{preempt.signal_name}: stopped after step {result['step']} with checkpoint "
                    f"{result['step']} committed; run the same command again to resume"
                )
            elif (
                cfg.train.sample_tokens
                and cfg.data.source != ""
                and start < cfg.train.steps
                and preempt.signal_name is None
            ):  # a signal after the last step skips the sample: all is saved
                text = sample.generate(
                    setup,
                    state["params"],
                    cfg.train.sample_prompt,
                    cfg.train.sample_tokens,
                    cfg.train.seed,
                    moe_bias=state.get("moe_bias"),
                )
                progress.message("sample:\n" + text + "\n")
        elapsed = time.perf_counter() - t0
        if not result["preempted"]:
            progress.message(
                f"done: {cfg.train.steps} steps in {elapsed / 60:.1f} min; final train/loss "
                f"{result.get('train/loss', float('nan')):.4f}, eval/loss "
                f"{result.get('eval/loss', float('nan')):.4f}; run dir {self.workdir}"
            )
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
    except errors.HelpRequested as e:
        print(f"{__doc__.strip()}\n\n{e}\nEvery field and its default: maxscale/defaults.py.")
        return 0
    except ConfigError as e:
        print(f"maxscale.train: error: {e}", file=sys.stderr)
        return errors.EXIT_USAGE
    try:
        result = trainer.run()
    except faults.RunStopped as e:  # one line; exit codes in config.py and docs/reliability.md
        print(f"maxscale.train: error: {e}", file=sys.stderr)
        return e.exit_code
    return errors.EXIT_PREEMPTED if result["preempted"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
