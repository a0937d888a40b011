"""What the trainer does about faults: preemption signals, non-finite steps, loss spikes, a run log that describes
one run after a resume, the OS error inside a failed save; and named fault points where tests kill a run on purpose.
docs/reliability.md states the guarantees and names the tests that check them.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import threading

from maxscale import errors, paths
from maxscale.errors import RunStopped
from maxscale.train import metrics as metrics_lib


class NonFiniteError(RunStopped):
    exit_code = errors.EXIT_NONFINITE


def _say(text: str) -> None:
    """Writes a line to stderr without Python's buffered streams (safe inside signal handlers and timers)."""
    os.write(2, f"maxscale.train: {text}\n".encode())


# ----------------------------------------------------------------------------------------------------------------
# Preemption


class PreemptionWatch:
    """SIGTERM and SIGINT ask the run to stop: the handler only sets a flag; the trainer looks at it after each
    step, saves a checkpoint, waits for it to commit and exits with errors.EXIT_PREEMPTED.

    A second signal exits at once, as does the end of the grace period (`train.preempt_grace_s` > 0) counted from
    the first signal: the save in flight is then abandoned, which is safe because a step directory only appears on
    commit, and the previous checkpoint is intact. Handlers are installed only in the main thread and the previous
    ones are restored on exit. With several processes the flag is combined across processes at log steps, so all
    of them stop at the same step.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, grace_s: float = 0.0, process_count: int = 1):
        self.grace_s, self.process_count = grace_s, process_count
        self.signal_name: str | None = None
        self._previous: dict = {}
        self._timer: threading.Timer | None = None

    def __enter__(self) -> "PreemptionWatch":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if self._timer is not None:
            self._timer.cancel()

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is not None:
            _say(f"second signal ({name}): exiting now; the last committed checkpoint is intact")
            os._exit(errors.EXIT_PREEMPTED)
        self.signal_name = name
        if self.grace_s > 0:
            self._timer = threading.Timer(self.grace_s, self._expire)
            self._timer.daemon = True
            self._timer.start()

    def _expire(self) -> None:
        _say(
            f"the preemption grace period (train.preempt_grace_s={self.grace_s:g}) ran out before the checkpoint "
            f"committed; exiting; the last committed checkpoint is intact"
        )
        os._exit(errors.EXIT_PREEMPTED)

    def requested(self, step: int, log_every: int) -> bool:
        if self.process_count == 1:
            return self.signal_name is not None
        if step % log_every:
            return False
        import numpy as np
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.int32(self.signal_name is not None))
        return bool(np.any(flags))


class Preempted(SystemExit):
    """A signal stopped a pack (loop.run_pack) after its checkpoint committed: no result is written and the
    process exits with errors.EXIT_PREEMPTED, as a single run's does; a sweep run in-process stops there too (a
    SystemExit, not an Exception: the sweep must not go on to the next pack after a preemption signal)."""

    def __init__(self):
        super().__init__(errors.EXIT_PREEMPTED)


# ----------------------------------------------------------------------------------------------------------------
# Numerical faults


class NonFiniteWatch:
    """Reads the device's count of non-finite steps (loss or gradient norm NaN/Inf; their updates are never
    applied) as metrics arrive. Policy `skip`: a message per newly skipped batch of steps. Policy `stop`:
    NonFiniteError, before any checkpoint holding those steps is written."""

    def __init__(self, policy: str, seen: int = 0):
        self.policy, self.seen = policy, seen

    def check(self, step: int, count: int, last_step: int, last_checkpoint: int | None) -> str | None:
        if count <= self.seen:
            return None
        new, self.seen = count - self.seen, count
        if self.policy == "skip":
            return (
                f"step {step}: skipped {new} update(s) with a non-finite loss or gradient (last at step "
                f"{last_step}; {count} in this run; train.nan_policy=skip)"
            )
        kept = f"the last good checkpoint is step {last_checkpoint}" if last_checkpoint else "no checkpoint was written"
        raise NonFiniteError(
            f"non-finite loss or gradient at step {last_step} (train.nan_policy=stop); stopped "
            f"without saving; {kept}; lower optimizer.lr, raise optimizer.grad_clip, or rerun with "
            f"--config.train.nan_policy=skip to skip such steps"
        )


class SpikeDetector:
    """A logged train loss above `factor` x the running mean (EMA) of the logged losses before it is a spike.

    Deterministic given the logged losses, so a resumed run replays the kept log and flags the same steps."""

    def __init__(self, factor: float, warmup: int = 5, decay: float = 0.8):
        self.factor, self.warmup, self.decay = factor, warmup, decay
        self.mean, self.count = 0.0, 0

    def observe(self, loss: float) -> float | None:
        """The loss / running-mean ratio when `loss` is a spike, else None."""
        if not self.factor or not math.isfinite(loss):
            return None
        ratio = loss / self.mean if self.count >= self.warmup and self.mean > 0 else None
        self.mean = loss if self.count == 0 else self.decay * self.mean + (1 - self.decay) * loss
        self.count += 1
        return ratio if ratio is not None and ratio > self.factor else None


# ----------------------------------------------------------------------------------------------------------------
# The run log


def rewind_metrics(workdir: str, step: int) -> list[dict]:
    """Keeps the records of metrics.jsonl up to `step` (the checkpoint a run resumes from) and drops the rest:
    steps a killed run logged past its last checkpoint, which the resumed run logs again, and a torn last line.
    Atomic (write + rename), so the file always describes one run. Returns the records kept."""
    path = paths.join(workdir, "metrics.jsonl")
    if not path.exists():
        return []
    kept = [r for r in metrics_lib.read_metrics(workdir) if r.get("step", math.inf) <= step]
    paths.write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))  # the writer's own format
    return kept


# ----------------------------------------------------------------------------------------------------------------
# Named fault points (chaos at chosen moments)

FAULT_ENV = "MAXSCALE_FAULT"
# The moments a run can be killed at, in the order a run meets them: after start-up (the checkpoint restored, before
# the first step), after a step is dispatched (before its metrics, eval and save), during eval (its losses
# dispatched, not yet written), and just after a save of either tier started (orbax still writing, nothing
# committed): a periodic or preemption save of the persistent tier, a local-tier save, the save of the last step.
POINTS = ("startup", "step", "eval", "persistent_save", "local_save", "final_save")
_hits: dict[str, int] = {}


def parse_fault(spec: str) -> tuple[str, int, signal.Signals]:
    """`<point>[@<n-th hit>][:<signal>]` -> (point, n, signal); ConfigError (one line) for anything else."""
    usage = f"{FAULT_ENV}={spec!r}: expected <point>[@<n>][:<signal>] with <point> one of {', '.join(POINTS)}"
    rest, _, sig_name = spec.partition(":")
    name, at, nth = rest.partition("@")
    try:
        n = int(nth) if at else 1
        sig_name = (sig_name or "SIGKILL").upper()
        sig = signal.Signals[sig_name if sig_name.startswith("SIG") else "SIG" + sig_name]
    except (ValueError, KeyError):
        raise errors.ConfigError(f"{usage}, <n> >= 1 and <signal> a name such as SIGKILL or SIGTERM") from None
    if name not in POINTS or n < 1:
        raise errors.ConfigError(f"{usage} and <n> >= 1; unset {FAULT_ENV} to run without a fault")
    return name, n, sig


def armed() -> tuple[str, int, signal.Signals] | None:
    """The fault point named by $MAXSCALE_FAULT, parsed (ConfigError when malformed), or None."""
    spec = os.environ.get(FAULT_ENV)
    return parse_fault(spec) if spec else None


def point(name: str) -> None:
    """A named moment of the run (POINTS). A no-op unless $MAXSCALE_FAULT names it: then its n-th hit in this process
    writes `maxscale.train: fault point <name> hit <n>: killing with <signal>` to stderr and sends the signal to this
    process (the style of FreeBSD's fail points and etcd's gofail). The chaos tool's moments mode and
    tests/test_chaos_moments.py use it to kill at an exact moment rather than after a random delay."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    target, n, sig = parse_fault(spec)
    if name != target:
        return
    _hits[name] = hit = _hits.get(name, 0) + 1
    if hit == n:
        _say(f"fault point {name} hit {hit}: killing with {sig.name}")
        os.kill(os.getpid(), sig)


# ----------------------------------------------------------------------------------------------------------------
# Storage failures

_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


def storage_error(e: BaseException) -> BaseException:
    """The operating system's error inside a failed checkpoint write, as an OSError that names it first: orbax
    passes on tensorstore's long message (`Error writing "params/..." in OCDBT database at local file "...": ...
    File too large [os_error_code='27']`), whose cause would be cut off at the end of a one-line report. `e` itself
    when it holds no OS error code."""
    if isinstance(e, OSError) and e.errno:
        return e
    m = _OS_ERROR_CODE.search(str(e))
    return OSError(int(m.group(1)), os.strerror(int(m.group(1)))) if m else e
