"""`python -m maxscale.train --config=configs/<file>.py[:arg] [--config.a.b=v ...] --workdir=DIR` (= `maxscale train`).

Trains one run; restarting the same command resumes it from its newest checkpoint (state, data iterator, RNG).
The command line and the config are read and checked before JAX is imported, so `--help`, a bad flag or a bad
config field answer in a fraction of a second: one line and exit 2 (maxscale/cli.py, docs/reliability.md). The
trainer itself is maxscale/train/loop.py.
"""

from __future__ import annotations

import sys

from maxscale import cli
from maxscale import config as config_lib
from maxscale.errors import ConfigError


def main(argv: list[str]) -> int:
    """The trainer's command, parsed the one way of maxscale/cli.py: a ConfigError is one line and exit 2, a
    faults.RunStopped one line and its exit code (errors.py, docs/reliability.md)."""

    def train(argv: list[str]) -> int:
        p = cli.Parser("maxscale.train", __doc__, config=True)
        p.add_argument("--workdir", default=None, help="the run's directory (required): checkpoints, metrics, logs")
        args = p.parse(argv)
        cfg = config_lib.resolve(args.config)
        if not args.workdir:
            raise ConfigError("--workdir is required, e.g. --workdir=runs/tiny")
        from maxscale.train import loop  # JAX and the trainer: only for a valid command line

        return loop.train(cfg, args.workdir)

    return cli.run("maxscale.train", train, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
