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


def defaults() -> ml_collections.ConfigDict:
    """Every field a run can set, with its default. Sizes of 0 mean 'derive from the other fields'."""
    c = ml_collections.ConfigDict()

    c.model = dict(
        width=256,  # d_model
        depth=4,  # number of transformer blocks
        num_heads=4,
        num_kv_heads=0,  # grouped-query attention; 0 = num_heads
        head_dim=0,  # 0 = width // num_heads
        ffn_size=0,  # 0 = 4 * width (gelu) or 8/3 * width rounded up to a multiple of 64 (swiglu)
        vocab_size=256,  # the byte tokenizer needs 256; token files need at least their header's vocab
        mlp="swiglu",  # swiglu | gelu
        norm="rmsnorm",  # rmsnorm | layernorm
        norm_eps=1e-6,
        tie_embeddings=False,
        qk_norm=False,
        rope_theta=10_000.0,
        dtype="float32",  # compute dtype: float32 | bfloat16
        param_dtype="float32",
        remat=False,  # rematerialise each block in the backward pass (saves activation memory)
        # Mixture of experts (maxscale/model/moe.py, docs/moe.md); num_experts=0 is a dense model.
        moe=dict(
            num_experts=0,  # E routed experts per MoE block
            num_active=2,  # k experts per token
            expert_ffn_size=0,  # M, hidden size of each expert; 0 = ffn_size // num_active (same active FLOPs)
            num_shared=0,  # shared experts run on every token
            shared_ffn_size=0,  # 0 = expert_ffn_size
            first_dense=0,  # the first n blocks keep a dense MLP; the rest are MoE
            score="sigmoid",  # sigmoid (the paper) | softmax
            combine="mean_k",  # mean_k: (1/k) sum of gate x expert (the paper) | renorm: gates sum to 1 (Mixtral)
            balance="bias",  # bias: routing bias updated from the load, outside the optimizer | aux | none
            bias_rule="linear",  # linear: b -= rate (Load - k/E) (the paper) | sign: DeepSeek-V3
            bias_rate=0.01,  # linear: the paper's eta_b (b moves by rate x (Load - k/E) per step)
            aux_loss_weight=0.01,  # with balance=aux: weight of the load-balancing loss (1 at balance)
            z_loss_weight=0.0,  # router z-loss weight
            dispatch="dropless",  # dropless (ragged_dot; GPU/TPU) | capacity (fast on CPU) | dense (reference)
            capacity_factor=1.25,  # capacity: slots per expert = ceil(cf k tokens / E); later tokens drop first
        ),
    )

    # Rules live in maxscale/parameterization.py; these are their inputs. Base shapes of 0 = the model's own.
    c.parameterization = dict(
        name="sp",  # sp | mup | depth_mup | completep
        depth_alpha=-1.0,  # branch multiplier m_L^-alpha; -1 = the parameterization's own (0, 0, 1/2, 1)
        base_width=0,
        base_depth=0,
        base_num_heads=0,
        base_head_dim=0,
        base_ffn_size=0,
        init_std=0.02,  # sigma: base init std of every matrix
        embed_init_std=0.0,  # 0 = init_std
        input_mult=1.0,  # embedding output multiplier
        output_mult=1.0,  # readout multiplier (muP divides it by m_N)
        attn_mult=1.0,  # attention logit multiplier
        attn_exponent=-1.0,  # logit scale d_head^-exponent; -1 = the parameterization's own (1/2 SP, 1 muP)
        zero_init_readout=False,
        zero_init_query=False,
        scale_eps=True,  # muP-family eps scaling (CompleteP Table 1); off = the same eps everywhere
        eps_depth_scope="blocks",  # eps x m_L^-alpha on: blocks (CompleteP Table 1) | all (nanoGPT-mup completep)
        width_grows="head_dim",  # scale_shapes(): head_dim (fixed heads) | heads (fixed head dim)
        base_num_experts=0,  # MoE base shapes (0 = the model's own); k/E must match the base's (check_kappa)
        base_num_active=0,
        base_expert_ffn_size=0,
        router_init_gamma=1.0,  # router init std x (D/D0)^-gamma under muP-family rules (the paper: gamma = 1)
        expert_down_init="mean_field",  # mean_field: sigma (D/D0)^1/2 (M/M0)^-1 (the paper) | fan_in (muP control)
        check_kappa=True,  # refuse k/E different from the base's: hyperparameters do not transfer across k/E
    )

    # Quantized training (maxscale/quant): formats none | int<b> (b = 2..16) | e<x>m<y> (1+x+y = 3..16 bits).
    c.quant = dict(
        weights="none",  # P_w: matmul weights (fake quantization, straight-through gradient)
        activations="none",  # P_a: matmul inputs
        kv="none",  # P_kv: attention keys and values
        weights_granularity="per_channel",  # per_tensor | per_channel | per_token | per_block
        activations_granularity="per_tensor",
        kv_granularity="per_token",
        block_size=32,  # per_block: values sharing one scale along the contracted axis
        whole_attention=False,  # also quantize queries and attention probabilities at the kv format (the paper)
        embeddings=False,  # quantize the embedding lookup's table too (hidden matrices always are)
        readout=False,
        router=False,
        asymmetric=False,  # integer formats: min/max with a zero point instead of symmetric absmax
        stochastic=False,  # stochastic rounding (integer formats)
    )

    c.optimizer = dict(
        name="adamw",
        lr=3e-3,
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        weight_decay=0.0,
        weight_decay_mode="coupled",  # coupled: p -= lr*wd*p (torch AdamW); independent: p -= sched(t)*wd*p
        grad_clip=1.0,  # global-norm clipping; 0 = off
    )

    c.schedule = dict(
        name="cosine",  # constant | cosine | wsd | power
        warmup_steps=0,
        final_lr_fraction=0.1,  # cosine and wsd end at lr * this
        decay_fraction=0.2,  # wsd: the last fraction of steps decays linearly
        power_t0=100.0,  # power: eta0 * (1 + t/t0)^-chi * (1 - t/T)^delta
        power_chi=0.5,
        power_delta=0.0,
    )

    c.data = dict(
        source="stdlib",  # stdlib | text file, glob or directory | token file from tools/prepare_data.py
        seq_len=128,
        seed=0,
        eval_fraction=0.02,  # share of documents held out for eval
        max_bytes=0,  # 0 = no limit; caps the corpus read (useful for quick experiments)
    )

    c.train = dict(
        batch_size=16,  # global, in sequences
        steps=1000,
        seed=0,
        eval_every=200,
        eval_steps=4,
        log_every=10,
        sample_tokens=200,  # generated at the end of the run; 0 = none
        sample_prompt="def ",
        peak_flops=0.0,  # per-device peak for MFU; 0 = known table, else a matmul measured at start
        nan_policy="stop",  # non-finite loss/gradient: stop (keep the last good checkpoint) | skip the update
        spike_factor=2.0,  # log a loss spike when a logged loss exceeds this x its running mean; 0 = off
        preempt_grace_s=0.0,  # after SIGTERM/SIGINT, exit within this many seconds, saved or not; 0 = no limit
        debug_nan_at_step=0,  # for tests: make the loss and gradients of this step NaN; 0 = off
    )

    c.checkpoint = dict(
        every=500,
        max_to_keep=3,
        async_save=True,
        verify=True,  # check each file's CRC-32 against the checkpoint's manifest before restoring
    )

    # Axis sizes in devices; -1 fills the rest. dcn_<axis>: how many slices (hosts joined by the data-centre
    # network) that axis spans, a divisor of its size; the rest of it stays inside a slice (ICI). docs/sharding.md
    c.mesh = dict(data=-1, fsdp=1, tensor=1, expert=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1, dcn_expert=1)

    c.distributed = dict(
        coordinator_address="",
        num_processes=0,
        process_id=-1,
        local_device_ids="",
    )
    return c


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
    "optimizer.name": ("adamw",),
    "optimizer.weight_decay_mode": ("coupled", "independent"),
    "schedule.name": ("constant", "cosine", "wsd", "power"),
    "train.nan_policy": ("stop", "skip"),
}
_POSITIVE = """
    model.width model.depth model.num_heads model.vocab_size data.seq_len train.batch_size train.steps
    train.eval_every train.log_every checkpoint.every checkpoint.max_to_keep optimizer.lr optimizer.eps
    parameterization.init_std
""".split()
_NON_NEGATIVE = """
    model.num_kv_heads model.head_dim model.ffn_size optimizer.weight_decay optimizer.grad_clip
    schedule.warmup_steps train.eval_steps train.sample_tokens data.max_bytes parameterization.base_width
    parameterization.base_depth parameterization.base_num_heads parameterization.base_head_dim
    parameterization.base_ffn_size parameterization.embed_init_std train.preempt_grace_s train.debug_nan_at_step
""".split()


def _get(cfg, field):
    node = cfg
    for part in field.split("."):
        node = node[part]
    return node


def resolve(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Validates `cfg` and returns a copy with derived sizes filled in. Raises ConfigError on the first bad field."""
    check_known_fields(cfg)
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    for field, choices in _CHOICES.items():
        if _get(cfg, field) not in choices:
            raise ConfigError(f"{field}={_get(cfg, field)!r} is not supported; choose one of {', '.join(choices)}")
    for field in _POSITIVE:
        v = _get(cfg, field)
        if not v > 0:
            raise ConfigError(f"{field}={v} must be positive; set --config.{field} to a value > 0")
    for field in _NON_NEGATIVE:
        v = _get(cfg, field)
        if v < 0:
            raise ConfigError(f"{field}={v} must be >= 0 (0 means derived/off)")

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
