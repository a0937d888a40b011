"""Training: the pure step (step.py), the loop with IO, logging and checkpoints (loop.py), and their parts.

`python -m maxscale.train --config=... --workdir=...` runs `command.main`: it reads the command line and the config
before JAX starts, then `loop.train` trains.
"""
