"""AdamW with per-parameter LR / WD / eps factors from the parameterization, and the LR schedules.

Parameters with the same (lr, wd, eps) factors form one group; `optax.multi_transform` gives each group its own
Adam (eps differs per group) and its own LR = lr * factor * schedule(t). The schedule multiplies each group's factor,
never replaces it (docs/parameterizations.md, pitfall 6).

Weight decay, two explicit modes:
  coupled      p <- p - lr * f_lr * sched(t) * (adam + wd * f_wd * p)     (torch AdamW; muP scales f_wd by m_N)
  independent  p <- p - lr * f_lr * sched(t) * adam - wd * f_wd * sched(t) * p   (decay not tied to the peak LR)
"""

from __future__ import annotations

import types
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from maxscale.errors import ConfigError
from maxscale.parameterization import Parameterization


def _constant(s, total: int, warm):
    return lambda t: warm(jnp.asarray(t, jnp.float32)) * jnp.ones([], jnp.float32)


def _cosine(s, total: int, warm):
    warmup, floor = s.warmup_steps, s.final_lr_fraction

    def cosine(t):
        t = jnp.asarray(t, jnp.float32)
        progress = jnp.clip((t - warmup) / max(total - warmup, 1), 0.0, 1.0)
        return warm(t) * (floor + (1 - floor) * 0.5 * (1 + jnp.cos(jnp.pi * progress)))

    return cosine


def _wsd(s, total: int, warm):
    floor, decay_steps = s.final_lr_fraction, s.decay_fraction * total
    decay_start = total - decay_steps

    def wsd(t):
        t = jnp.asarray(t, jnp.float32)
        progress = jnp.clip((t - decay_start) / max(decay_steps, 1.0), 0.0, 1.0)
        return warm(t) * (1.0 - (1.0 - floor) * progress)

    return wsd


def _power(s, total: int, warm):
    t0, chi, delta = s.power_t0, s.power_chi, s.power_delta

    def power(t):
        t = jnp.asarray(t, jnp.float32)
        tail = jnp.clip(1.0 - t / total, 0.0, 1.0) ** delta if delta else 1.0
        return warm(t) * (1.0 + t / t0) ** -chi * tail

    return power


# schedule.name -> (cfg.schedule, train.steps, warmup multiplier) -> sched(t); the names are declared in the config
# schema (maxscale/defaults.py), which tests/test_schema.py checks against these keys
SCHEDULES = {"constant": _constant, "cosine": _cosine, "wsd": _wsd, "power": _power}


def schedule(cfg: ml_collections.ConfigDict):
    """Returns sched(step) -> multiplier of the peak LR, as a jnp function of an integer step."""
    s, total = cfg.schedule, cfg.train.steps
    warmup = s.warmup_steps

    def warm(t):
        return jnp.minimum(1.0, (t + 1.0) / warmup) if warmup > 0 else 1.0

    if s.name not in SCHEDULES:  # config.resolve refuses it first; a hand-made config gets the same line
        raise ConfigError(f"schedule.name={s.name!r} is not supported; choose one of {', '.join(SCHEDULES)}")
    return SCHEDULES[s.name](s, total, warm)


def _group_label(f: dict) -> str:
    return f"lr{f['lr']:.6g}_wd{f['wd']:.6g}_eps{f['eps']:.6g}"


def factor_tree(cfg, spec_tree) -> dict:
    par = Parameterization(cfg)
    return jax.tree.map(par.factors, spec_tree, is_leaf=lambda x: hasattr(x, "axes"))


def make_optimizer(
    cfg: ml_collections.ConfigDict, spec_tree, hparams: dict | None = None
) -> optax.GradientTransformation:
    """The optax chain for params shaped like `spec_tree` (a tree of ParamSpec). `hparams`: {field of
    cfg.optimizer: scalar array} replacing those values, traced (train/vectorized.py: one compiled step for many
    values); with weight_decay among them the decay is always in the chain (a zero adds exactly 0 x p), so every
    member's state has one structure."""
    o, hparams = cfg.optimizer, hparams or {}
    if hparams:
        o = types.SimpleNamespace(**{**o.to_dict(), **hparams})
    sched = schedule(cfg)
    factors = factor_tree(cfg, spec_tree)
    is_factor = lambda x: isinstance(x, dict) and set(x) == {"lr", "wd", "eps"}
    labels = jax.tree.map(_group_label, factors, is_leaf=is_factor)
    groups = {}
    for f in jax.tree.leaves(factors, is_leaf=is_factor):
        groups[_group_label(f)] = f

    def group(f):
        lr = lambda t: -o.lr * f["lr"] * sched(t)
        parts = [optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=o.eps * f["eps"])]
        wd = o.weight_decay * f["wd"]
        decay = "weight_decay" in hparams or wd != 0
        if o.weight_decay_mode == "coupled":
            if decay:
                parts.append(optax.add_decayed_weights(wd))
            parts.append(optax.scale_by_schedule(lr))
        else:
            parts.append(optax.scale_by_schedule(lr))
            if decay:
                parts.append(_independent_decay(lambda t: wd * sched(t)))
        return optax.chain(*parts)

    transforms = {label: group(f) for label, f in groups.items()}
    chain = [optax.multi_transform(transforms, labels)]
    if o.grad_clip > 0 and o.grad_clip_mode == "global":
        chain.insert(0, optax.clip_by_global_norm(o.grad_clip))
    elif o.grad_clip > 0:
        chain.insert(0, clip_relative_to_running_norm(o.grad_clip_ratio))
    return optax.chain(*chain)


class RelativeClipState(NamedTuple):
    mean_norm: jax.Array  # exponential moving average of the (clipped) global norm, not bias-corrected
    count: jax.Array


def clip_relative_to_running_norm(ratio: float, decay: float = 0.95, warmup: int = 10) -> optax.GradientTransformation:
    """Clips the global gradient norm at `ratio` x its running mean (an EMA with bias correction, fed with the
    clipped norms so a spike does not raise the bar for the next one); no clipping for the first `warmup` steps.

    Why: a fixed threshold compares a norm whose size depends on the width, depth and parameterization with a
    constant, so it clips a different share of steps in every model of a muP sweep and moves the optimal LR. A ratio
    to the run's own typical norm is dimensionless: multiplying every gradient by c leaves the clipped steps, and
    (with Adam, up to eps) the updates, unchanged. Spikes, what clipping is for, are still cut."""

    def init(params):
        del params
        return RelativeClipState(jnp.zeros([], jnp.float32), jnp.zeros([], jnp.int32))

    def update(updates, state, params=None):
        del params
        norm = optax.global_norm(updates).astype(jnp.float32)
        count = state.count + 1
        mean = state.mean_norm / jnp.maximum(1.0 - decay ** state.count.astype(jnp.float32), 1e-12)
        bar = ratio * mean
        active = (state.count >= warmup) & (norm > bar)
        scale = jnp.where(active, bar / jnp.maximum(norm, 1e-30), 1.0)
        kept = jnp.where(active, bar, norm)
        kept = jnp.where(jnp.isfinite(kept), kept, mean)  # a non-finite step (skipped by the trainer) leaves no trace
        updates = jax.tree.map(lambda g: (g * scale).astype(g.dtype), updates)
        return updates, RelativeClipState(decay * state.mean_norm + (1 - decay) * kept, count)

    return optax.GradientTransformation(init, update)


def _independent_decay(rate) -> optax.GradientTransformation:
    """updates <- updates - rate(t) * params (applied after the LR scaling, so not multiplied by the LR)."""

    def init(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update(updates, state, params):
        r = rate(state.count)
        updates = jax.tree.map(lambda u, p: u - r * p.astype(u.dtype), updates, params)
        return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)
