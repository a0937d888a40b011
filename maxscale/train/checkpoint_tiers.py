"""Two checkpoint tiers and the steps kept forever (docs/reliability.md, section 3).

  persistent  `<workdir>/checkpoints`, every `checkpoint.every` steps, at the end and on preemption, and at each step
              of `checkpoint.keep_steps` (never deleted by retention); `checkpoint.max_to_keep` rolling steps.
  local       `checkpoint.local_dir` (default `<workdir>/checkpoints_local`; may be node-local, e.g. /tmp or an
              NVMe mount), every `checkpoint.local_every` steps that are not persistent saves (0 = off);
              `checkpoint.local_max_to_keep` steps. Cheap to write often; lost with the node.
Restore takes the newest step of either tier that restores intact; a damaged step of either tier is reported in one
line, moved aside as `<step>.corrupt`, and the next older step of either tier is tried (checkpoint.restore_newest).

Each tier is a plain Checkpointer (manifest, retention, background hashing). Only one tier's save holds a host copy
of the state at a time: a save first waits for the other tier's orbax write (not its hashing).

Why not orbax's emergency CheckpointManager (orbax.checkpoint.experimental.emergency, orbax 0.12): it keeps local
checkpoints per slice and restores across slices by broadcasting from a replica that has them, so it needs at least
two data-parallel replicas spread over slices; with one replica (any single-process run, and this CPU setup) it drops
the local directory and saves only the persistent tier. It saves one `state` pytree (not our data-iterator and config
items), applies orbax's own retention (which forgets old steps when a save starts) and knows nothing of manifests.

Several processes: orbax commits a step from process 0 (it creates the tmp directory, every process writes its own
shards into it, process 0 renames it), so every process must see the same local_dir. Node-local directories that
differ per host could only work with per-host commits (orbax's primary_host=None, as the emergency manager does for
its local tier), whose restore then needs the same process topology and every host's directory intact: not
supported. `check_shared` probes for it at start and refuses in one line.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np
from etils import epath

from maxscale import paths
from maxscale.configdiff import diff_fields
from maxscale.errors import ConfigError
from maxscale.train import faults
from maxscale.train.checkpoint import Checkpointer, read_saved_config, restore_newest

PERSISTENT, LOCAL = "persistent", "local"
LOCAL_DEFAULT = "checkpoints_local"  # under the workdir, when checkpoint.local_dir is empty


def local_directory(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike) -> epath.Path | None:
    """The local tier's directory, or None when the tier is off (checkpoint.local_every=0)."""
    c = cfg.checkpoint
    if not c.local_every:
        return None
    return paths.as_path(c.local_dir) if c.local_dir else paths.join(workdir, LOCAL_DEFAULT)


def save_tier(cfg: ml_collections.ConfigDict, step: int, stop: bool) -> str | None:
    """Which tier saves after `step` steps (PERSISTENT, LOCAL or None). `stop`: the run stops after this step."""
    c = cfg.checkpoint
    if step % c.every == 0 or step == cfg.train.steps or stop or step in c.keep_steps:
        return PERSISTENT
    if c.local_every and step % c.local_every == 0:
        return LOCAL
    return None


def check_local_dir(workdir: str, cfg: ml_collections.ConfigDict, new: dict, resumable: Sequence[str]) -> None:
    """Reads only; ConfigError (one line) when the local tier's directory cannot serve this run: not writable, the
    persistent directory itself, or holding a checkpoint of another config (`new`: this run's config as JSON)."""
    local = local_directory(cfg, workdir)
    if local is None:
        return
    field = f"checkpoint.local_dir={cfg.checkpoint.local_dir or local}"
    if local == paths.join(workdir, "checkpoints"):
        raise ConfigError(
            f"{field} is the persistent checkpoint directory; choose another directory, or leave it empty for "
            f"<workdir>/{LOCAL_DEFAULT}"
        )
    problem = paths.writable_dir_problem(local)
    if problem is None and not paths.is_url(local) and local.exists():
        if not (local.is_dir() and os.access(local, os.W_OK)):
            problem = "not a writable directory"
    if problem:
        raise ConfigError(f"{field}: {problem}; choose another checkpoint.local_dir or set checkpoint.local_every=0")
    saved = read_saved_config(local)
    if saved is not None:
        diff = diff_fields(saved[1], new, resumable)
        if diff:
            raise ConfigError(
                f"{field}: checkpoint {saved[0]} there was written with another config "
                f"({'; '.join(diff[:3])}); point checkpoint.local_dir at this run's directory or move {local} away"
            )


def check_shared(cfg: ml_collections.ConfigDict, workdir: str) -> None:
    """With several processes, every process must see the local tier's directory as process 0 does (see the
    module docstring). Process 0 writes a random token there; ConfigError on every process if any cannot read it."""
    local = local_directory(cfg, workdir)
    if local is None or jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    pid = jax.process_index()
    token = int.from_bytes(os.urandom(4), "little") >> 1 if pid == 0 else 0
    token = int(np.asarray(multihost_utils.broadcast_one_to_all(np.int32(token))))
    probe = local / ".maxscale-shared-probe"
    if pid == 0:
        local.mkdir(parents=True, exist_ok=True)
        probe.write_text(str(token))
    multihost_utils.sync_global_devices("maxscale: checkpoint.local_dir probe written")
    try:
        seen = probe.read_text() == str(token)
    except OSError:
        seen = False
    seen_by = np.asarray(multihost_utils.process_allgather(np.int32(seen))).reshape(-1)
    if pid == 0:
        probe.unlink(missing_ok=True)
    blind = [i for i, ok in enumerate(seen_by) if not ok]
    if blind:
        raise ConfigError(
            f"checkpoint.local_dir={local} is not shared: process(es) {', '.join(map(str, blind))} do not see what "
            f"process 0 wrote there, and orbax commits each step from process 0; with several processes put "
            f"checkpoint.local_dir on storage every process sees, run one process, or set checkpoint.local_every=0"
        )


class TieredCheckpointer:
    """The persistent tier and, when checkpoint.local_every > 0, the local one, behind the Checkpointer calls the
    training loop makes (save takes the tier from save_tier)."""

    def __init__(self, workdir: str | os.PathLike, cfg: ml_collections.ConfigDict, primary: bool = True):
        c = cfg.checkpoint
        self.persistent = Checkpointer(paths.join(workdir, "checkpoints"), cfg, primary, keep_steps=c.keep_steps)
        local = local_directory(cfg, workdir)
        self.local = None
        if local is not None:
            self.local = Checkpointer(local, cfg, primary, max_to_keep=c.local_max_to_keep, barrier_prefix="local")
        self.tiers = [t for t in (self.persistent, self.local) if t is not None]
        self.directory = self.persistent.directory  # where the newest restore came from, after restore_latest

    def restore_latest(
        self, abstract_state: Any, data_iterator: Any | None, report: Callable[[str], None]
    ) -> tuple[int | None, Any]:
        ckpt, step, state = restore_newest(self.tiers, abstract_state, data_iterator, report)
        if ckpt is not None:
            self.directory = ckpt.directory
        return step, state

    def save(self, step: int, state: Any, data_iterator: Any, cfg: ml_collections.ConfigDict, tier: str) -> None:
        target = self.local if tier == LOCAL and self.local is not None else self.persistent
        for other in self.tiers:
            if other is not target:
                other.wait_written()
        target.save(step, state, data_iterator, cfg)
        faults.point("final_save" if step == cfg.train.steps else f"{tier}_save")  # orbax writing, not committed

    def poll(self) -> None:
        for t in self.tiers:
            t.poll()

    def newest_step(self) -> int | None:
        steps = [s for s in (t.newest_step() for t in self.tiers) if s is not None]
        return max(steps) if steps else None

    def close(self) -> None:
        """Waits for every tier (each is closed even if another's save failed); raises the first failure."""
        error = None
        for t in self.tiers:
            try:
                t.close()
            except Exception as e:  # noqa: BLE001 - raised below, after the other tier is closed too
                error = error or e
        if error is not None:
            raise error
