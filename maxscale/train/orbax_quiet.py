"""Silences the leftovers of orbax's abandoned reads when a damaged checkpoint fails to restore.

orbax reads a checkpoint's arrays concurrently on an event loop of its own. When one read fails (a step without a
manifest, killed between commit and hashing, and then truncated), orbax raises at once and closes that loop while
the other reads are still in flight; they end later and Python prints each of them as a traceback on stderr:
  * tensorstore's completion callbacks find the loop closed: `RuntimeError: Event loop is closed` (unraisable);
  * orbax's read coroutines are closed mid-read: `Exception ignored in: <coroutine _read_array_index_...>`;
  * their tasks are collected: `ERROR:asyncio:Task exception was never retrieved` with a traceback.
Hundreds of lines for one damaged step, after restore_newest has already said in one line what was wrong and which
step the run resumed from. Imported for its effect (checkpoint_tiers.py); everything else passes to the previous
hook and handlers unchanged.
"""

from __future__ import annotations

import logging
import sys
import traceback
import types


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
    """Drops asyncio's `Task exception was never retrieved` for orbax's own read tasks."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if not message.startswith("Task exception was never retrieved"):
            return True
        return "orbax" not in record.getMessage().replace("\\", "/").split("/")


if not getattr(sys.unraisablehook, "maxscale_orbax_quiet", False):
    sys.unraisablehook = _hook(sys.unraisablehook)
    logging.getLogger("asyncio").addFilter(_LostTask())
