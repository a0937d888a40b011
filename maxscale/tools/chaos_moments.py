"""Chaos at named moments: `maxscale chaos --moments=...` (maxscale/tools/chaos.py is the command line).

Where the random chaos of chaos.py kills after a random delay and cannot say where the kill landed, this mode kills
at a named fault point of the trainer (maxscale/train/faults.py: startup, step, eval, persistent_save, local_save,
final_save; `<point>[@<n-th hit>][:<signal>]`, $MAXSCALE_FAULT of the child). A *round* is a chain of kills
joined by `+` in one fresh workdir: each attempt runs the same command with the next fault armed, the last one runs
without a fault to the end. Per kill it reports whether it landed (the fault point's line was printed and the
process died by the signal, or exited 75 after a SIGTERM), the newest committed step of either checkpoint tier
after it, the step the next attempt resumed from (must be that one), whether an uncommitted orbax tmp directory
was left (the kill landed inside a write), and the killed attempt's records against the reference; per round the
divergences from the uninterrupted reference run (records and final state, bit for bit: must be 0).
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import Callable

from maxscale import config as config_lib
from maxscale import errors
from maxscale.tools import run_compare
from maxscale.train import faults

# Short runs with every save tier and an eval: steps 1..12, local saves at 3, 6, 9, persistent at 4, 8 and the final
# 12, evals at 6 and 12, every step logged. The caller's overrides come after these and win.
MOMENT_OVERRIDES = (
    "--config.train.steps=12",
    "--config.train.log_every=1",
    "--config.checkpoint.every=4",
    "--config.checkpoint.local_every=3",
    "--config.checkpoint.max_to_keep=2",
    "--config.train.eval_every=6",
    "--config.train.eval_steps=1",
    "--config.train.sample_tokens=0",
    "--config.data.max_bytes=300000",
)
# Every moment once, in an order where each resume step is fixed by the trainer's save ordering (a save starts only
# once the other tier's write and this tier's previous save are done), not by timing. With MOMENT_OVERRIDES the
# attempts resume at 0, 3, 3, 3, 4, 4, 9 (RESUME_STEPS).
ALL_MOMENTS = "local_save+persistent_save+step+startup+local_save+eval+final_save"
RESUME_STEPS = (0, 3, 3, 3, 4, 4, 9)
_RESUMED = re.compile(r"resumed from \S+ at step (\d+)")


@dataclasses.dataclass
class Kill:
    spec: str
    landed: bool = False  # the fault point's line is in the log and the exit is the signal's
    exit: int | None = None
    committed: int = 0  # newest committed step of either tier after the kill (0: none)
    resumed: int | None = None  # the step the next attempt resumed from (0: started over)
    tmp_left: bool = False  # an uncommitted orbax tmp directory was left behind
    records: int = 0  # records the killed attempt left, compared with the reference
    mismatched: int = 0

    def line(self) -> str:
        return (
            f"{self.spec}: landed {'yes' if self.landed else 'NO'} (exit {self.exit}), checkpoint {self.committed}"
            f"{' (uncommitted tmp left)' if self.tmp_left else ''}, resumed at {self.resumed}, "
            f"records {self.records - self.mismatched}/{self.records} equal"
        )


@dataclasses.dataclass
class Round:
    chain: str
    kills: list = dataclasses.field(default_factory=list)
    final_exit: int | None = None
    records: int = 0  # the finished round's records, compared with the reference
    divergences: int = 0  # differing or missing records (killed attempts' and the round's) + a different final state
    state_identical: bool = False
    failures: list = dataclasses.field(default_factory=list)

    def line(self) -> str:
        landed = sum(k.landed for k in self.kills)
        return (
            f"round {self.chain}: kills={len(self.kills)} landed={landed} final exit {self.final_exit}, "
            f"records={self.records} divergences={self.divergences} final state "
            f"{'identical' if self.state_identical else 'DIFFERENT'} failures={len(self.failures)}"
        )


def parse_rounds(text: str) -> list[str]:
    """`all` or `<spec>[+<spec>...][,<round>...]` -> the rounds' chains; ConfigError naming --moments otherwise."""
    rounds = [r.strip() for r in text.split(",") if r.strip()]
    rounds = [ALL_MOMENTS if r == "all" else r for r in rounds]
    if not rounds:
        raise errors.ConfigError("--moments is empty; use --moments=all or e.g. --moments=step@5+startup,eval")
    for r in rounds:
        for spec in r.split("+"):
            try:
                faults.parse_fault(spec)
            except errors.ConfigError as e:
                raise errors.ConfigError(f"--moments: {str(e).replace(faults.FAULT_ENV + '=', '')}") from None
    return rounds


def _resumed(out: str) -> int:
    """The step an attempt's log says it resumed from; 0 when it started over."""
    m = _RESUMED.search(out)
    return int(m.group(1)) if m else 0


def _committed(workdir: str) -> tuple[int, bool]:
    """(newest committed step of either tier or 0, whether an uncommitted orbax tmp directory is left)."""
    from maxscale.train import checkpoint, checkpoint_tiers

    with open(os.path.join(workdir, "config.json")) as fh:
        cfg = config_lib.from_json(fh.read())
    dirs = [os.path.join(workdir, "checkpoints")]
    local = checkpoint_tiers.local_directory(cfg, workdir)
    dirs += [os.fspath(local)] if local is not None else []
    steps = [s for d in dirs for s in checkpoint.committed_steps(d)]
    tmp = any(glob.glob(os.path.join(d, "*.orbax-checkpoint-tmp*")) for d in dirs)
    return max(steps, default=0), tmp


class _Moments:
    """One moments run: the environment, the reference, the rounds' results."""

    def __init__(self, train_args: list[str], workdir: str, compile_cache: bool, log: Callable[[str], None]):
        self.train_args, self.workdir, self.log = train_args, workdir, log
        self.env = run_compare.child_env(workdir, compile_cache)
        self.env.pop(faults.FAULT_ENV, None)
        self.count = 0

    def start(self, round_dir: str, fault: str | None) -> tuple[int, str]:
        """Runs one attempt to its end: (exit code, its log's text)."""
        self.count += 1
        log = os.path.join(self.workdir, "logs", f"{self.count:03d}-{os.path.basename(round_dir)}.log")
        os.makedirs(os.path.dirname(log), exist_ok=True)
        env = dict(self.env, **({faults.FAULT_ENV: fault} if fault else {}))
        cmd = [sys.executable, "-m", "maxscale.train", *self.train_args, f"--workdir={round_dir}"]
        with open(log, "w") as fh:
            rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode
        with open(log, errors="replace") as fh:
            return rc, fh.read()

    def reference(self, ref_dir: str) -> None:
        if not os.path.exists(os.path.join(ref_dir, "done")):  # a reference of an earlier call is reused
            shutil.rmtree(ref_dir, ignore_errors=True)
            rc, out = self.start(ref_dir, None)
            if rc != 0:
                raise RuntimeError(f"the uninterrupted run in {ref_dir} exited {rc}: {out[-500:]}")
            open(os.path.join(ref_dir, "done"), "w").close()
        self.ref_records = run_compare.read_records(ref_dir)
        self.ref_step, self.ref_state = run_compare.final_state(ref_dir)

    def kill(self, round_dir: str, spec: str) -> tuple[Kill, str]:
        """One attempt killed at `spec`: its Kill and its log."""
        name, n, sig = faults.parse_fault(spec)
        k = Kill(spec)
        k.exit, out = self.start(round_dir, spec)
        said = f"fault point {name} hit {n}: killing with {sig.name}" in out
        k.landed = said and (k.exit == -sig or (sig == signal.SIGTERM and k.exit == errors.EXIT_PREEMPTED))
        if os.path.exists(os.path.join(round_dir, "config.json")):
            k.committed, k.tmp_left = _committed(round_dir)
        k.records, bad = run_compare.compare_records(run_compare.read_records(round_dir), self.ref_records)
        k.mismatched = len(bad)
        return k, out

    def run_round(self, chain: str) -> Round:
        """The chain's kills, then an attempt without a fault to the end; checked against the reference."""
        r = Round(chain)
        round_dir = os.path.join(self.workdir, "round-" + re.sub(r"[^A-Za-z0-9_.@-]+", "_", chain))
        shutil.rmtree(round_dir, ignore_errors=True)
        for spec in chain.split("+"):
            k, out = self.kill(round_dir, spec)
            if r.kills:
                r.kills[-1].resumed = _resumed(out)
            r.kills.append(k)
        r.final_exit, out = self.start(round_dir, None)
        r.kills[-1].resumed = _resumed(out)
        return self._check(r, round_dir)

    def _check(self, r: Round, round_dir: str) -> Round:
        for k in r.kills:
            if not k.landed:
                r.failures.append(f"{k.spec}: the kill did not land (exit {k.exit})")
            if k.resumed != k.committed:
                r.failures.append(f"{k.spec}: the next attempt resumed at {k.resumed}, not at {k.committed}")
        if r.final_exit != 0:
            r.failures.append(f"the last attempt (no fault) exited {r.final_exit}")
        records = run_compare.read_records(round_dir)
        r.records, bad = run_compare.compare_records(records, self.ref_records)
        missing = set(self.ref_records) - set(records)
        step, state = run_compare.final_state(round_dir)
        r.state_identical = step == self.ref_step and run_compare.same_state(state, self.ref_state)
        r.divergences = sum(k.mismatched for k in r.kills) + len(bad) + len(missing) + (not r.state_identical)
        return r


def run_moments(
    train_args: list[str],
    rounds: list[str],
    workdir: str,
    compile_cache: bool = True,
    log: Callable[[str], None] = print,
) -> list[Round]:
    """Runs the reference (kept in <workdir>/reference and reused by a later call) and each round; `train_args` are
    the --config flags of the run (no --workdir)."""
    os.makedirs(workdir, exist_ok=True)
    m = _Moments(train_args, workdir, compile_cache, log)
    t0 = time.perf_counter()
    m.reference(os.path.join(workdir, "reference"))
    results = []
    for chain in rounds:
        r = m.run_round(chain)
        for i, k in enumerate(r.kills, 1):
            log(f"chaos: kill {i}/{len(r.kills)} {k.line()}")
        log(f"chaos: {r.line()}")
        for failure in r.failures:
            log(f"chaos: failure: {failure}")
        results.append(r)
    log(f"chaos: moments done in {time.perf_counter() - t0:.0f}s")
    return results
