"""The --slurm script of tools/sweep.py: one sbatch job array over a sweep's runs (or its --vectorize packs)."""

import os
import shlex

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tools/sweep.py lives there


def slurm_script(
    sweep_dir: str, n_runs: int, jobs: int, python="python", partition="", time_limit="", listing="runs.txt"
) -> str:
    """An sbatch job-array script: task i runs line i+1 of `listing` (a run, or a --vectorize pack), %jobs at once."""
    name = os.path.basename(os.path.normpath(sweep_dir))
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name=sweep-{name}",
        f"#SBATCH --array=0-{n_runs - 1}%{max(jobs, 1)}",
        f"#SBATCH --output={os.path.abspath(sweep_dir)}/slurm-%A_%a.out",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks=1",
    ]
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    if time_limit:
        lines.append(f"#SBATCH --time={time_limit}")
    lines += [
        "set -euo pipefail",
        f"cd {shlex.quote(REPO)}",
        f'RUN_DIR=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {shlex.quote(os.path.abspath(sweep_dir))}/{listing})',
        f'exec {python} tools/sweep.py --run_dir="$RUN_DIR"',
        "",
    ]
    return "\n".join(lines)
