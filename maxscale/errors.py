"""Errors and exit codes shared by every part of maxscale. Imports nothing of maxscale, so anything may import it.

Exit codes of `python -m maxscale.train` (docs/reliability.md). 75 is sysexits' EX_TEMPFAIL: run it again.
"""

from __future__ import annotations

EXIT_USAGE = 2  # bad config, flag, input file or workdir: one line naming the field and the fix; nothing written
EXIT_NONFINITE = 3  # non-finite loss or gradient with train.nan_policy=stop; the last good checkpoint is kept
EXIT_CHECKPOINT = 74  # a checkpoint save failed (e.g. full disk) or no checkpoint restores; earlier ones are intact
EXIT_PREEMPTED = 75  # SIGTERM/SIGINT: stopped after a step and saved a checkpoint; the same command resumes


class ConfigError(ValueError):
    """A bad config value, override, mesh or input file. The message is one line with the fix."""


class HelpRequested(ConfigError):
    """`--help`: the message is the usage line; CLIs that have more to say print their docstring too."""


class RunStopped(Exception):
    """The run stopped on purpose. The message is one line (what happened, what is intact, what to do);
    `exit_code` is one of the EXIT_* codes above."""

    exit_code = 1
