"""Chaos test of exact resume: kill a training run at random moments, restart it each time, compare with a run that
was never interrupted. `tools/chaos.py` is the command line; docs/reliability.md explains the figures.

One chaos *round* trains in a fresh workdir with `python -m maxscale.train <args>`, killing each attempt after a
random delay with SIGKILL or SIGTERM (seeded), and restarting the same command until an attempt finishes. Rounds
repeat until `kills` kills have been made. Compared with the reference (uninterrupted) run, bit for bit:
  * every metrics record a killed attempt left behind (steps it logged past its last checkpoint are logged again by
    the next attempt, and must be equal),
  * every record of the finished round, and
  * the final train state (params, optimizer state, step, counters), restored from the final checkpoints.
A SIGTERM attempt must exit with EXIT_PREEMPTED after committing a checkpoint at its last logged step (or die by the
signal when it lands outside the training loop, in start-up or at exit; or exit 0 after the last step).
"""

from __future__ import annotations

import dataclasses
import glob
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from typing import Callable

from maxscale import cli, errors
from maxscale.tools import chaos_moments
from maxscale.tools.run_compare import (  # noqa: F401 - read and compared by tests and chaos_moments too
    TIMING_KEYS,
    child_env,
    compare_records,
    final_state,
    read_records,
    same_state,
)

# Defaults for a chaos run of configs/tiny.py: short, every step logged, frequent asynchronous checkpoints (so that
# many kills land inside a save), an eval. The caller's overrides come after these and win.
DEFAULT_OVERRIDES = (
    "--config.train.steps=120",
    "--config.train.log_every=1",
    "--config.checkpoint.every=6",
    "--config.checkpoint.max_to_keep=2",
    "--config.train.eval_every=40",
    "--config.train.eval_steps=1",
    "--config.train.sample_tokens=0",
    "--config.data.max_bytes=300000",
)


@dataclasses.dataclass
class Report:
    kills: int = 0
    sigkill: int = 0
    sigterm: int = 0
    sigterm_saved: int = 0  # exited EXIT_PREEMPTED with a checkpoint at its last logged step
    sigterm_outside: int = 0  # died by SIGTERM outside the training loop (start-up or exit: nothing unsaved)
    kills_mid_save: int = 0  # the kill left an uncommitted orbax tmp directory or a half-deleted step
    rounds: int = 0
    starts: int = 0
    records_compared: int = 0
    records_mismatched: int = 0
    states_identical: int = 0
    diverged: int = 0  # rounds with any mismatched record or a different final state
    failures: list = dataclasses.field(default_factory=list)  # unexpected exit codes, missing checkpoints, ...
    wall_s: float = 0.0

    def line(self) -> str:
        return (
            f"kills={self.kills} diverged={self.diverged} failures={len(self.failures)} "
            f"(SIGKILL {self.sigkill}, SIGTERM {self.sigterm}: {self.sigterm_saved} saved and exited "
            f"{errors.EXIT_PREEMPTED}, {self.sigterm_outside} outside the training loop) "
            f"mid_save={self.kills_mid_save} "
            f"rounds={self.rounds} starts={self.starts} records_compared={self.records_compared} "
            f"mismatched={self.records_mismatched} final_states_identical={self.states_identical}/{self.rounds} "
            f"wall={self.wall_s:.0f}s"
        )


def _interrupted_save(workdir: str) -> bool:
    ckpt = os.path.join(workdir, "checkpoints")
    return bool(glob.glob(os.path.join(ckpt, "*.orbax-checkpoint-tmp*")) or glob.glob(os.path.join(ckpt, "*.deleting")))


def _latest_checkpoint(workdir: str) -> int | None:
    from maxscale.train import checkpoint

    steps = checkpoint.committed_steps(os.path.join(workdir, "checkpoints"))
    return steps[-1] if steps else None


# ----------------------------------------------------------------------------------------------------------------
# Running


class _Runner:
    def __init__(self, train_args: list[str], base: str, env: dict):
        self.train_args, self.base, self.env = train_args, base, env
        self.count = 0

    def start(self, workdir: str) -> tuple[subprocess.Popen, str]:
        self.count += 1
        log = os.path.join(self.base, "logs", f"{self.count:03d}-{os.path.basename(workdir)}.log")
        os.makedirs(os.path.dirname(log), exist_ok=True)
        with open(log, "w") as fh:
            proc = subprocess.Popen(
                [sys.executable, "-m", "maxscale.train", *self.train_args, f"--workdir={workdir}"],
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
        return proc, log

    def complete(self, workdir: str) -> float:
        t = time.perf_counter()
        proc, log = self.start(workdir)
        if proc.wait() != 0:
            raise RuntimeError(f"uninterrupted run in {workdir} exited {proc.returncode}; see {log}")
        return time.perf_counter() - t


def _tail(path: str, n: int = 3) -> str:
    with open(path, errors="replace") as fh:
        return " | ".join(line.strip() for line in fh.readlines()[-n:])


def run(
    train_args: list[str],
    kills: int,
    workdir: str,
    seed: int = 0,
    sigterm_share: float = 0.5,
    compile_cache: bool = True,
    term_timeout_s: float = 120.0,
    log: Callable[[str], None] = print,
) -> Report:
    """Runs the chaos test; `train_args` are the --config flags of the run (no --workdir)."""
    t0 = time.perf_counter()
    os.makedirs(workdir, exist_ok=True)
    chaos = _Chaos(_Runner(train_args, workdir, child_env(workdir, compile_cache)), random.Random(seed), log)
    chaos.references(workdir)
    while chaos.report.kills < kills:
        round_dir = os.path.join(workdir, f"round{chaos.report.rounds:02d}")
        shutil.rmtree(round_dir, ignore_errors=True)
        chaos.report.rounds += 1
        while not chaos.attempt(round_dir, kills, sigterm_share, term_timeout_s):
            pass
        chaos.check_round(round_dir)
    chaos.report.wall_s = time.perf_counter() - t0
    return chaos.report


class _Chaos:
    """One chaos test's state: the runner, the uninterrupted reference, the report."""

    def __init__(self, runner: "_Runner", rng: random.Random, log: Callable[[str], None]):
        self.runner, self.rng, self.log, self.report = runner, rng, log, Report()

    def references(self, workdir: str) -> None:
        """The uninterrupted reference run, and a second one that times a warm start (compiled code cached) and
        must itself agree with the first."""
        ref_dir = os.path.join(workdir, "reference")
        shutil.rmtree(ref_dir, ignore_errors=True)
        self.runner.complete(ref_dir)
        self.reference = read_records(ref_dir)
        self.ref_step, self.ref_state = final_state(ref_dir)
        warm_dir = os.path.join(workdir, "reference2")
        shutil.rmtree(warm_dir, ignore_errors=True)
        self.max_delay = self.runner.complete(warm_dir)
        self.log(f"chaos: reference run of {self.ref_step} steps in {ref_dir}; a warm run takes {self.max_delay:.1f}s")
        self.check_round(warm_dir)
        self.report.rounds += 1

    def _compare(self, round_dir: str) -> list:
        n, bad = compare_records(read_records(round_dir), self.reference)
        self.report.records_compared += n
        self.report.records_mismatched += len(bad)
        return bad

    def check_round(self, round_dir: str) -> bool:
        """A finished round's records and final state against the reference."""
        report, bad = self.report, self._compare(round_dir)
        if set(self.reference) - set(read_records(round_dir)):
            report.failures.append(f"{round_dir}: steps missing from metrics.jsonl")
            bad.append("missing")
        step, state = final_state(round_dir)
        identical = step == self.ref_step and same_state(state, self.ref_state)
        report.states_identical += identical
        if bad or not identical:
            report.diverged += 1
            self.log(
                f"chaos: {round_dir} DIVERGED: {len(bad)} records differ (first: {bad[:3]}); final state "
                f"{'identical' if identical else 'different'}"
            )
        return not bad and identical

    def attempt(self, round_dir: str, kills: int, sigterm_share: float, term_timeout_s: float) -> bool:
        """One start of the round's run, killed after a random delay unless enough kills were made; True when the
        round is complete (the run finished)."""
        report = self.report
        proc, out = self.runner.start(round_dir)
        report.starts += 1
        if report.kills >= kills:  # enough kills: let this attempt finish the round
            if proc.wait() != 0:
                report.failures.append(f"final attempt exited {proc.returncode}: {_tail(out)}")
            return True
        delay = self.rng.uniform(0.0, self.max_delay)
        sig = signal.SIGTERM if self.rng.random() < sigterm_share else signal.SIGKILL
        try:
            rc = proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            rc = None
        if rc is not None:  # finished before its kill
            if rc != 0:
                report.failures.append(f"attempt exited {rc} unprompted: {_tail(out)}")
            return True
        os.kill(proc.pid, sig)
        report.kills += 1
        try:
            rc = proc.wait(timeout=term_timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
            report.failures.append(f"{sig.name} attempt did not exit within {term_timeout_s:.0f}s")
        mid_save = _interrupted_save(round_dir)
        report.kills_mid_save += mid_save
        self._count_exit(round_dir, sig, rc, out)
        bad = self._compare(round_dir)  # what the killed attempt logged, past its last checkpoint too
        self.log(
            f"chaos: kill {report.kills}/{kills}: {sig.name} after {delay:.1f}s, exit {rc}, checkpoint "
            f"{_latest_checkpoint(round_dir)}{' (mid-save)' if mid_save else ''}, records so far "
            f"{'match' if not bad else f'DIFFER at {bad[:3]}'}"
        )
        return rc == 0  # the signal landed after the last step: the round is complete

    def _count_exit(self, round_dir: str, sig, rc: int, out) -> None:
        """Counts how a killed attempt exited; an exit its signal does not explain is a failure."""
        report = self.report
        if sig == signal.SIGKILL:
            report.sigkill += 1
            if rc != -signal.SIGKILL:
                report.failures.append(f"SIGKILL attempt exited {rc}: {_tail(out)}")
            return
        report.sigterm += 1
        records = read_records(round_dir)
        last_logged = max((s for s, kind in records if kind == "train"), default=None)
        if rc == errors.EXIT_PREEMPTED and _latest_checkpoint(round_dir) == last_logged:
            report.sigterm_saved += 1
        elif rc == -signal.SIGTERM:
            report.sigterm_outside += 1
        elif rc != 0:
            report.failures.append(
                f"SIGTERM attempt exited {rc} (checkpoint {_latest_checkpoint(round_dir)}, "
                f"last logged step {last_logged}): {_tail(out)}"
            )


# ----------------------------------------------------------------------------------------------------------------
# Command line


@cli.command("chaos")
def main(argv: list[str]) -> int:
    """maxscale chaos --config=configs/tiny.py --kills=20 [--seed=0] [--workdir=runs/chaos] [--sigterm_share=0.5]
    [--compile_cache=true] [--moments=all|<point>[@n][:SIG][+...][,...]] [--config.a.b=v ...]: exit 0 when nothing
    diverged and nothing failed, 1 otherwise. --moments kills at named fault points instead (chaos_moments.py)."""
    p = cli.Parser("chaos", __doc__, config=True)
    p.add_argument("--kills", type=int, default=20, help="how many times the training is killed (>= 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments and signals")
    p.add_argument("--workdir", default=os.path.join("runs", "chaos"))
    p.add_argument("--sigterm_share", type=float, default=0.5, help="share of kills by SIGTERM (the rest SIGKILL)")
    p.add_argument("--compile_cache", type=cli.flag_bool, default=True, help="share JAX's compilation cache")
    p.add_argument("--moments", default="", help="kill at named moments: all, or rounds like step@5+startup,eval")
    args = p.parse(argv)
    if args.moments:
        return _moments_main(args)
    if args.kills < 0 or not 0.0 <= args.sigterm_share <= 1.0:
        raise errors.ConfigError("--kills must be an integer >= 0 and --sigterm_share a number in [0, 1]")
    spec = [a for a in args.config_args if a.startswith("--config=")]
    overrides = [a for a in args.config_args if a.startswith("--config.")]
    train_args = spec + list(DEFAULT_OVERRIDES) + overrides
    workdir = args.workdir or os.path.join("runs", "chaos")
    print(f"chaos: python -m maxscale.train {' '.join(train_args)} --workdir={workdir}/...", flush=True)
    report = run(
        train_args,
        args.kills,
        workdir,
        seed=args.seed,
        sigterm_share=args.sigterm_share,
        compile_cache=args.compile_cache,
        log=lambda line: print(line, flush=True),
    )
    for failure in report.failures:
        print(f"chaos: failure: {failure}")
    print(report.line(), flush=True)
    return 0 if report.diverged == 0 and not report.failures else 1


def _moments_main(args) -> int:
    """`--moments`: each round's kills at named fault points, a table of where they landed, and the divergences."""
    rounds = chaos_moments.parse_rounds(args.moments)
    spec = [a for a in args.config_args if a.startswith("--config=")]
    overrides = [a for a in args.config_args if a.startswith("--config.")]
    train_args = spec + list(chaos_moments.MOMENT_OVERRIDES) + overrides
    workdir = args.workdir or os.path.join("runs", "chaos")
    print(f"chaos: python -m maxscale.train {' '.join(train_args)} --workdir={workdir}/...", flush=True)
    results = chaos_moments.run_moments(
        train_args, rounds, workdir, compile_cache=args.compile_cache, log=lambda line: print(line, flush=True)
    )
    kills = [k for r in results for k in r.kills]
    bad = sum(r.divergences for r in results), sum(len(r.failures) for r in results)
    print(f"moments: kills={len(kills)} landed={sum(k.landed for k in kills)} divergences={bad[0]} failures={bad[1]}")
    return 0 if bad == (0, 0) else 1
