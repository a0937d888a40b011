"""Runs N copies of a command on this host as one multi-process JAX job.

Each child gets the MAXSCALE_* env contract (see maxscale/parallel/distributed.py),
JAX_PLATFORMS=cpu and M fake CPU devices via XLA_FLAGS, so a 2x2 run looks
like two hosts with two devices each. Output lines are prefixed '[p<id>] '.
If one child fails, the rest are stopped and its exit code is returned.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import IO, Mapping, Sequence

from maxscale.errors import EXIT_PREEMPTED

_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def merge_xla_flags(existing: str, device_count: int) -> str:
    """`existing` XLA_FLAGS with the host device-count flag set to `device_count`."""
    kept = [f for f in existing.split() if not re.match(re.escape(_DEVICE_COUNT_FLAG) + r"(=|$)", f)]
    return " ".join(kept + [f"{_DEVICE_COUNT_FLAG}={device_count}"])


def child_env(
    base: Mapping[str, str], coordinator: str, num_processes: int, process_id: int, devices_per_process: int
) -> dict[str, str]:
    """The environment of child `process_id` (a copy of `base` plus our contract)."""
    env = dict(base)
    env.update(
        {
            "MAXSCALE_COORDINATOR_ADDRESS": coordinator,
            "MAXSCALE_NUM_PROCESSES": str(num_processes),
            "MAXSCALE_PROCESS_ID": str(process_id),
            "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": merge_xla_flags(base.get("XLA_FLAGS", ""), devices_per_process),
        }
    )
    env.setdefault("PYTHONUNBUFFERED", "1")  # so prefixed lines arrive as they are printed
    return env


def _pump(pipe: IO[bytes], out: IO[str], prefix: str, lock: threading.Lock) -> None:
    """Copies `pipe` to `out` line by line, each line prefixed (runs in a thread)."""
    for raw in iter(pipe.readline, b""):
        line = raw.decode(errors="replace").rstrip("\n")
        with lock:
            out.write(f"{prefix}{line}\n")
            out.flush()
    pipe.close()


def _exit_code(returncode: int) -> int:
    """Shell convention: death by signal N becomes 128+N."""
    return 128 - returncode if returncode < 0 else returncode


def signalled_exit_code(child_codes: Sequence[int], signum: int) -> int:
    """The job's exit code after the launcher forwarded `signum`: EXIT_PREEMPTED (75) when every child stopped
    cleanly after saving (the trainer's code for 'run the same command again', which schedulers requeue on); a
    child's own failure code if one failed otherwise; else 128 + signum (killed after the grace period)."""
    if child_codes and all(c == EXIT_PREEMPTED for c in child_codes):
        return EXIT_PREEMPTED
    failed = [c for c in child_codes if c not in (0, EXIT_PREEMPTED) and c > 0]
    return failed[0] if failed else 128 + signum


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Sends `sig` to the child's process group (it leads its own session), so
    grandchildren started by e.g. a shell wrapper are reached too."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass


def _stop_all(procs: Sequence[subprocess.Popen], grace_s: float, sig: int | None = signal.SIGTERM) -> None:
    """`sig` (None: already sent) to every live child, then SIGKILL to any
    still alive after `grace_s` seconds."""
    if sig is not None:
        for p in procs:
            _signal_group(p, sig)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.05)
    for p in procs:
        _signal_group(p, signal.SIGKILL)
    for p in procs:
        p.wait()


def run(
    command: Sequence[str],
    num_processes: int,
    devices_per_process: int = 1,
    port: int = 0,
    grace_s: float = 5.0,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
) -> int:
    """Starts `num_processes` copies of `command` and waits; returns the exit code.

    0 if all succeed; else the first failing child's code (128+N for signal N). If the launcher itself gets
    SIGINT/SIGTERM it forwards it to every child and waits `grace_s` for them: 75 when they all saved and stopped
    (a preemption: rerun to resume), else 128+N (see `signalled_exit_code`).
    """
    if num_processes < 1 or devices_per_process < 1:
        raise ValueError("num_processes and devices_per_process must be >= 1")
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    coordinator = f"127.0.0.1:{port or free_port()}"
    lock = threading.Lock()
    procs: list[subprocess.Popen] = []
    threads: list[threading.Thread] = []
    received: list[int] = []  # signals the launcher got, forwarded to children

    def forward(signum, _frame):
        received.append(signum)
        for p in procs:
            _signal_group(p, signum)

    old_handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            old_handlers[sig] = signal.signal(sig, forward)
    try:
        for i in range(num_processes):
            if received:  # interrupted while starting: start no more
                break
            env = child_env(os.environ, coordinator, num_processes, i, devices_per_process)
            # Own session: a terminal Ctrl-C reaches children once (via our forward), not twice.
            p = subprocess.Popen(
                list(command), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
            )
            procs.append(p)
            for pipe, out in ((p.stdout, stdout), (p.stderr, stderr)):
                t = threading.Thread(target=_pump, args=(pipe, out, f"[p{i}] ", lock), daemon=True)
                t.start()
                threads.append(t)

        code, exited = 0, []  # exited: children in the order we saw them end
        while True:
            exited += [p for p in procs if p not in exited and p.poll() is not None]
            failed = [p for p in exited if p.returncode != 0]
            if received:  # already forwarded to the children by `forward`: give them the grace period to save
                _stop_all(procs, grace_s, sig=None)
                code = signalled_exit_code([p.returncode for p in procs], received[0])
                break
            if failed:
                code = _exit_code(failed[0].returncode)
                _stop_all(procs, grace_s)
                break
            if len(exited) == len(procs):
                break
            time.sleep(0.05)
    finally:
        _stop_all(procs, grace_s)  # no-op when all exited; cleans up on exceptions
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
    for t in threads:
        t.join(timeout=2.0)  # a detached grandchild may keep a pipe open; don't hang
    return code
