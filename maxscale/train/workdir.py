"""Whether a workdir can take a run: writable, and if it holds a run, a run of the same config that this one
continues (`check_workdir`, called before anything is written)."""

from __future__ import annotations

import json
import os
import sys

import ml_collections

from maxscale import config as config_lib
from maxscale import defaults as schema
from maxscale import paths
from maxscale.configdiff import diff_fields
from maxscale.errors import ConfigError
from maxscale.train import checkpoint as ckpt_lib
from maxscale.train import checkpoint_tiers, optim

RESUMABLE_FIELDS = schema.RESUMABLE_FIELDS  # may change between a run and its restart (declared in defaults.py)


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
        _check_steps(saved[0], saved[1], cfg)
    checkpoint_tiers.check_local_dir(workdir, cfg, new, RESUMABLE_FIELDS)


def _check_steps(step: int, saved: dict, cfg: ml_collections.ConfigDict) -> None:
    """Fewer train.steps than a checkpoint already holds is refused (ConfigError: nothing is rewritten); a changed
    train.steps under a schedule that depends on it is said in one line (the LR curve changes from there on)."""
    steps, old = cfg.train.steps, saved.get("train", {}).get("steps", cfg.train.steps)
    if step > steps:
        raise ConfigError(
            f"train.steps={steps} is below the newest checkpoint's step {step}: the run is past it; set "
            f"train.steps >= {step} to continue it, or use a new --workdir"
        )
    if old != steps and cfg.schedule.name != "constant" and step < steps:
        old_cfg = config_lib.from_json(json.dumps(saved))
        before = cfg.optimizer.lr * float(optim.schedule(old_cfg)(max(step - 1, 0)))
        after = cfg.optimizer.lr * float(optim.schedule(cfg)(step))
        print(
            f"maxscale.train: warning: train.steps {old} -> {steps}: the {cfg.schedule.name} schedule is a function of "
            f"train.steps, so the LR curve changes from step {step + 1} (lr {before:.3g} at step {step}, "
            f"{after:.3g} at step {step + 1}); schedule.name=wsd with a later decay, or constant, continues a run "
            "without a jump",
            file=sys.stderr,
            flush=True,
        )


def _default_json() -> dict:  # the defaults as JSON: a field added since a run was written, at its default
    return json.loads(config_lib.to_json(config_lib.defaults()))
