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

from maxscale import defaults as schema
from maxscale import parameterization
from maxscale.defaults import MESH_AXES, defaults  # noqa: F401 - re-exported: config.defaults() is part of the API
from maxscale.errors import (  # noqa: F401 - re-exported: config.ConfigError etc. are part of this module's API
    EXIT_CHECKPOINT,
    EXIT_NONFINITE,
    EXIT_PREEMPTED,
    EXIT_USAGE,
    ConfigError,
    HelpRequested,
)
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
    """Applies `--config.<key>=<text>` in place. The error names what was typed with unprintable characters
    escaped (a newline or a control character in a value must not break the one-line message)."""
    try:
        _override(cfg, key, text)
    except ConfigError as e:
        raise ConfigError("".join(c if c.isprintable() else repr(c)[1:-1] for c in str(e))) from None


def _override(cfg: ml_collections.ConfigDict, key: str, text: str) -> None:
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
        if field not in known and field not in schema.REMOVED:
            raise ConfigError(f"config field {field!r} is unknown; {_closest(field, sorted(known))}")


# ----------------------------------------------------------------------------------------------------------------
# Validation


def _get(cfg, field, missing=None):
    """The value of a dotted field; `missing` where a section or the field is absent (a config saved before it)."""
    node = cfg
    for part in field.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return missing
        node = node[part]
    return node


def _drop_removed(raw: dict) -> None:
    """Removes the fields that `defaults.REMOVED` lists from a config dict (an old config.json may carry them): at
    the value they always had they are no difference; another value was never possible, so it is refused."""
    for field, value in schema.REMOVED.items():
        *sections, leaf = field.split(".")
        node = raw
        for s in sections:
            node = node.get(s) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node:
            if node[leaf] != value:
                raise ConfigError(f"{field}={node[leaf]!r}: the field was removed (only {value!r} existed); delete it")
            del node[leaf]


def check_fields(cfg: ml_collections.ConfigDict) -> None:
    """Every field against its declaration (choices or range, maxscale/defaults.py); ConfigError on the first bad."""
    for f in schema.FIELDS:
        problem = f.problem(_get(cfg, f.name, f.default))
        if problem:
            raise ConfigError(problem)


def resolve(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Validates `cfg` and returns a copy with derived sizes filled in. Raises ConfigError on the first bad field.
    Every check that needs only the config is here (or in the resolvers it calls), so a bad value is refused before
    anything is written; checks that need the mesh or the backend run when those exist (attention.check)."""
    check_known_fields(cfg)
    raw = cfg.to_dict()
    _drop_removed(raw)
    raw["model"]["remat"] = _remat_name(raw["model"].get("remat", "none"))  # may change type: before ConfigDict
    cfg = ml_collections.ConfigDict(raw)
    check_fields(cfg)
    _check_step_size(cfg)
    tokenizers.resolve_vocab(cfg)  # data.tokenizer is a tokenizer; model.vocab_size 0 = derived from it
    o = cfg.optimizer
    # a fixed threshold does not transfer across widths under muP (docs/training.md); with clipping off the mode
    # stays as given, so it neither changes a run id nor makes two unclipped runs look different
    if o.grad_clip_mode == "auto" and o.grad_clip > 0:
        o.grad_clip_mode = "global" if cfg.parameterization.name == "sp" else "relative"
    _resolve_model(cfg.model)
    _check_performance_fields(cfg)
    _resolve_checkpoint(cfg.checkpoint)
    _resolve_metrics(cfg.get("metrics"))
    _check_mesh(cfg.mesh)
    parameterization.resolve(cfg)
    _resolve_moe(cfg)
    quant_config.resolve(cfg)
    return cfg


def _check_step_size(cfg: ml_collections.ConfigDict) -> None:
    """The tokens of one step must be countable in int32 (the batch arrays, token counters): a batch size that each
    field's own bound allows can still not fit once multiplied by the sequence length."""
    tokens = cfg.train.batch_size * cfg.data.seq_len
    if tokens >= schema.INT_LIMIT:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} x data.seq_len={cfg.data.seq_len} = {tokens} tokens per step "
            f"is too large; keep it below {schema.INT_LIMIT} (fewer or shorter sequences per step)"
        )


def _resolve_model(m: ml_collections.ConfigDict) -> None:
    """Head dim, kv heads and MLP size of 0 derived; the attention shapes must fit together."""
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


def _check_mesh(mesh: ml_collections.ConfigDict) -> None:
    """At most one axis fills the rest; each dcn size divides its axis (the sizes alone: the schema)."""
    if sum(mesh[a] == -1 for a in MESH_AXES) > 1:
        raise ConfigError("mesh: at most one axis may be -1; give the others explicit sizes")
    for axis in MESH_AXES:
        v, size = mesh[f"dcn_{axis}"], mesh[axis]
        if size != -1 and size % v:
            raise ConfigError(
                f"mesh.dcn_{axis}={v} does not divide mesh.{axis}={size}; the axis is dcn x ici "
                f"devices, so choose mesh.{axis} as a multiple of mesh.dcn_{axis}"
            )


def _resolve_moe(cfg: ml_collections.ConfigDict) -> None:
    """The MoE layout and sizes (after the parameterization's base shapes): expert and shared sizes of 0 derived,
    the MoE base shapes filled, and k/E checked against the base's."""
    m, e, p = cfg.model, cfg.model.moe, cfg.parameterization
    if e.num_experts == 0:
        return
    if not 1 <= e.num_active <= e.num_experts:
        raise ConfigError(f"model.moe.num_active={e.num_active} must lie in [1, model.moe.num_experts={e.num_experts}]")
    if e.first_dense >= m.depth:
        raise ConfigError(
            f"model.moe.first_dense={e.first_dense} leaves no MoE block in model.depth={m.depth}; "
            f"make it smaller or set model.moe.num_experts=0 for a dense model"
        )
    if (m.depth - e.first_dense) % e.every:
        raise ConfigError(
            f"model.moe.every={e.every} must be >= 1 and divide the {m.depth - e.first_dense} blocks after "
            f"model.moe.first_dense={e.first_dense} (groups of every - 1 dense blocks and one MoE block)"
        )
    if e.expert_ffn_size == 0:
        e.expert_ffn_size = max(m.ffn_size // e.num_active, 1)  # the dense model's active FLOPs
    if e.shared_ffn_size == 0:
        e.shared_ffn_size = e.expert_ffn_size
    for base, own in (("base_num_experts", "num_experts"), ("base_num_active", "num_active")):
        if p[base] == 0:
            p[base] = e[own]
    if p.base_expert_ffn_size == 0:
        p.base_expert_ffn_size = parameterization.follow_width(cfg, "base_expert_ffn_size", e.expert_ffn_size)
    if p.check_kappa and e.num_active * p.base_num_experts != p.base_num_active * e.num_experts:
        raise ConfigError(
            f"model.moe: k/E = {e.num_active}/{e.num_experts} differs from the base's "
            f"{p.base_num_active}/{p.base_num_experts}; hyperparameters do not transfer across k/E, so scale k with E "
            f"(or set parameterization.check_kappa=false for a deliberate control)"
        )


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
