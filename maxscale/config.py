"""Run configuration: the defaults (one place), command-line overrides, validation.

A run is described by one `ml_collections.ConfigDict`. Experiment files in `configs/` start from `defaults()` and
change a few fields; the command line overrides fields with `--config.<section>.<field>=<value>` (the big_vision /
nanodo convention). Every bad value becomes a `ConfigError` whose message is one line naming the field and the fix;
the CLIs print it and exit with code 2 before anything is written.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import math
import os
from typing import Any, Sequence

import ml_collections

from maxscale import parameterization
from maxscale.defaults import defaults  # noqa: F401 - re-exported: config.defaults() is part of this module's API
from maxscale.errors import (  # noqa: F401 - re-exported: config.ConfigError etc. are part of this module's API
    EXIT_CHECKPOINT,
    EXIT_NONFINITE,
    EXIT_PREEMPTED,
    EXIT_USAGE,
    ConfigError,
    HelpRequested,
)
from maxscale.model import moe_config
from maxscale.quant import config as quant_config
from maxscale.train import tokenizers

# ----------------------------------------------------------------------------------------------------------------
# Loading and overrides


def import_entry(path: str, entry: str, what: str, example: str):
    """Imports the Python file `path` and returns its function `entry`; ConfigError (one line) on any problem.
    `what` names the file in messages ("--config", "sweep file"); `example` is a path that would work."""
    if not os.path.isfile(path):
        raise ConfigError(f"{what}: no such file {path!r}; pass a file such as {example}")
    module_spec = importlib.util.spec_from_file_location(f"_maxscale_{entry}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # a user's file: report it in one line
        raise ConfigError(f"{what}: {path} failed to load ({type(e).__name__}: {e})") from None
    if not callable(getattr(module, entry, None)):
        raise ConfigError(f"{what}: {path} has no {entry}(); define {entry}()")
    return getattr(module, entry)


def load(spec: str) -> ml_collections.ConfigDict:
    """Loads `path/to/file.py[:arg]` by calling its `get_config()` (or `get_config(arg)`)."""
    path, _, arg = spec.partition(":")
    get_config = import_entry(path, "get_config", "--config", "configs/tiny.py")
    try:
        cfg = get_config(arg) if arg else get_config()
    except TypeError as e:
        raise ConfigError(f"--config: {path}:{arg} get_config() rejected its argument ({e})") from None
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"--config: {spec} get_config() failed ({type(e).__name__}: {e})") from None
    return cfg


def _closest(name: str, options: Sequence[str]) -> str:
    near = difflib.get_close_matches(name, options, n=3, cutoff=0.5)
    return f"did you mean {' or '.join(near)}?" if near else f"valid fields: {', '.join(sorted(options))}"


def _all_fields(cfg: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    out = []
    for k, v in cfg.items():
        if isinstance(v, ml_collections.ConfigDict):
            out += _all_fields(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}")
    return out


def _parse_value(key: str, text: str, current: Any) -> Any:
    """Parses `text` to the type of the field's current value; a mismatch is a ConfigError naming the field."""
    kind = type(current)
    if kind is bool:
        low = text.strip().lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ConfigError(f"--config.{key}={text}: expected true or false")
    if kind is str:
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if kind is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"--config.{key}={text}: expected an integer, e.g. --config.{key}={current}")
        return int(value)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"--config.{key}={text}: expected a number, e.g. --config.{key}={current}")
        return float(value)
    if kind in (tuple, list):
        if not isinstance(value, (tuple, list)):
            value = (value,)
        return kind(value)
    return value


def override(cfg: ml_collections.ConfigDict, key: str, text: str) -> None:
    """Applies `--config.<key>=<text>` in place."""
    parts = key.split(".")
    node = cfg
    for i, part in enumerate(parts):
        here = ".".join(parts[: i + 1])
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            options = (
                [".".join(parts[:i] + [k]) for k in node.keys()] if isinstance(node, ml_collections.ConfigDict) else []
            )
            if isinstance(node, ml_collections.ConfigDict):
                raise ConfigError(f"--config.{key}: unknown field {here!r}; {_closest(here, options)}")
            raise ConfigError(f"--config.{key}: {'.'.join(parts[:i])} is a value, not a section")
        if i < len(parts) - 1:
            node = node[part]
    current = node[parts[-1]]
    if isinstance(current, ml_collections.ConfigDict):
        raise ConfigError(
            f"--config.{key}: is a section; set one of its fields, e.g. --config.{key}.{next(iter(current.keys()))}=..."
        )
    value = _parse_value(key, text, current)
    with node.unlocked():
        node[parts[-1]] = value


def check_known_fields(cfg: ml_collections.ConfigDict) -> None:
    """A config file may only set fields that `defaults()` knows: catches typos in experiment files."""
    known = set(_all_fields(defaults()))
    for field in _all_fields(cfg):
        if field not in known:
            raise ConfigError(f"config field {field!r} is unknown; {_closest(field, sorted(known))}")


# ----------------------------------------------------------------------------------------------------------------
# Validation

_CHOICES = {
    "model.mlp": ("swiglu", "gelu"),
    "model.norm": ("rmsnorm", "layernorm"),
    "model.dtype": ("float32", "bfloat16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.remat": ("none", "full", "dots", "dots_no_batch", "save_attn_out", "offload"),
    "model.attention_impl": ("auto", "xla", "chunked", "cudnn", "splash", "explicit"),
    "optimizer.name": ("adamw",),
    "optimizer.weight_decay_mode": ("coupled", "independent"),
    "optimizer.grad_clip_mode": ("auto", "global", "relative"),
    "schedule.name": ("constant", "cosine", "wsd", "power"),
    "train.nan_policy": ("stop", "skip"),
}
_POSITIVE = """
    model.width model.depth model.num_heads model.vocab_size data.seq_len train.batch_size train.steps
    model.attention_chunk_size train.microbatches
    train.eval_every train.log_every checkpoint.every checkpoint.max_to_keep checkpoint.local_max_to_keep
    optimizer.lr optimizer.eps
    parameterization.init_std
""".split()
_NON_NEGATIVE = """
    model.num_kv_heads model.head_dim model.ffn_size optimizer.weight_decay optimizer.grad_clip
    schedule.warmup_steps train.eval_steps train.sample_tokens data.max_bytes parameterization.base_width
    parameterization.base_depth parameterization.base_num_heads parameterization.base_head_dim
    parameterization.base_ffn_size parameterization.embed_init_std train.preempt_grace_s train.debug_nan_at_step
    checkpoint.local_every model.loss_chunk_size model.output_z_loss
""".split()


def _get(cfg, field):
    node = cfg
    for part in field.split("."):
        node = node[part]
    return node


def resolve(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Validates `cfg` and returns a copy with derived sizes filled in. Raises ConfigError on the first bad field."""
    check_known_fields(cfg)
    raw = cfg.to_dict()
    raw["model"]["remat"] = _remat_name(raw["model"].get("remat", "none"))  # may change type: before ConfigDict
    cfg = ml_collections.ConfigDict(raw)
    for field, choices in _CHOICES.items():
        if _get(cfg, field) not in choices:
            raise ConfigError(f"{field}={_get(cfg, field)!r} is not supported; choose one of {', '.join(choices)}")
    tokenizers.resolve_vocab(cfg)  # data.tokenizer is a tokenizer; model.vocab_size 0 = derived from it
    for field in _POSITIVE:
        v = _get(cfg, field)
        if not v > 0:
            raise ConfigError(f"{field}={v} must be positive; set --config.{field} to a value > 0")
    for field in _NON_NEGATIVE:
        v = _get(cfg, field)
        if v < 0:
            raise ConfigError(f"{field}={v} must be >= 0 (0 means derived/off)")
    o = cfg.optimizer
    # a fixed threshold does not transfer across widths under muP (docs/training.md); with clipping off the mode
    # stays as given, so it neither changes a run id nor makes two unclipped runs look different
    if o.grad_clip_mode == "auto" and o.grad_clip > 0:
        o.grad_clip_mode = "global" if cfg.parameterization.name == "sp" else "relative"
    if not o.grad_clip_ratio > 1:
        raise ConfigError(f"optimizer.grad_clip_ratio={o.grad_clip_ratio} must be > 1 (clip at ratio x running norm)")

    m = cfg.model
    if m.head_dim == 0:
        if m.width % m.num_heads:
            raise ConfigError(
                f"model.width={m.width} is not divisible by model.num_heads={m.num_heads}; "
                f"choose heads dividing the width or set model.head_dim explicitly"
            )
        m.head_dim = m.width // m.num_heads
    if m.head_dim % 2:
        raise ConfigError(f"model.head_dim={m.head_dim} must be even for rotary embeddings")
    if m.num_kv_heads == 0:
        m.num_kv_heads = m.num_heads
    if m.num_heads % m.num_kv_heads:
        raise ConfigError(
            f"model.num_heads={m.num_heads} is not divisible by model.num_kv_heads={m.num_kv_heads}; "
            f"grouped-query attention needs whole groups"
        )
    if m.ffn_size == 0:
        m.ffn_size = 4 * m.width if m.mlp == "gelu" else 64 * math.ceil(8 * m.width / 3 / 64)
    _check_performance_fields(cfg)

    o = cfg.optimizer
    for field in ("b1", "b2"):
        if not 0.0 <= o[field] < 1.0:
            raise ConfigError(f"optimizer.{field}={o[field]} must lie in [0, 1)")
    s = cfg.schedule
    if not 0.0 <= s.final_lr_fraction <= 1.0:
        raise ConfigError(f"schedule.final_lr_fraction={s.final_lr_fraction} must lie in [0, 1]")
    if not 0.0 <= s.decay_fraction <= 1.0:
        raise ConfigError(f"schedule.decay_fraction={s.decay_fraction} must lie in [0, 1]")
    if s.power_t0 <= 0:
        raise ConfigError(f"schedule.power_t0={s.power_t0} must be positive")
    if not 0.0 < cfg.data.eval_fraction < 1.0:
        raise ConfigError(f"data.eval_fraction={cfg.data.eval_fraction} must lie in (0, 1)")
    if cfg.train.spike_factor != 0 and not cfg.train.spike_factor > 1:
        raise ConfigError(
            f"train.spike_factor={cfg.train.spike_factor} must be > 1 (a multiple of the running "
            f"mean loss) or 0 to turn spike logging off"
        )
    _resolve_checkpoint(cfg.checkpoint)
    _resolve_metrics(cfg.get("metrics"))

    for axis in ("data", "fsdp", "tensor", "expert"):
        v = cfg.mesh[axis]
        if v == 0 or v < -1:
            raise ConfigError(f"mesh.{axis}={v} must be a positive size or -1 (fill the remaining devices)")
    if sum(cfg.mesh[a] == -1 for a in ("data", "fsdp", "tensor", "expert")) > 1:
        raise ConfigError("mesh: at most one axis may be -1; give the others explicit sizes")
    for axis in ("data", "fsdp", "tensor", "expert"):
        v, size = cfg.mesh[f"dcn_{axis}"], cfg.mesh[axis]
        if v < 1:
            raise ConfigError(f"mesh.dcn_{axis}={v} must be >= 1 (1 = the axis stays inside one slice)")
        if size != -1 and size % v:
            raise ConfigError(
                f"mesh.dcn_{axis}={v} does not divide mesh.{axis}={size}; the axis is dcn x ici "
                f"devices, so choose mesh.{axis} as a multiple of mesh.dcn_{axis}"
            )

    parameterization.resolve(cfg)
    moe_config.resolve(cfg)
    quant_config.resolve(cfg)
    return cfg


def _remat_name(value) -> Any:
    """model.remat as a policy name: true/false (configs before the policies existed) mean full/none."""
    if isinstance(value, bool) or (isinstance(value, str) and value.lower() in ("true", "false")):
        return "full" if str(value).lower() == "true" else "none"
    return value


def _check_performance_fields(cfg: ml_collections.ConfigDict) -> None:
    """Chunk sizes that must divide the sequence, microbatches that must divide the batch (backend-dependent
    attention checks happen in Setup.build, where the mesh is known: attention.check)."""
    m, T = cfg.model, cfg.data.seq_len
    if m.attention_impl == "chunked" and T % min(m.attention_chunk_size, T):
        raise ConfigError(
            f"model.attention_chunk_size={m.attention_chunk_size} does not divide data.seq_len={T}; "
            f"choose a divisor of {T} (e.g. {math.gcd(T, m.attention_chunk_size)})"
        )
    if m.loss_chunk_size and T % m.loss_chunk_size:
        raise ConfigError(
            f"model.loss_chunk_size={m.loss_chunk_size} does not divide data.seq_len={T}; "
            f"choose a divisor of {T} (e.g. {math.gcd(T, m.loss_chunk_size)}) or 0 for the whole sequence"
        )
    k, B = cfg.train.microbatches, cfg.train.batch_size
    if B % k:
        raise ConfigError(
            f"train.microbatches={k} does not divide train.batch_size={B}; choose a divisor of {B} or a batch "
            f"size that is a multiple of {k}"
        )


def _resolve_metrics(m: ml_collections.ConfigDict | None) -> None:
    """The optional writers: a known W&B mode, and wandb installed when a project is set."""
    if m is None:  # a config saved before the section existed
        return
    if m.wandb_mode not in ("offline", "online"):
        raise ConfigError(f"metrics.wandb_mode={m.wandb_mode!r} is not supported; choose one of offline, online")
    if m.wandb_project and importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            f"metrics.wandb_project={m.wandb_project!r} needs wandb: pip install wandb (or maxscale[wandb]), "
            f'or set metrics.wandb_project=""'
        )


def _resolve_checkpoint(c: ml_collections.ConfigDict) -> None:
    """keep_steps becomes a sorted tuple of step numbers (also from "10,100,1000"); the local tier must save."""
    steps = []
    for item in c.keep_steps if isinstance(c.keep_steps, (list, tuple)) else [c.keep_steps]:
        for part in item.split(",") if isinstance(item, str) else [item]:
            text = part.strip() if isinstance(part, str) else part
            value = int(text) if isinstance(text, str) and text.isdigit() else text
            if text == "":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(
                    f"checkpoint.keep_steps={c.keep_steps!r}: {part!r} is not a positive step; give step numbers, "
                    f"e.g. --config.checkpoint.keep_steps=10,100,1000"
                )
            steps.append(value)
    c.keep_steps = tuple(sorted(set(steps)))
    if not isinstance(c.local_dir, str):
        raise ConfigError(
            f'checkpoint.local_dir={c.local_dir!r} must be a path string ("" = <workdir>/checkpoints_local)'
        )
    if c.local_every and c.local_every % c.every == 0:
        raise ConfigError(
            f"checkpoint.local_every={c.local_every} is a multiple of checkpoint.every={c.every}, so the local tier "
            f"would never save; choose a local_every below checkpoint.every, or 0 to turn the local tier off"
        )


def to_json(cfg: ml_collections.ConfigDict) -> str:
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True)


def from_json(text: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(json.loads(text))


# ----------------------------------------------------------------------------------------------------------------
# Command line


def parse_argv(
    argv: Sequence[str], extra_flags: Sequence[str] = ("workdir",)
) -> tuple[ml_collections.ConfigDict, dict]:
    """Parses `--config=FILE[:arg] --config.a.b=v ... --flag=v`. Returns (config before resolve, extra flags)."""
    spec, overrides, extras = None, [], {}
    for raw in argv:
        if raw in ("-h", "--help"):
            flags = " ".join(f"[--{f}=...]" for f in extra_flags)
            raise HelpRequested(
                f"usage: --config=FILE.py[:arg] [--config.<section>.<field>=<value> ...] {flags}".strip()
            )
        if not raw.startswith("--") or "=" not in raw:
            raise ConfigError(f"argument {raw!r}: expected --name=value (e.g. --config=configs/tiny.py)")
        name, _, value = raw[2:].partition("=")
        if name == "config":
            spec = value
        elif name.startswith("config."):
            overrides.append((name[len("config.") :], value))
        elif name in extra_flags:
            extras[name] = value
        else:
            options = ["config"] + list(extra_flags)
            raise ConfigError(f"unknown flag --{name}; {_closest(name, options)}")
    if spec is None:
        raise ConfigError("--config is required, e.g. --config=configs/tiny.py")
    cfg = load(spec)
    check_known_fields(cfg)
    for key, value in overrides:
        override(cfg, key, value)
    return cfg, extras
