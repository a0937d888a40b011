"""orbax's log records and leftovers that say nothing to a maxscale user (imported by checkpoint.py).

The leftovers of orbax's abandoned reads when a damaged checkpoint fails to restore: orbax reads a checkpoint's
arrays concurrently on an event loop of its own. When one read fails (a step without a manifest, killed between
commit and hashing, and then truncated), orbax raises at once and closes that loop while the other reads are still
in flight; they end later and Python prints each of them as a traceback on stderr:
  * tensorstore's completion callbacks find the loop closed: `RuntimeError: Event loop is closed` (unraisable);
  * orbax's read coroutines are closed mid-read: `Exception ignored in: <coroutine _read_array_index_...>`;
  * their tasks are collected: `ERROR:asyncio:Task exception was never retrieved` with a traceback.
Hundreds of lines for one damaged step, after restore_newest has already said in one line what was wrong and which
step the run resumed from.

A failed save (a full disk) is the same story: orbax logs the exception with its traceback from each of its
background threads and again when it is waited for (468 lines for one EFBIG), and then re-raises it to the caller,
where Checkpointer reports it in one line naming the step, the OS error and the fix; the sibling writes that failed
with it are reported by asyncio when collected (`_GatheringFuture exception was never retrieved`, with a traceback
each: seen once in a fresh-clone test run) and are dropped like the abandoned reads. Orbax's ERROR records that carry
an exception are therefore dropped: every one of them reaches maxscale as the exception itself. MAXSCALE_ORBAX_LOGS=1
keeps them (debugging orbax). And the read-only notice of _ReadOnlyNotice. Everything else passes to the previous
hook and handlers unchanged.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
import types

from maxscale import paths


def _in_orbax(filename: str) -> bool:
    return "orbax" in filename.replace("\\", "/").split("/")


def _is_orbax_leftover(unraisable) -> bool:
    obj, exc = unraisable.object, unraisable.exc_value
    if isinstance(obj, types.CoroutineType):
        return _in_orbax(obj.cr_code.co_filename)
    if obj is None and isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
        frames = traceback.extract_tb(unraisable.exc_traceback)
        return any(f.name == "call_soon_threadsafe" for f in frames)
    return False


def _hook(previous):
    def hook(unraisable):
        if not _is_orbax_leftover(unraisable):
            previous(unraisable)

    hook.maxscale_orbax_quiet = True
    return hook


class _LostTask(logging.Filter):
    """Drops asyncio's `Task exception was never retrieved` and `_GatheringFuture exception was never retrieved` for
    orbax's own tasks: reads abandoned after a failed read, and the sibling writes of a failed save (a full disk fails
    every fragment write at once; orbax raises one of them and asyncio reports the others when they are collected).
    A task is orbax's when its repr names an orbax file or its exception was raised in one."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "exception was never retrieved" not in str(record.msg).split("\n", 1)[0]:
            return True
        if "orbax" in record.getMessage().replace("\\", "/").split("/"):
            return False
        tb = record.exc_info[2] if record.exc_info else None
        return not (tb is not None and any(_in_orbax(f.filename) for f in traceback.extract_tb(tb)))


class _RaisedAgain(logging.Filter):
    """Drops orbax's ERROR records with an exception attached: orbax raises that exception to its caller too."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and record.exc_info and _in_orbax(record.pathname))


class _ReadOnlyNotice(logging.Filter):
    """Drops orbax's `WARNING:absl:Given directory is read only=<dir>`, which it logs whenever a CheckpointManager is
    opened with read_only=True (every checkpoint-reading tool does, on purpose), where the directory is writable:
    there the warning says nothing about the directory. Other absl messages pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("Given directory is read only") or not record.args:
            return True
        directory = os.fspath(record.args[0])
        return paths.is_url(directory) or not os.access(directory, os.W_OK)


if not getattr(sys.unraisablehook, "maxscale_orbax_quiet", False):
    logging.getLogger("absl").addFilter(_ReadOnlyNotice())
    sys.unraisablehook = _hook(sys.unraisablehook)
    logging.getLogger("asyncio").addFilter(_LostTask())
    if os.environ.get("MAXSCALE_ORBAX_LOGS") != "1":
        logging.getLogger("absl").addFilter(_RaisedAgain())
