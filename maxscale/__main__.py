"""maxscale: one command for every tool. `maxscale <command> [flags]` (or `python -m maxscale <command> ...`).

Each command is the `main(argv)` of the module named below, parsed the one way maxscale/cli.py describes: `--help`
exits 0, a bad flag is one line and exit 2. `maxscale train ...` is `python -m maxscale.train ...`, flag for flag.
The modules are imported by name only when their command runs: `maxscale --help` starts no JAX.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# command -> (module:function, one line). The tools/*.py and launch/*.py scripts are shims onto the same functions.
COMMANDS = {
    "train": ("maxscale.train.command:main", "train one run (python -m maxscale.train)"),
    "sweep": ("maxscale.tools.sweep:main", "expand and run a sweep of runs (tools/sweep.py)"),
    "report": ("maxscale.analysis.report:main", "one report of a sweep: every section that applies"),
    "transfer-report": ("maxscale.analysis.transfer:main", "optimum per scale and its drift"),
    "tune-report": ("maxscale.analysis.tune:main", "best points of a random-search sweep (tools/tune_report.py)"),
    "precision-report": ("maxscale.analysis.precision_report:main", "precision laws of a sweep vs Table 2"),
    "spectra": ("maxscale.analysis.spectra:main", "weight spectra of a run or sweep vs the random-matrix edge"),
    "consistency": ("maxscale.analysis.consistency:main", "width consistency of a sweep's features"),
    "coord-check": ("maxscale.analysis.coord_check:main", "mean |x| of every module output vs width or depth"),
    "fit-law": ("maxscale.analysis.law_cli:main", "fit a loss law to a CSV of runs (tools/fit_law.py)"),
    "generate": ("maxscale.tools.generate:main", "text from any kept step of a run (KV cache; greedy or sampled)"),
    "eval": ("maxscale.tools.evaluate:main", "loss and bits per byte of a checkpoint on a text or token file"),
    "export": ("maxscale.tools.export_hf:main", "export a checkpoint as a Hugging Face Llama model"),
    "import": ("maxscale.tools.import_hf:main", "import a Hugging Face Llama/Qwen3 checkpoint as a workdir"),
    "prepare": ("maxscale.tools.prepare:main", "tokenize a corpus once into a token file (tools/prepare_data.py)"),
    "train-tokenizer": ("maxscale.tools.prepare:train_tokenizer_main", "train a BPE or SentencePiece tokenizer"),
    "ptq": ("maxscale.tools.ptq:main", "post-training quantization of a run: eval loss per bit width"),
    "compile-check": ("maxscale.tools.compile_check:main", "compile the step for a target mesh; memory per device"),
    "bench": ("maxscale.tools.bench_cli:main", "benchmark the train step; print JSON"),
    "device-bench": ("maxscale.tools.device_bench:main", "1B-class dense and MoE step speed on this accelerator"),
    "chaos": ("maxscale.tools.chaos:main", "kill and resume a training N times; compare with an uninterrupted run"),
    "params": ("maxscale.tools.params_table:main", "per-parameter init, LR, WD and eps of a config"),
    "launch-local": ("maxscale.launch.commands:local_main", "N processes of a command on this host as one job"),
    "launch-slurm": ("maxscale.launch.commands:slurm_main", "an sbatch script for a multi-process job"),
    "launch-k8s": ("maxscale.launch.commands:k8s_main", "a Kubernetes Indexed Job + headless Service"),
    "launch-tpu-vm": ("maxscale.launch.commands:tpu_vm_main", "a command on every worker of a Cloud TPU VM pod"),
}


def usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = [f"  {name:<{width}}  {about}" for name, (_, about) in COMMANDS.items()]
    return "usage: maxscale <command> [flags]   (maxscale <command> --help: its flags)\n\ncommands:\n" + "\n".join(
        lines
    )


def entry(name: str):
    """The `main(argv) -> int` of command `name` (imports its module)."""
    module, function = COMMANDS[name][0].split(":")
    return getattr(importlib.import_module(module), function)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"{__doc__.strip()}\n\n{usage()}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        hint = f"did you mean {close[0]}?" if close else "see maxscale --help"
        print(f"maxscale: error: unknown command {name!r}; {hint}", file=sys.stderr)
        return 2
    return int(entry(name)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
