"""Checkpoints with orbax: train state (params, optimizer state, step, RNG, fault counters), the data-iterator state,
the config; plus what makes them safe to resume from after any crash.

Each checkpoint is one orbax step directory `<step>/` with three items:
  state   `StandardSave` of the train-state pytree; restored onto the shardings of the *current* mesh, so a
          checkpoint written on one mesh restores onto another
  data    the grain iterator state as JSON. Every process reads rows of the same global batch stream, so the
          state is the same on all of them; one copy restores onto any number of processes (grain's own handler
          writes one file per process and so cannot change the process count)
  config  the resolved config as JSON
and, once the step is known to be committed, `manifest.json`: the size and CRC-32 of every file in it.

Saves are asynchronous in two layers: orbax writes the arrays in its own threads once they are on the host, and one
background thread of ours, started with each save, waits for orbax's commit, hashes the step (up to seconds per GB) and
applies retention. The training thread blocks only for orbax's device-to-host copy (and, at the next save, for the
previous save's thread, normally long finished); errors of that thread surface at the next save, poll or close.
Two tiers (a frequent node-local one and the persistent one) are two Checkpointers: checkpoint_tiers.py.

Safety, in the order things happen (docs/reliability.md has the guarantees and the tests that check them):
  * orbax writes `<step>.orbax-checkpoint-tmp/` and renames it to `<step>/` on commit, so a step directory is
    complete or absent (on gs://, which cannot rename, it writes `<step>/` in place and commits by writing
    commit_success.txt last); leftovers of a killed save are removed when the next Checkpointer opens the directory.
  * orbax's own `max_to_keep` is off: it forgets old steps when a save *starts*. Here old steps are deleted only
    after a newer one has committed and been hashed, by renaming to `<step>.deleting` first (on an object store:
    deleting its commit marker and manifest first), never a half-deleted step that looks whole. Steps in
    `keep_steps` are never deleted.
  * a step without a manifest (killed between commit and hashing: only ever the newest save) is checked by orbax's
    own reads when restored, and hashed in the background once it has restored, so it is checked fully later.
  * a failed save (full disk, permissions) raises CheckpointError naming the step that is still intact.
  * restore verifies the manifest, restores, and checks the step; a step that fails is reported in one line,
    moved aside to `<step>.corrupt`, and the previous one is used. If no step restores, nothing is moved.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import zlib
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from maxscale import errors, paths
from maxscale.errors import RunStopped
from maxscale.train import faults, orbax_quiet  # noqa: F401 - orbax_quiet: orbax's log records, filtered

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "maxscale-checkpoint-manifest-v1"
_STEP_NAME = re.compile(r"(0|[1-9]\d*)")  # orbax's committed step names; tmp, .corrupt and .deleting never match
# orbax rewrites this file after commit (timestamps); restore does not need it, so it is not hashed
_UNHASHED = ("_CHECKPOINT_METADATA",)
COMMIT_FILE = "commit_success.txt"  # gs:// cannot rename: orbax writes `<step>/` in place, commits it by this file


class CheckpointError(RunStopped):
    """A checkpoint could not be written, or none could be read. One line: what failed and what is still intact."""

    exit_code = errors.EXIT_CHECKPOINT


def is_committed(step_dir: epath.Path) -> bool:
    """On local disk the atomic rename to `<step>/` is the commit; on gs:// (where orbax commits by file) the step
    directory exists while orbax writes it, and only COMMIT_FILE, written last, says it is whole."""
    return (step_dir / COMMIT_FILE).exists() if os.fspath(step_dir).startswith("gs://") else step_dir.is_dir()


def committed_steps(directory: str | os.PathLike) -> list[int]:
    """Steps with a committed step directory, ascending (no orbax objects: safe before anything is written)."""
    entries = paths.list_dir(directory)  # [] before anything is written
    return sorted(int(d.name) for d in entries if _STEP_NAME.fullmatch(d.name) and is_committed(d))


def read_saved_config(directory: str | os.PathLike) -> tuple[int, dict] | None:
    """(step, config dict) of the newest committed checkpoint whose config item reads; None if there is none."""
    for step in reversed(committed_steps(directory)):
        try:
            verify_manifest(paths.join(directory, str(step)), only="config/metadata")  # a damaged copy says nothing
            saved = json.loads(paths.join(directory, str(step), "config", "metadata").read_text())
        except Exception:  # noqa: BLE001 - unreadable or damaged (even a bad manifest): restore_newest deals with it
            continue
        if isinstance(saved, dict):
            return step, saved
    return None


def _one_line(e: BaseException, limit: int = 240) -> str:
    text = " ".join(str(e).split())
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _crc32(path: epath.Path) -> int:
    crc = 0
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def write_manifest(step_dir: str | os.PathLike) -> None:
    step_dir = paths.as_path(step_dir)
    files = {}
    for rel, path in paths.walk_files(step_dir):  # epath's own walk loses the gs:// scheme of its roots
        if rel not in (MANIFEST, MANIFEST + ".tmp") and rel not in _UNHASHED:
            files[rel] = [path.stat().length, _crc32(path)]
    paths.write_text_atomic(
        step_dir / MANIFEST, json.dumps({"format": MANIFEST_FORMAT, "files": files}, sort_keys=True)
    )


def verify_manifest(step_dir: str, only: str | None = None) -> None:
    """Raises ValueError naming the first file whose size or CRC-32 differs (`only`: that one file). A step without
    a manifest (killed between commit and hashing) passes: orbax's atomic commit already vouches that it is complete."""
    step_dir = paths.as_path(step_dir)
    path = step_dir / MANIFEST
    if not path.exists():
        return
    manifest = json.loads(path.read_text())
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{MANIFEST} is not a {MANIFEST_FORMAT} file")
    for rel, (size, crc) in sorted(manifest["files"].items()):
        full = step_dir / rel
        if only is not None and rel != only:
            continue
        if not full.is_file():
            raise ValueError(f"{rel} is missing")
        if full.stat().length != size:
            raise ValueError(f"{rel} has {full.stat().length} bytes, expected {size}")
        if _crc32(full) != crc:
            raise ValueError(f"{rel} fails its CRC-32 check")


class Checkpointer:
    def __init__(
        self,
        directory: str | os.PathLike,
        cfg: ml_collections.ConfigDict,
        primary: bool = True,
        read_only: bool = False,
        *,
        max_to_keep: int | None = None,
        keep_steps: Sequence[int] = (),
        barrier_prefix: str | None = None,
        background: bool = True,
    ):
        """`primary`: this process hashes, deletes and moves steps. `read_only`: restore only, touch nothing.
        `directory` may be a URL (gs://...): it reaches orbax as one (maxscale/paths.py). `max_to_keep` (default
        checkpoint.max_to_keep) rolling steps are kept besides `keep_steps`. `barrier_prefix` tells this manager's
        multi-process barriers from another tier's. `background=False` hashes on the caller's thread at the next
        save or poll, as before the background thread existed (tools/bench.py --checkpoint measures both)."""
        self.directory = paths.as_path(directory)
        self.keep = cfg.checkpoint.max_to_keep if max_to_keep is None else max_to_keep
        self.keep_steps = frozenset(int(s) for s in keep_steps)
        self.verify = cfg.checkpoint.verify
        self.async_save = cfg.checkpoint.async_save
        self.primary = primary and not read_only
        self.background = background
        self._pending: int | None = None  # a save that was started and is not yet known to be committed
        self._failed = False  # a save failure was reported (CheckpointError)
        self._job: threading.Thread | None = None  # confirms `_pending` (or hashes a restored step)
        self._error: BaseException | None = None  # what `_job` raised, reported by the training thread
        self._written = threading.Event()  # orbax has finished writing the newest save (its host copy is free)
        self._written.set()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None,  # retention is ours: see the module docstring
            enable_async_checkpointing=self.async_save,
            create=not read_only,
            cleanup_tmp_directories=not read_only and not os.fspath(self.directory).startswith("gs://"),
            read_only=read_only,
            save_interval_steps=0 if read_only else 1,
            multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=barrier_prefix),
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "config"))
        if self.primary:  # leftovers of a killed deletion or gs:// save (there in place of orbax's async cleanup)
            for left in paths.list_dir(self.directory):  # what cannot go now is retried by the next Checkpointer
                if left.name.endswith(".deleting") or (_STEP_NAME.fullmatch(left.name) and not is_committed(left)):
                    paths.remove_tree(left, ignore_errors=True)

    def steps(self) -> list[int]:
        return committed_steps(self.directory)

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def newest_step(self) -> int | None:
        """The step of the newest save started: committed, or in flight and awaited by close()."""
        return self._pending if self._pending is not None else self.latest_step()

    @property
    def in_flight(self) -> bool:
        """A save was started and its outcome not yet reported (by save, poll, finish or close)."""
        return self._pending is not None

    # -- saving ------------------------------------------------------------------------------------------------------
    def save(self, step: int, state: Any, data_iterator: Any, cfg: ml_collections.ConfigDict) -> None:
        """Starts a save; returns once the device arrays are safe to donate (orbax's device-to-host copy), with the
        commit, the manifest and retention left to a background thread.

        First confirms the previous save (CheckpointError if it failed), so at most one save is unconfirmed."""
        self.finish()
        try:
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    data=ocp.args.JsonSave(data_iterator.get_state()),
                    config=ocp.args.JsonSave(cfg.to_dict()),
                ),
                force=True,
            )
        except Exception as e:  # noqa: BLE001 - any failure to write is reported the same way
            raise self._save_failed(step, e) from None
        self._pending = step
        if self.background:
            self._written.clear()
            self._start(lambda: self._confirm(step))
        elif not self.async_save:
            self.finish()

    def poll(self) -> None:
        """Reports a finished save's outcome (CheckpointError if it failed) without waiting for one in progress."""
        if self._pending is None:
            return
        busy = self._job.is_alive() if self._job is not None else self.manager.is_saving_in_progress()
        if not busy:
            self.finish()

    def finish(self) -> None:
        """Waits until the pending save is committed, hashed and retention applied. CheckpointError if it failed."""
        step, self._pending = self._pending, None
        if step is not None and not self.background:
            try:
                self._confirm(step)
            except Exception as e:  # noqa: BLE001
                self._error = e
        if self._job is not None:
            self._job.join()
            self._job = None
        error, self._error = self._error, None
        if error is not None and step is not None:
            raise self._save_failed(step, error) from None

    def wait_written(self) -> None:
        """Waits until orbax has written the pending save (not for its hashing): before another tier's save, so
        at most one host copy of the state is held."""
        if self.background:
            self._written.wait()
        else:
            self.manager.wait_until_finished()

    def _start(self, work: Callable[[], None]) -> None:
        def run():
            try:
                work()
            except BaseException as e:  # noqa: BLE001 - handed to the training thread by finish()
                self._error = e
            finally:
                self._written.set()

        # daemon: a process that ends without close() (killed, os._exit) leaves the step unhashed, which is safe
        self._job = threading.Thread(target=run, name=f"maxscale-checkpoint:{self.directory.name}", daemon=True)
        self._job.start()

    def _confirm(self, step: int) -> None:
        """Waits for orbax's commit of `step`, writes its manifest and deletes what retention no longer keeps."""
        self.manager.wait_until_finished()
        self._written.set()
        step_dir = self.directory / str(step)
        if not is_committed(step_dir):
            raise OSError(f"{step_dir} was not committed")
        if self.primary:
            write_manifest(step_dir)
            rolling = [s for s in self.steps() if s not in self.keep_steps]
            for old in rolling[: -self.keep]:
                try:
                    self._move_aside(old, ".deleting", delete=True)
                except OSError:
                    pass  # still whole (the rename failed): retention tries again after the next save
        self._reload()

    def _reload(self, tries: int = 50) -> None:
        """Refreshes orbax's cached step list. On a non-primary process the primary may be renaming old steps
        aside while orbax lists them (a step listed, then its metadata gone): list again. A step that vanishes
        after a successful listing stays in this process's cache, which is harmless: it is older than any step
        saved later, and restore_newest() reloads after a barrier."""
        for attempt in range(tries):
            try:
                self.manager.reload()
                return
            except FileNotFoundError:
                if attempt == tries - 1:
                    raise
                time.sleep(0.02 * (attempt + 1))

    def _save_failed(self, step: int, e: BaseException) -> CheckpointError:
        self._failed = True
        e = faults.storage_error(e)  # the OS cause (a full disk) first, not cut off at the end of orbax's message
        intact = [s for s in self.steps() if s != step]
        kept = f"the checkpoint at step {intact[-1]} is intact" if intact else "no earlier checkpoint exists"
        return CheckpointError(
            f"saving the checkpoint at step {step} in {self.directory} failed ({_one_line(e)}); "
            f"{kept}; fix the cause (disk space, permissions) and rerun the same command to resume"
        )

    def _move_aside(self, step: int, suffix: str, delete: bool = False) -> str:
        """Renames `<step>/` to `<step><suffix>` (then deletes it if `delete`). An object store renames object by
        object: there it copies, then deletes commit marker and manifest first (no partial step ever looks whole)."""
        source, target, n = self.directory / str(step), self.directory / f"{step}{suffix}", 1
        while target.exists():
            n += 1
            target = self.directory / f"{step}{suffix}{n}"
        if paths.is_url(source):
            if not delete:
                paths.copy_tree(source, target)
            paths.remove_tree(source, first=(COMMIT_FILE, MANIFEST))
            return os.fspath(target)
        source.rename(target)
        if delete:
            paths.remove_tree(target, ignore_errors=True)
        return os.fspath(target)

    # -- restoring ---------------------------------------------------------------------------------------------------
    def restore(self, step: int, abstract_state: Any, data_iterator: Any | None) -> Any:
        """Restores `state` with the shardings in `abstract_state` (ShapeDtypeStructs); sets the iterator in place.

        Verifies the manifest first (when checkpoint.verify) and that the restored state is at `step`."""
        paths.forget_listings(self.directory / str(step))  # another process wrote it: no stale listing of it
        if self.verify:
            verify_manifest(self.directory / str(step))
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items["data"] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        state = restored["state"]
        if isinstance(state, dict) and "step" in state and int(jax.device_get(state["step"])) != step:
            raise ValueError(f"the state inside is at step {int(jax.device_get(state['step']))}")
        if data_iterator is not None:
            data_iterator.set_state(restored["data"])
        return state

    def restore_latest(
        self, abstract_state: Any, data_iterator: Any | None, report: Callable[[str], None]
    ) -> tuple[int | None, Any]:
        """(step, state) of the newest checkpoint that restores, or (None, None) when there is none (see
        restore_newest)."""
        _, step, state = restore_newest([self], abstract_state, data_iterator, report)
        return step, state

    def adopt(self, step: int) -> None:
        """A restored step without a manifest (the run was killed between commit and hashing) is hashed now, in
        the background, so that later restores check it fully."""
        step_dir = self.directory / str(step)
        if self.primary and self.background and not (step_dir / MANIFEST).exists():
            self.finish()
            self._start(lambda: write_manifest(step_dir))

    def restore_config(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def wait(self) -> None:
        self.finish()

    def close(self) -> None:
        try:
            self.finish()
        finally:
            try:
                self.manager.close()
            except Exception:  # noqa: BLE001 - orbax raises a save failure again that was reported once already
                if not self._failed:
                    raise


def restore_newest(
    tiers: Sequence[Checkpointer], abstract_state: Any, data_iterator: Any | None, report: Callable[[str], None]
) -> tuple[Checkpointer | None, int | None, Any]:
    """(checkpointer, step, state) of the newest step in any of `tiers` that restores, or (None, None, None).

    Steps are tried newest first (on a tie, the earlier tier first). Each newer step that fails is reported in one
    line and moved aside as `<step>.corrupt`; if every step fails, nothing is moved and CheckpointError says why (a
    systematic cause, such as a different model, must not cost the run its checkpoints)."""
    candidates = sorted(
        ((step, -i, c) for i, c in enumerate(tiers) for step in c.steps()), key=lambda x: x[:2], reverse=True
    )
    failed = []
    for step, _, ckpt in candidates:
        try:
            state = ckpt.restore(step, abstract_state, data_iterator)
        except Exception as e:  # noqa: BLE001 - whatever is wrong with a step, the previous one may be fine
            failed.append((ckpt, step, _one_line(e)))
            continue
        for bad_ckpt, bad, why in failed:
            moved = bad_ckpt._move_aside(bad, ".corrupt") if bad_ckpt.primary else f"{bad}.corrupt"
            where = "" if bad_ckpt.directory == ckpt.directory else f" in {ckpt.directory}"
            report(
                f"checkpoint {bad} in {bad_ckpt.directory} is unusable ({why}); moved it to "
                f"{os.path.basename(moved)} and resuming from checkpoint {step}{where}"
            )
        if jax.process_count() > 1:  # every process reloads after the primary's moves, not during them
            multihost_utils.sync_global_devices("maxscale: corrupt checkpoints moved aside")
        for c in {id(c): c for c, _, _ in failed}.values():
            c._reload()
        ckpt.adopt(step)
        return ckpt, step, state
    if failed:
        many = len(tiers) > 1
        details = "; ".join(f"step {s}{f' in {c.directory}' if many else ''}: {why}" for c, s, why in failed)
        where = " or ".join(os.fspath(c.directory) for c in tiers)
        raise CheckpointError(
            f"no checkpoint in {where} restores ({details}); move the "
            f"{'directories' if many else 'directory'} away to start the run over, or restore "
            f"{'them' if many else 'it'} from a backup"
        )
    return None, None, None


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def load_state(directory: str, abstract_state: Any, step: int | None = None) -> tuple[int, dict]:
    """Reads one checkpoint's state without a trainer (tools, tests): (step, state as numpy arrays)."""
    cfg = ml_collections.ConfigDict({"checkpoint": {"max_to_keep": 1 << 30, "verify": True, "async_save": False}})
    ckpt = Checkpointer(directory, cfg, read_only=True)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no committed checkpoint in {directory}")
        return step, jax.tree.map(np.asarray, jax.device_get(ckpt.restore(step, abstract_state, None)))
    finally:
        ckpt.close()
