"""Coordinate check: do activations stay the same size as the model grows? (docs/parameterizations.md, section 6)

For each parameterization, each size (width: every width dimension scaled together by `scale_shapes`; depth; or, for
MoE models, experts and expert size) and each seed: train a few steps at a large constant LR on one fixed batch with
the model's own initializer and forward pass, and record, before every update and after the last, the mean |x| of
the embedding output, of each block's attention and MLP outputs (before the residual multiplier), of the attention
logits (mean |scale q.k| over causal pairs) and mixed values (softmax(.) v), of the residual stream after each
block, and of the logits; and two update sizes measured against the init: each block's residual increment
(`update/<layer>`, `update/total` summed over layers) and the learned part of the attention logits,
scale (q_t - q_0).(k_t - k_0) (`attn_update`).

The verdict is the log-log slope of each curve against the size (mean over seeds) at every step from `judge_from`
(default 2) on. Step 0 is the initialisation, where muP's logits shrink like width^-1/2 by design (a readout of
fixed init std times 1/m_N), and at step 1 that init term still competes with the first update; from step 2 the
updates dominate (zero_init_readout removes the effect altogether). A parameterization passes when the largest
|slope| of the judged curves is at most `threshold` (default 0.3: muP's curves sit near 0, SP's near 1 or above,
since an Adam update moves W x by O(fan_in) under SP). For width every curve is judged both ways, except the
attention-logit curves, judged for growth only (over a few steps they hold cross terms with the random init that
shrink like d_head^-1/2 under the 1/d rule). For depth the residual stream and the total update are judged both
ways (neither growth nor collapse); the slope of the per-layer update size is reported: about -1 under CompleteP
(each block moves the stream by ~1/L), shallower under depth-muP, positive with alpha = 0.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from maxscale import cli, parameterization
from maxscale import config as config_lib
from maxscale.analysis import coord_plot
from maxscale.errors import ConfigError
from maxscale.model import transformer
from maxscale.parallel import sharding
from maxscale.train import step as step_lib

AXES = ("width", "depth", "experts", "experts_fixed_k", "expert_ffn")
DEFAULT_SIZES = {"width": "64,128,256,512,1024", "depth": "2,4,8,16,32", "experts": "4,8,16,32"}
DEFAULT_SIZES.update(experts_fixed_k=DEFAULT_SIZES["experts"], expert_ffn="32,64,128,256")
DEFAULT_THRESHOLD = 0.3  # |d log mean|x| / d log size|: SP sits near 1 or above after a large-LR step, muP near 0
DEFAULT_JUDGE_FROM = 2  # first judged step (see the module docstring)
# The command line's defaults (docs/transfer.md): a constant LR of 0.005 (about the tuned LR of the 200-step tiny
# runs, at full strength from step 1) makes the updates, not the init, set the curves by step 2 while muP stays
# below the threshold (max |slope| 0.26 over widths 64-256); the configs' own LRs are tuned for a decaying schedule
# (tiny's 1e-2 puts muP's mlp/0 at 0.39). One batch is read, so a corpus of 300 kB is enough.
DEFAULT_LR = 0.005
DEFAULT_MAX_BYTES = 300_000
# axis -> (judged curves or None for all, "abs": |slope| <= threshold | "growth": slope <= threshold)
# Attention logits (and their learned part) are judged for growth only: over a few steps they are dominated by
# cross terms with the random init, which shrink like d_head^-1/2 under the 1/d rule by design, as muP's logits do.
GROWTH_ONLY = ("attn_logits", "attn_update")
# depth: the residual stream and the total update (summed over layers) must neither grow nor collapse with depth
JUDGED = {"width": (None, "abs"), "depth": (("resid/last", "resid/mean", "update/total"), "abs")}
# experts: E grows with k/E fixed (the paper's scaling); experts_fixed_k: the control, k fixed (must drift);
# expert_ffn: the expert hidden size M grows. All curves judged as for width.
JUDGED.update({axis: (None, "abs") for axis in ("experts", "experts_fixed_k", "expert_ffn")})


@dataclasses.dataclass(frozen=True)
class Variant:
    """One parameterization to check: a name from the table, an optional depth exponent override, and optional
    `parameterization.*` overrides (to check that a wrong rule fails, e.g. mup with SP's attention scaling)."""

    name: str
    depth_alpha: float = -1.0
    fields: tuple[tuple[str, str], ...] = ()

    @property
    def label(self) -> str:
        label = self.name if self.depth_alpha == -1.0 else f"{self.name}(alpha={self.depth_alpha:g})"
        return label + "".join(f"+{k}={v}" for k, v in self.fields)

    @classmethod
    def parse(cls, text: str) -> "Variant":
        """'mup', 'completep:0' (name:depth_alpha), 'mup+attn_exponent=0.5' (+parameterization.field=value)."""
        head, *extra = text.split("+")
        name, _, alpha = head.partition(":")
        if name not in parameterization.RULES:
            raise ConfigError(
                f"parameterization {name!r} is not in the table; choose from {', '.join(parameterization.RULES)}"
            )
        fields = tuple(tuple(e.split("=", 1)) for e in extra)
        if any(len(f) != 2 for f in fields):
            raise ConfigError(f"{text!r}: write overrides as +field=value, e.g. mup+attn_exponent=0.5")
        try:
            return cls(name, float(alpha) if alpha else -1.0, fields)
        except ValueError:
            raise ConfigError(f"{text!r}: the depth exponent after ':' must be a number, e.g. completep:0") from None


def size_config(base: ml_collections.ConfigDict, axis: str, size: int, variant: Variant) -> ml_collections.ConfigDict:
    """The resolved config of `base` scaled to `size` along `axis`, under `variant`, for a coordinate check:
    constant LR, no warmup, weight decay or clipping (clipping would hide a blow-up)."""
    if axis in ("width", "depth"):
        overrides = parameterization.scale_shapes(base, **{axis: size})
    else:
        overrides = {**parameterization.scale_shapes(base), **moe_overrides(base, axis, size)}
    overrides.update(
        {
            "parameterization.name": variant.name,
            "parameterization.depth_alpha": variant.depth_alpha,
            **{f"parameterization.{k}": v for k, v in variant.fields},
            "schedule.name": "constant",
            "schedule.warmup_steps": 0,
            "optimizer.weight_decay": 0.0,
            "optimizer.grad_clip": 0.0,
        }
    )
    cfg = ml_collections.ConfigDict(base.to_dict())
    for key, value in overrides.items():
        config_lib.override(cfg, key, value if isinstance(value, str) else repr(value))
    return config_lib.resolve(cfg)


def moe_overrides(base: ml_collections.ConfigDict, axis: str, size: int) -> dict:
    """Overrides that grow an MoE model's experts or expert size from `base` (whose MoE sizes are the base
    shapes). The capacity factor is E/k, so no token is dropped at any size: drops would move the curves."""
    e = base.model.moe
    if not e.num_experts:
        raise ConfigError(f"--axis={axis} needs an MoE model: set --config.model.moe.num_experts (e.g. 4)")
    out = {
        "parameterization.base_num_experts": e.num_experts,
        "parameterization.base_num_active": e.num_active,
        "parameterization.base_expert_ffn_size": e.expert_ffn_size,
        "model.moe.dispatch": "capacity",
    }
    E, k = e.num_experts, e.num_active
    if axis == "experts":
        if size * k % E:
            raise ConfigError(f"experts={size}: k = {size} x {k}/{E} is not whole; choose multiples of {E // k}")
        E, k = size, size * k // E
    elif axis == "experts_fixed_k":
        E = size
        out["parameterization.check_kappa"] = False
    else:
        out["model.moe.expert_ffn_size"] = size
    if not 1 <= k <= E:
        raise ConfigError(f"{axis}={size}: needs 1 <= k={k} <= E={E}")
    out.update({"model.moe.num_experts": E, "model.moe.num_active": k, "model.moe.capacity_factor": float(E) / k})
    return out


def fixed_batch(corpus, batch: int, seq_len: int) -> np.ndarray:
    """The first `batch` windows of seq_len + 1 tokens of the training split: int32 [B, T + 1]."""
    need = batch * seq_len + 1
    if len(corpus.train) < need:
        raise ConfigError(f"the corpus has {len(corpus.train)} tokens; a coordinate check batch needs {need}")
    return np.stack([np.asarray(corpus.train[i * seq_len : i * seq_len + seq_len + 1], np.int32) for i in range(batch)])


MOE_CURVES = {"moe_router_logits": "router_logits", "moe_gates": "gates", "moe_experts": "experts"}


def _flatten_stats(stats: dict) -> dict[str, float]:
    layers = {k: np.asarray(v) for k, v in stats["layers"].items()}
    # MoE blocks: router logits, combine weights and routed-expert outputs, one value per MoE layer
    layers.update({name: np.asarray(stats["moe"][k]) for k, name in MOE_CURVES.items() if k in stats.get("moe", {})})
    out = {"embed": float(stats["embed"]), "logits": float(stats["logits"])}
    for k, v in layers.items():
        out.update({f"{k}/{i}": float(x) for i, x in enumerate(v)})
        out[f"{k}/mean"] = float(v.mean())
        out[f"{k}/last"] = float(v[-1])
    return out


def _updates(delta_LND: np.ndarray) -> dict[str, float]:
    """Per-layer update size: mean |change since init| of each block's residual increment at the probe positions;
    `update/total` sums the layers (how far training has moved the residual stream)."""
    per_layer = np.abs(delta_LND).mean(axis=(1, 2))
    out = {f"update/{i}": float(u) for i, u in enumerate(per_layer)}
    out.update({"update/mean": float(per_layer.mean()), "update/total": float(per_layer.sum())})
    return out


def _logit_updates(delta_qk_L2TK: np.ndarray, scale: float) -> dict[str, float]:
    """Per-layer mean |scale (q_t - q_0).(k_t - k_0)| over causal pairs and heads (first sequence): the learned
    part of the attention logits, which the attention rule must keep width-independent (TP-V: with 1/d it is
    Theta(1), with 1/sqrt(d) it grows like sqrt(d)). The cross terms with the init vanish as width grows."""
    dq, dk = delta_qk_L2TK[:, 0], delta_qk_L2TK[:, 1]  # [L, T, H, K]
    learned_LHTS = scale * np.einsum("lthk,lshk->lhts", dq, dk)
    T, H = learned_LHTS.shape[-1], learned_LHTS.shape[1]
    per_layer = np.abs(np.tril(learned_LHTS)).sum(axis=(1, 2, 3)) / (H * T * (T + 1) / 2)
    out = {f"attn_update/{i}": float(u) for i, u in enumerate(per_layer)}
    out.update({"attn_update/mean": float(per_layer.mean()), "attn_update/last": float(per_layer[-1])})
    return out


def trajectory(cfg: ml_collections.ConfigDict, tokens_BT1: np.ndarray, seeds: int, steps: int) -> list[list[dict]]:
    """Stats [seed][step] for `steps` updates (steps + 1 records). Each update is the trainer's own
    (step.Setup.update: its loss, optimizer, finite check and MoE routing bias, on one device, the whole batch at
    once); the stats come from a capture forward pass of the params before it. The model's own initializer, the
    initial state and every step are one compiled program (a scan) whose seed is traced, so a size costs one
    compilation, shared by the seeds."""
    one = cfg.copy_and_resolve_references()
    one.train.microbatches = 1  # the batch is the coordinate check's own, updated at once
    one.mesh.update(data=1, fsdp=1, tensor=1, expert=1)
    setup = step_lib.Setup.build(one, sharding.make_mesh(one, jax.devices()[:1]))
    model = setup.model
    tokens = jnp.asarray(tokens_BT1)

    def one_seed(seed):
        def body(state, _):
            out = model.forward(state["params"], tokens[:, :-1], moe_bias=state.get("moe_bias"), capture=("stats",))
            state, metrics = setup.update(state, tokens)
            return state, {**transformer.stats_of(out), "loss": metrics["train/loss"]}

        state = setup.initial_state(model.init(seed), seed)
        # the last iteration's update is discarded: it only measures the params after `steps` updates
        _, stats = jax.lax.scan(body, state, None, length=steps + 1)
        return stats

    run_seed = jax.jit(one_seed)
    out = []
    for i in range(seeds):
        seed = cfg.train.seed + i
        stats = jax.device_get(run_seed(jnp.int32(seed)))  # leaves [step, ...]
        probes = np.asarray(stats["layers"].pop("probe"))  # [step, L, tokens, D]
        qk = np.asarray(stats["layers"].pop("qk_probe"))  # [step, L, 2 (q, k), T, heads, head_dim]
        scale = parameterization.Parameterization(cfg).attn_scale
        records = []
        for t in range(steps + 1):
            at = jax.tree.map(lambda x, t=t: x[t], stats)
            records.append(
                {
                    **_flatten_stats(at),
                    **_updates(probes[t] - probes[0]),
                    **_logit_updates(qk[t] - qk[0], scale),
                    "loss": float(at["loss"]),
                }
            )
        out.append(records)
    return out


def run(
    base: ml_collections.ConfigDict,
    axis: str,
    sizes: list[int],
    variants: list[Variant],
    seeds: int = 3,
    steps: int = 5,
    corpus=None,
    log=print,
) -> dict:
    """Runs the check; returns {axis, sizes, steps, seeds, lr, series: {label: {curve: [size][seed][step]}}}."""
    from maxscale.train import data as data_lib

    if axis not in AXES:
        raise ConfigError(f"axis={axis!r}: choose one of {', '.join(AXES)}")
    if len(sizes) < 2:
        raise ConfigError("a coordinate check needs at least two sizes")
    corpus = corpus if corpus is not None else data_lib.load_corpus(base)
    tokens = fixed_batch(corpus, base.train.batch_size, base.data.seq_len)
    series = {}
    for v in variants:
        curves: dict[str, list] = {}
        for size in sizes:
            cfg = size_config(base, axis, size, v)
            traj = trajectory(cfg, tokens, seeds, steps)
            keys = traj[0][0].keys()
            for k in keys:
                curves.setdefault(k, []).append([[rec[k] for rec in seed] for seed in traj])
            log(
                f"coord_check: {v.label} {axis}={size}: loss {traj[0][0]['loss']:.3f} -> {traj[0][-1]['loss']:.3f}, "
                f"resid/last {np.mean([s[-1]['resid/last'] for s in traj]):.3g}"
            )
        # per-layer curves exist only where every size has the layer
        series[v.label] = {k: c for k, c in curves.items() if len(c) == len(sizes)}
    return {
        "axis": axis,
        "sizes": list(sizes),
        "steps": steps,
        "seeds": seeds,
        "lr": base.optimizer.lr,
        "series": series,
    }


def slope(sizes, values) -> float:
    """Least-squares slope of log(values) against log(sizes); nan if any value is not positive and finite."""
    y = np.asarray(values, np.float64)
    if not np.all(np.isfinite(y)) or np.any(y <= 0):
        return float("nan")
    return float(np.polyfit(np.log(sizes), np.log(y), 1)[0])


def verdict(result: dict, threshold: float = DEFAULT_THRESHOLD, judge_from: int = DEFAULT_JUDGE_FROM) -> dict:
    """Slopes of every curve at every step, and pass/fail per parameterization on the judged curves and steps."""
    axis, sizes = result["axis"], result["sizes"]
    judged_keys, mode = JUDGED[axis]
    judge_from = min(judge_from, result["steps"])
    out = {
        "axis": axis,
        "sizes": sizes,
        "threshold": threshold,
        "steps_judged": list(range(judge_from, result["steps"] + 1)),
        "judged": "all curves" if judged_keys is None else list(judged_keys),
        "criterion": mode,
        "series": {},
    }
    for label, curves in result["series"].items():
        slopes, worst = {}, {}
        for key, data in curves.items():
            if key == "loss":
                continue
            arr = np.asarray(data, np.float64)  # [size, seed, step]
            per_step = [slope(sizes, arr[:, :, t].mean(1)) for t in range(arr.shape[2])]
            slopes[key] = [round(s, 4) for s in per_step]
            judged = per_step[judge_from:]
            growth_only = mode == "growth" or key.split("/")[0] in GROWTH_ONLY
            score = (lambda s: s) if growth_only else (lambda s: abs(s))
            worst[key] = float("inf") if any(math.isnan(s) for s in judged) else max(score(s) for s in judged)
        keys = [k for k in worst if judged_keys is None or k in judged_keys]
        if axis == "depth":  # per-layer curves do not line up across depths
            keys = [k for k in keys if not k.split("/")[-1].isdigit()]
        worst_key = max(keys, key=lambda k: worst[k])
        out["series"][label] = {
            "pass": worst[worst_key] <= threshold,
            "max_slope": round(worst[worst_key], 4),
            "worst_curve": worst_key,
            "max_slope_by_curve": {k: round(worst[k], 4) for k in sorted(worst)},
            "slopes_by_step": slopes,
        }
    return out


def write(
    result: dict, out_dir: str, threshold: float = DEFAULT_THRESHOLD, judge_from: int = DEFAULT_JUDGE_FROM
) -> dict:
    """Writes coord_check.json (data + verdict) and coord_check.png into `out_dir`; returns the verdict."""
    os.makedirs(out_dir, exist_ok=True)
    v = verdict(result, threshold, judge_from)
    with open(os.path.join(out_dir, "coord_check.json"), "w") as fh:
        json.dump({"verdict": v, "data": result}, fh, indent=1)
    coord_plot.plot(result, os.path.join(out_dir, "coord_check.png"), v)
    return v


def summary(v: dict) -> str:
    what = "|slope|" if v["criterion"] == "abs" else "slope (growth)"
    lines = [
        f"coordinate check over {v['axis']} {v['sizes']}: pass if max {what} <= {v['threshold']} "
        f"({v['judged']}, steps {v['steps_judged'][0]}..{v['steps_judged'][-1]})"
    ]
    for label, s in v["series"].items():
        lines.append(
            f"  {label:<22} {'PASS' if s['pass'] else 'FAIL'}  max {what} {s['max_slope']:.3f} ({s['worst_curve']})"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Command line (tools/coord_check.py)


def _given(args, field: str) -> bool:
    """Whether `--config.<field>=...` is on the command line."""
    return any(a.startswith(f"--config.{field}=") for a in args.config_args)


def _check_defaults(args) -> ml_collections.ConfigDict:
    """The config with the check's defaults where the command line does not set them: the constant LR (--lr, else
    --config.optimizer.lr, else DEFAULT_LR) and a corpus read only up to DEFAULT_MAX_BYTES (one batch is used)."""
    cfg = args.config
    if args.lr is not None or not _given(args, "optimizer.lr"):
        config_lib.override(cfg, "optimizer.lr", args.lr if args.lr is not None else repr(DEFAULT_LR))
    if not _given(args, "data.max_bytes") and not 0 < cfg.data.max_bytes <= DEFAULT_MAX_BYTES:
        config_lib.override(cfg, "data.max_bytes", repr(DEFAULT_MAX_BYTES))
    return cfg


def _parse(argv: list[str]):
    """(resolved base config, axis, sizes, variants, seeds, steps, threshold, judge_from, out); ConfigError if bad."""
    p = cli.Parser("coord_check", __doc__, config=True)
    p.add_argument("--axis", default="width", help="|".join(AXES))
    p.add_argument("--sizes", default=None, help="comma-separated sizes along the axis (default: per axis)")
    p.add_argument("--parameterizations", default="sp,mup,completep", help="e.g. sp,mup,completep:0")
    for name, default in (("seeds", "3"), ("steps", "5"), ("threshold", DEFAULT_THRESHOLD)):
        p.add_argument(f"--{name}", default=str(default))
    p.add_argument("--judge_from", default=str(DEFAULT_JUDGE_FROM), help="first judged step")
    p.add_argument("--lr", default=None, help=f"constant LR (default {DEFAULT_LR} or --config.optimizer.lr)")
    p.add_argument("--out", default=None, help="output directory (default: runs/coord_check/<axis>)")
    args = p.parse(argv)
    base = config_lib.resolve(_check_defaults(args))
    if args.axis not in AXES:
        raise ConfigError(f"--axis={args.axis}: choose one of {', '.join(AXES)}")
    try:
        sizes = [int(x) for x in (args.sizes or DEFAULT_SIZES[args.axis]).split(",")]
        seeds, steps = int(args.seeds), int(args.steps)
        threshold, judge_from = float(args.threshold), int(args.judge_from)
    except ValueError:
        raise ConfigError(
            "--sizes takes integers (e.g. --sizes=64,128,256); --seeds and --steps integers; "
            "--threshold a number, --judge_from an integer"
        ) from None
    if len(sizes) < 2 or min(sizes) < 1 or seeds < 1 or steps < 1:
        raise ConfigError("need at least two positive --sizes, --seeds >= 1 and --steps >= 1")
    variants = [Variant.parse(t) for t in args.parameterizations.split(",")]
    args.out = args.out or os.path.join("runs", "coord_check", args.axis)
    for size in sizes:  # every size must scale cleanly before any compute starts
        size_config(base, args.axis, size, variants[0])
    return base, args.axis, sizes, variants, seeds, steps, threshold, judge_from, args.out


@cli.command("coord_check")
def main(argv: list[str]) -> int:
    """maxscale coord-check --config=configs/tiny.py [--config.a.b=v] --axis=width --sizes=64,128,256
    --parameterizations=sp,mup,completep [--seeds=3] [--steps=5] [--threshold=0.3] [--judge_from=2] [--lr=0.005]
    [--out=runs/coord_check/<axis>]; exit 0 when every parameterization passes, 1 when any fails, 2 on bad input"""
    base, axis, sizes, variants, seeds, steps, threshold, judge_from, out = _parse(argv)
    result = run(base, axis, sizes, variants, seeds=seeds, steps=steps)
    v = write(result, out, threshold, judge_from)
    print(summary(v))
    print(f"wrote {os.path.join(out, 'coord_check.png')} and {os.path.join(out, 'coord_check.json')}")
    failed = [label for label, s in v["series"].items() if not s["pass"]]
    if failed:
        print(f"coord_check: FAIL for {', '.join(failed)} (exit 1)")
    return 1 if failed else 0
