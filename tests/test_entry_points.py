"""Every entry point parses arguments one way: a bad flag is one line on stderr and exit 2 (docs/reliability.md), as
a real process started the way a user starts it. `--help` (exit 0, usage on stdout) is asserted for every command in
process by tests/test_cli.py, which also checks that every script is a shim onto one of those commands; one process
per entry here proves that the script reaches its command."""

import os
import subprocess
import sys

from conftest import ROOT

TOOLS = sorted(f"tools/{n}" for n in os.listdir(os.path.join(ROOT, "tools")) if n.endswith(".py"))
LAUNCHERS = sorted(f"launch/{n}" for n in os.listdir(os.path.join(ROOT, "launch")) if n.endswith(".py"))
MODULES = [
    "-m maxscale.train",
    "-m maxscale.parameterization",
    "-m maxscale.analysis.spectra",
    "-m maxscale.analysis.consistency",
]


def _command(entry: str, *args: str) -> list[str]:
    return [sys.executable, *entry.split(), *args]


def test_a_bad_flag_is_one_line_with_exit_2_from_every_script():
    entries = TOOLS + LAUNCHERS + MODULES
    assert len(entries) >= 14
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_FLAGS", "MAXSCALE_"))}
    env["JAX_PLATFORMS"] = "cpu"
    runs = {}
    for entry in entries:  # all at once: each pays a Python (+ JAX) start-up
        runs[entry] = subprocess.Popen(
            _command(entry, "--no_such_flag=1"),
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    problems = []
    for entry, proc in runs.items():
        out, err = proc.communicate(timeout=180)
        if proc.returncode != 2 or len(err.strip().splitlines()) != 1 or ": error: " not in err:
            problems.append(f"{entry} bad flag: exit {proc.returncode}, stderr {err.strip()[-300:]!r}")
    assert not problems, problems
