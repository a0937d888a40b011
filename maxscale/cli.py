"""The one argument-parsing style of every maxscale command (`maxscale <command>`, `python -m maxscale.train`,
`tools/*.py`, `launch/*.py`): argparse with the project's error contract.

- `--help` prints the command's docstring and its flags on stdout, exit 0;
- a bad or unknown flag is one line on stderr, `<prog>: error: ...; see --help`, exit 2 (errors.EXIT_USAGE);
- a ConfigError raised anywhere in the command is one line, `<prog>: error: ...`, exit 2;
- an errors.RunStopped (a stopped training: preempted, non-finite loss, failed save) is one line, its `exit_code`.

A command is `@cli.command("prog")` on a `main(argv) -> int` that builds a `cli.Parser` and calls `parse`. Commands
that take an experiment config pass `config=True`: `--config=FILE.py[:arg]` and `--config.<section>.<field>=<value>`
are then read by config.parse_argv (the same rules, messages and typo hints as the trainer's), and `parse` returns the
config before resolve as `args.config`. Layer: config (imports errors and config only), so any layer above may use it.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import os
import re
import sys
from collections.abc import Callable, Sequence

from maxscale import errors

CONFIG_HELP = "the experiment config; any field: --config.<section>.<field>=<value> (every field: maxscale/defaults.py)"


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2), the command's docstring as --help, no abbreviated flags."""

    def __init__(self, prog: str, doc: str = "", config: bool = False, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(prog=prog, description=(doc or "").strip() or None, allow_abbrev=False, **kwargs)
        self.takes_config = config
        if config:
            self.add_argument("--config", metavar="FILE.py[:arg]", default=None, help=CONFIG_HELP)

    def error(self, message: str):
        m = re.fullmatch(r"argument (--[\w-]+)(?:/\S+)?: (expected one argument|ignored explicit argument .*)", message)
        if m:  # argparse's wording -> the fix
            flag = m.group(1)
            message = f"{flag} needs a value: {flag}=..." if m.group(2)[0] == "e" else f"{flag} takes no value"
        self.exit(errors.EXIT_USAGE, f"{self.prog}: error: {one_line(message)}; see --help\n")

    def parse(self, argv: Sequence[str]) -> argparse.Namespace:
        """Parses `argv`; with `config=True` also loads the config (ConfigError on a bad spec or field)."""
        args, rest = self.parse_known_args(list(argv))
        config_overrides = [a for a in rest if self.takes_config and a.startswith("--config.") and "=" in a]
        for a in rest:
            if a not in config_overrides:
                self.error(self.unknown(a))
        if self.takes_config:
            from maxscale import config as config_lib  # the config layer: cli sits in it

            spec = [f"--config={args.config}"] if args.config is not None else []
            args.config_args = spec + config_overrides  # as given: for commands that run the trainer with them
            args.config, _ = config_lib.parse_argv(args.config_args, extra_flags=())
        return args

    def unknown(self, arg: str) -> str:
        """The message for an argument no flag takes, with the closest flag as a hint."""
        if not arg.startswith("-"):
            return f"unexpected argument {arg!r}; expected --name=value" + (
                " (e.g. --config=configs/tiny.py)" if self.takes_config else ""
            )
        name = arg.split("=", 1)[0]
        flags = sorted(s[2:] for a in self._actions for s in a.option_strings if s.startswith("--"))
        close = difflib.get_close_matches(name[2:] if name.startswith("--") else name, flags, n=1)
        return f"unknown flag {name!r}" + (f" (did you mean --{close[0]}?)" if close else "")


def one_line(message) -> str:
    """`message` with its whitespace (newlines included) collapsed: an error is always one line."""
    return " ".join(str(message).split())


def flag_bool(text: str) -> bool:
    """argparse type of `--flag=true|false` (also 1/0, yes/no)."""
    value = str(text).strip().lower()
    if value in ("1", "true", "yes"):
        return True
    if value in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def bool_flag(parser: Parser, name: str, help: str = "") -> None:
    """`--name` alone or `--name=true|false`, default false."""
    parser.add_argument(f"--{name}", type=flag_bool, nargs="?", const=True, default=False, help=help)


def run(prog: str, main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Runs `main(argv)` under the error contract above and returns the exit code (never raises SystemExit)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        code = main(argv)
    except SystemExit as e:  # argparse: --help (0) or a bad flag (2, its one line already printed)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else _fail(prog, e.code, 1))
    except errors.HelpRequested as e:
        print(e)
        return 0
    except errors.ConfigError as e:
        return _fail(prog, e, errors.EXIT_USAGE)
    except errors.RunStopped as e:  # exit codes in errors.py and docs/reliability.md
        return _fail(prog, e, e.exit_code)
    except BrokenPipeError:  # output piped into `head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 0
    return 0 if code is None else int(code)


def _fail(prog: str, message, code: int) -> int:
    print(f"{prog}: error: {one_line(message)}", file=sys.stderr)
    return code


def command(prog: str):
    """Decorator: `main(argv)` runs under `run(prog, ...)`; `main()` with no argv reads sys.argv[1:]."""

    def wrap(main: Callable[[list[str]], int | None]):
        @functools.wraps(main)
        def entry(argv: Sequence[str] | None = None) -> int:
            return run(prog, main, argv)

        entry.prog = prog
        return entry

    return wrap
