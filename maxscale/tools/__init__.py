"""Logic of the command-line tools (benchmark, chaos test, sweeps); `tools/*.py` are thin entry points over it."""
