"""Hostile `--config.<field>=<value>` overrides, as a new user types them: every field of the schema with wrong
types, negative, zero, huge, NaN/inf, empty and unicode values, and unknown names. Each case must end in a clean
resolve (then every number in the config is finite and in range) or one ConfigError line naming the field, never
another exception. Most cases run in-process (config.parse_argv + resolve); a few run `python -m maxscale.train` to
prove exit code 2, one line on stderr, no traceback and nothing written to the workdir."""

import math
import os
import subprocess
import sys

import ml_collections
import pytest
from conftest import ROOT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from maxscale import config as config_lib
from maxscale import defaults as schema
from maxscale.errors import ConfigError

TINY = os.path.join(ROOT, "configs", "tiny.py")
HOSTILE = [
    *("", " ", "abc", "ü€😀", "\u202e", "None", "True", "[]", "()", "{}", "(1,", "'x'", "[1, 2]", "1_000"),
    *("0", "-0", "1", "-1", "0.5", "-0.5", "3.5", "1e-30", "1e30", "-1e30", "2**64", "9223372036854775808"),
    *("1e999", "-1e999", "nan", "inf", "-inf", "NaN"),
]
NAMES = [f.name for f in schema.FIELDS]
UNKNOWN = ["model.widht", "modle.width", "model", "model.moe", "train.batch_size.x", "ü.ß", "", ".", "model..width"]
TRIED = {"cases": 0, "errors": 0}


def outcome(name: str, text: str) -> str | None:
    """None when `--config.<name>=<text>` resolves, else the ConfigError's message. Any other exception (a
    traceback for the user) fails the test; so does an accepted config holding a non-finite or overlong number."""
    TRIED["cases"] += 1
    try:
        cfg, _ = config_lib.parse_argv([f"--config={TINY}", f"--config.{name}={text}"])
        resolved = config_lib.resolve(cfg)
    except ConfigError as e:
        TRIED["errors"] += 1
        message = str(e)
        assert message and "\n" not in message and "Traceback" not in message, (name, text, message)
        return message
    for field, value in _numbers(resolved):
        assert math.isfinite(value), (name, text, field, value)
        assert not isinstance(value, int) or abs(value) < schema.WIDE_INTS.get(field, 2**31), (name, text, field)
    return None


def _numbers(cfg: ml_collections.ConfigDict, prefix: str = ""):
    for key, value in cfg.items():
        if isinstance(value, ml_collections.ConfigDict):
            yield from _numbers(value, f"{prefix}{key}.")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield prefix + key, value


@pytest.mark.parametrize("section", sorted({n.split(".")[0] for n in NAMES}))
def test_every_field_with_every_hostile_value(section):
    """Exhaustive over the schema: each field of `section` times every value of HOSTILE."""
    for name in (n for n in NAMES if n.split(".")[0] == section):
        for text in HOSTILE:
            outcome(name, text)


def test_unknown_names_are_refused_with_a_suggestion():
    for name in UNKNOWN:
        assert outcome(name, "1") is not None, name
    message = outcome("model.widht", "64")
    assert "unknown field 'model.widht'" in message and "model.width" in message, message


def test_the_values_the_issue_found_are_refused_before_anything_runs():
    for name, text, needle in [
        ("data.seed", "1e30", "data.seed"),
        ("train.batch_size", "1e30", "train.batch_size"),
        ("model.rope_theta", "0", "model.rope_theta"),
        ("data.seed", "-1", "data.seed"),
        ("optimizer.lr", "1e999", "finite"),
        ("train.batch_size", "100000000", "tokens per step"),
    ]:
        message = outcome(name, text)
        assert message is not None and needle in message, (name, text, message)


numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.floats(min_value=-1e40, max_value=1e40).map(lambda x: f"{x:e}"),
)
values = st.one_of(numbers, st.text(max_size=12), st.sampled_from(HOSTILE))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.one_of(st.sampled_from(NAMES), st.text(max_size=16)), text=values)
def test_random_overrides_end_in_a_config_or_one_line(name, text):
    if "=" in name or "\x00" in name + text:  # argv cannot carry NUL; '=' ends a flag name by definition
        return
    outcome(name, text)


@pytest.mark.parametrize(
    "override",
    [
        "--config.data.seed=1e30",
        "--config.train.batch_size=1e30",
        "--config.model.rope_theta=0",
        "--config.optimizer.lr=nan",
        "--config.model.width=ü",
        "--config.model.widht=64",
    ],
)
def test_train_exits_2_with_one_line_and_writes_nothing(tmp_path, override):
    workdir = tmp_path / "run"
    r = subprocess.run(
        [sys.executable, "-m", "maxscale.train", f"--config={TINY}", override, f"--workdir={workdir}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stdout + r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert not workdir.exists()  # refused before anything was written
