"""One command-line style (maxscale/cli.py) and one `maxscale` command (maxscale/__main__.py): --help exits 0, a bad
flag or a ConfigError is one line and exit 2, a stopped run its exit code; every script is a shim onto a command."""

import os
import re
import subprocess
import sys
import tomllib

import pytest
from conftest import ROOT

from maxscale import __main__ as maxscale_main
from maxscale import cli, errors
from maxscale.train import command


def _parser():
    p = cli.Parser("demo", "Demo command.\n\n  demo --steps=3")
    p.add_argument("--steps", type=int, default=1)
    cli.bool_flag(p, "json")
    return p


@cli.command("demo")
def _demo(argv):
    args = _parser().parse(argv)
    if args.steps < 0:
        raise errors.ConfigError("--steps=-1: expected\nan integer >= 0")
    if args.steps == 75:
        stopped = errors.RunStopped("stopped after step 75; the same command resumes")
        stopped.exit_code = errors.EXIT_PREEMPTED
        raise stopped
    print(f"steps {args.steps} json {args.json}")
    return 0


def test_run_maps_help_bad_flags_config_errors_and_stops_to_exit_codes(capsys):
    assert _demo(["--help"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("usage: demo") and "demo --steps=3" in out and "--json" in out and err == ""
    assert _demo(["--steps=3", "--json"]) == 0 and capsys.readouterr().out == "steps 3 json True\n"
    assert _demo(["--json=false"]) == 0 and capsys.readouterr().out == "steps 1 json False\n"
    cases = {
        ("--stesp=3",): (2, "demo: error: unknown flag '--stesp' (did you mean --steps?); see --help"),
        ("--steps=x",): (2, "demo: error: argument --steps: invalid int value: 'x'; see --help"),
        ("--ste=3",): (2, "demo: error: unknown flag '--ste' (did you mean --steps?); see --help"),  # no abbreviations
        ("extra",): (2, "demo: error: unexpected argument 'extra'; expected --name=value; see --help"),
        ("--steps=-1",): (2, "demo: error: --steps=-1: expected an integer >= 0"),  # newline folded: one line
        ("--steps=75",): (75, "demo: error: stopped after step 75; the same command resumes"),
    }
    for argv, (code, line) in cases.items():
        assert _demo(list(argv)) == code, argv
        out, err = capsys.readouterr()
        assert out == "" and err == line + "\n", (argv, err)


def test_config_flags_go_through_config_parse_argv(capsys):
    p = cli.Parser("demo", "Demo.", config=True)
    p.add_argument("--out", default="x")
    args = p.parse(["--config=configs/tiny.py", "--config.model.width=48", "--out=y"])
    assert args.config.model.width == 48 and args.out == "y"
    assert args.config_args == ["--config=configs/tiny.py", "--config.model.width=48"]
    with pytest.raises(errors.ConfigError, match="did you mean model.width"):
        p.parse(["--config=configs/tiny.py", "--config.model.widht=48"])
    with pytest.raises(errors.ConfigError, match="--config is required"):
        p.parse(["--out=y"])
    with pytest.raises(SystemExit) as e:
        p.parse(["--config=configs/tiny.py", "--bogus=1"])
    assert e.value.code == 2 and capsys.readouterr().err == "demo: error: unknown flag '--bogus'; see --help\n"


def test_every_maxscale_command_resolves_and_follows_the_contract(capsys):
    assert maxscale_main.main(["--help"]) == 0
    listing = capsys.readouterr().out
    assert len(maxscale_main.COMMANDS) >= 25 and all(f"  {name} " in listing for name in maxscale_main.COMMANDS)
    assert maxscale_main.entry("train") is command.main  # `maxscale train` is `python -m maxscale.train`
    problems = []
    for name in maxscale_main.COMMANDS:
        code = maxscale_main.main([name, "--help"])
        out, _ = capsys.readouterr()
        if code != 0 or not out.strip():
            problems.append(f"{name} --help: exit {code}")
        code = maxscale_main.main([name, "--no_such_flag=1"])
        _, err = capsys.readouterr()
        if code != 2 or len(err.strip().splitlines()) != 1 or "error" not in err:
            problems.append(f"{name} bad flag: exit {code}, {err!r}")
    assert not problems, problems
    assert maxscale_main.main(["trian"]) == 2
    assert capsys.readouterr().err == "maxscale: error: unknown command 'trian'; did you mean train?\n"


def test_scripts_are_shims_without_path_edits_and_the_console_script_is_declared():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        scripts = tomllib.load(fh)["project"]["scripts"]
    assert scripts == {"maxscale": "maxscale.__main__:main"}
    commands = set(maxscale_main.COMMANDS)
    for folder in ("tools", "launch"):
        for n in sorted(os.listdir(os.path.join(ROOT, folder))):
            if not n.endswith(".py"):
                continue
            text = open(os.path.join(ROOT, folder, n)).read()
            assert "sys.path" not in text and len(text.splitlines()) <= 30, f"{folder}/{n} is not a thin shim"
            called = re.search(r'main\(\["([a-z-]+)"', text) or re.search(r"commands\.(\w+)_main\(", text)
            assert called, f"{folder}/{n} calls no maxscale command"
            name = called.group(1) if folder == "tools" else "launch-" + called.group(1).replace("_", "-")
            assert name in commands, f"{folder}/{n} -> {name}"


def test_python_dash_m_maxscale_runs_a_command_end_to_end(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_FLAGS", "MAXSCALE_"))}
    env["JAX_PLATFORMS"] = "cpu"
    args = ["--dry-run", "--", "python", "-m", "maxscale.train", "--config=configs/tiny.py"]
    r = subprocess.run(
        [sys.executable, "-m", "maxscale", "launch-slurm", "--nodes=2", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert "#SBATCH --nodes=2" in r.stdout and "python -m maxscale.train --config=configs/tiny.py" in r.stdout


def test_the_trainer_reads_its_command_line_and_config_before_jax_starts():
    """--help, a bad flag and a bad config field answer without importing JAX (0.2 s, not a 2 s start-up); a valid
    command line goes on to the trainer (here: refused on its mesh, which needs the devices)."""
    tiny = os.path.join(ROOT, "configs", "tiny.py")
    probe = (
        "import sys\nfrom maxscale.train import command\n"
        "rc = command.main(sys.argv[1:])\nprint(rc, 'jax' in sys.modules, flush=True)\n"
    )
    cases = [
        (["--help"], "0 False"),
        (["--no_such_flag=1"], "2 False"),
        ([f"--config={tiny}", "--config.model.widht=3", "--workdir=x"], "2 False"),
        ([f"--config={tiny}", "--config.quant.weights=int99", "--workdir=x"], "2 False"),
        ([f"--config={tiny}"], "2 False"),  # --workdir missing
        ([f"--config={tiny}", "--config.mesh.data=3", "--workdir=x"], "2 True"),
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    for args, expected in cases:
        out = subprocess.run([sys.executable, "-c", probe, *args], cwd=ROOT, env=env, capture_output=True, text=True)
        assert out.stdout.strip().splitlines()[-1] == expected, (args, out.stdout[-300:], out.stderr[-300:])
        assert not os.path.exists(os.path.join(ROOT, "x"))
