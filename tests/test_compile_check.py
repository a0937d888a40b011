"""The compile check: on meshes larger than this process's 8 simulated devices (so in a fresh process), the
per-device bytes of the state are exactly the shard sizes the rules give; sharding errors are one line, exit 2."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_config

from maxscale.errors import ConfigError
from maxscale.model import transformer
from maxscale.tools import compile_check

REPO = Path(__file__).resolve().parents[1]


def cli(*args, timeout=300):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_FLAGS", "JAX_"))}
    return subprocess.run(
        [sys.executable, "tools/compile_check.py", "--config=configs/tiny.py", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def expected_param_bytes(cfg, fsdp: int, tensor: int) -> int:
    """Per-device float32 bytes when every `embed` dim splits over fsdp and every heads/mlp/vocab dim over tensor
    (true for the tiny model's sizes): the sharding rules, written out by hand."""
    split = {"embed": fsdp, "heads": tensor, "kv_heads": tensor, "mlp": tensor, "vocab": tensor}
    total = 0
    for _, spec, shape in transformer.param_specs(cfg):
        total += math.prod(size // split.get(axis, 1) for axis, size in zip(spec.axes, shape))
    return 4 * total


def test_cli_on_32_devices_reports_exact_state_bytes_and_says_it_does_not_fit():
    r = cli("--mesh=data=2,fsdp=4,tensor=4", "--json", "--device_memory_gb=0.0005")  # 512 KiB devices
    assert r.returncode == 1, r.stderr  # 1 = does not fit
    report = json.loads(r.stdout)
    cfg = tiny_config()
    b = report["per_device_bytes"]
    assert report["devices"] == 32 and report["mesh"] == {"data": 2, "fsdp": 4, "tensor": 4, "expert": 1}
    assert b["params"] == expected_param_bytes(cfg, fsdp=4, tensor=4)
    # Adam's two moments mirror the parameters' shardings; the rest (step counts) is a few scalars
    assert 2 * b["params"] <= b["opt_state"] <= 2 * b["params"] + 64
    assert b["batch"] == 1 * (cfg.data.seq_len + 1) * 4  # 8 rows over data x fsdp = 8: one int32 row each
    assert b["activations_and_temp"] > 0 and b["total"] >= b["params"] + b["opt_state"]
    assert not report["fits"] and report["verdict"] == "does not fit"
    assert report["device_memory_bytes"] == int(0.0005 * 2**30)
    text = compile_check.table(report)
    assert "does not fit" in text and "optimizer state" in text and "activations + temporaries" in text


def test_library_call_simulates_a_larger_mesh_in_a_subprocess():
    cfg = tiny_config(**{"mesh.fsdp": 16, "train.batch_size": 16})  # 16 devices > the 8 of this process
    report = compile_check.run(cfg, memory_gb=80)
    assert report["devices"] == 16 and report["fits"] and report["verdict"] == "fits"
    assert report["per_device_bytes"]["params"] == expected_param_bytes(cfg, fsdp=16, tensor=1)
    assert report["per_device_bytes"]["params"] == 4 * transformer.count_params(cfg)["total"] // 16


@pytest.mark.parametrize(
    "args, message",
    [
        (["--mesh=tensor=8"], "heads=4 does not divide over mesh.tensor=8"),
        (["--mesh=data=16"], "train.batch_size=8 is not divisible by the data-parallel size"),
        (["--mesh=data=8,fsdq=2"], "unknown axis 'fsdq'"),
        (["--mesh=4x4x4x4x4"], "at most 4 sizes"),
        (["--mesh=data=4,dcn_data=3"], "mesh.dcn_data=3 does not divide mesh.data=4"),
        (["--config.mesh.data=-1"], "--mesh is required"),
        (["--mesh=8", "--device=abacus"], "not in the table"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message):
    r = cli(*args)
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_parse_mesh_forms():
    assert compile_check.parse_mesh("8x8") == compile_check.parse_mesh("data=8,fsdp=8")
    assert compile_check.parse_mesh("2x2x2")["tensor"] == 2
    assert compile_check.parse_mesh("data=4,dcn_data=2")["dcn_data"] == 2
    with pytest.raises(ConfigError, match="positive"):
        compile_check.parse_mesh("data=0")


def test_device_memory_table_lookup():
    assert compile_check.device_memory_gb("NVIDIA H100 80GB HBM3") == (80.0, "H100")
    assert compile_check.device_memory_gb("A100") == (80.0, "A100")
    assert compile_check.device_memory_gb("a100-40gb") == (40.0, "A100-40GB")
    assert compile_check.device_memory_gb("v5p") == (95.0, "TPU v5p")
    assert compile_check.device_memory_gb("H100", memory_gb=24) == (24, "--device_memory_gb")
    assert compile_check.device_memory_gb() == (80.0, "default")
