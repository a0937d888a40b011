"""The sweep command line: --set on every point (new run ids: the id is of the resolved config), --limit,
--dry_run that runs and writes nothing, and run lines that show only the fields that vary."""

from __future__ import annotations

import os

import pytest

from maxscale.errors import ConfigError
from maxscale.tools import sweep

SWEEP = """
def get_sweep():
    return {"config": "configs/tiny.py", "name": "lrs", "fixed": {"train.log_every": 5},
            "grid": {"optimizer.lr": [1e-3, 3e-3, 1e-2], "model.depth": [1, 2]}}
"""


@pytest.fixture
def sweep_file(tmp_path):
    path = tmp_path / "lrs.py"
    path.write_text(SWEEP)
    return str(path)


def test_set_changes_every_point_and_its_id(sweep_file, tmp_path):
    s = sweep.load_sweep(sweep_file)
    plain = sweep.expand(s, str(tmp_path))
    sets = sweep.parse_sets(["train.steps=7", "config.model.width=32"], sweep.base_config(s))
    shrunk = sweep.expand(s, str(tmp_path), sets)
    assert len(shrunk) == len(plain) == 6
    assert all(r["config"].train.steps == 7 and r["config"].model.width == 32 for r in shrunk)
    assert [r["config"].optimizer.lr for r in shrunk] == [r["config"].optimizer.lr for r in plain]
    assert not {r["id"] for r in shrunk} & {r["id"] for r in plain}  # other configs, other ids
    assert [r["id"] for r in plain] == [r["id"] for r in sweep.expand(s, str(tmp_path))]  # ids unchanged without
    with pytest.raises(ConfigError, match="FIELD=VALUE"):
        sweep.parse_sets(["train.steps"], sweep.base_config(s))
    with pytest.raises(ConfigError, match="did you mean train.steps"):
        sweep.parse_sets(["train.stpes=7"], sweep.base_config(s))


def test_compact_lines_show_only_the_varying_fields(sweep_file, tmp_path):
    runs = sweep.expand(sweep.load_sweep(sweep_file), str(tmp_path))
    assert sweep.varying_fields(runs) == ["optimizer.lr", "model.depth"]
    assert sweep._short(runs[1]["overrides"], sweep.varying_fields(runs)) == "lr=0.001 depth=2"
    assert sweep.varying_fields(runs[:1]) == []


def test_dry_run_with_limit_prints_the_plan_and_writes_nothing(sweep_file, tmp_path, capsys):
    root = str(tmp_path / "runs")
    argv = [sweep_file, f"--root={root}", "--dry_run", "--limit=2", "--set", "train.steps=7"]
    assert sweep.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and "2 of 6 runs" in lines[-1] and "steps=7" in lines[-1]
    assert lines[0].split()[2:] == ["depth=1"] and lines[1].split()[2:] == ["depth=2"]  # only what varies
    assert not os.path.exists(root)
    assert sweep.main([sweep_file, f"--root={root}", "--dry_run", "--limit=0"]) == 2
    assert sweep.main([sweep_file, f"--root={root}", "--dry_run", "--set=train.nope=1"]) == 2
