"""Parameterizations as data: SP, muP, depth-muP, CompleteP.

One table (`RULES`) and one lookup. The model asks this module for every init std and forward multiplier; the
optimizer asks it for every per-parameter LR, weight-decay and Adam-eps factor. Nothing about muP lives elsewhere.
Sources and the full rule tables: docs/parameterizations.md.

Each parameter carries `ParamSpec` metadata: its `role` (embedding, hidden, readout, norm, bias), its logical `axes`
(also used for sharding) and its `fan_in` axes (those contracted in the forward pass). Width ratios are computed per
axis against the base shapes, so "more heads at fixed head dim" and "larger head dim at fixed heads" both come out
right without special cases.

    python -m maxscale.parameterization --config=configs/tiny.py [--config.x.y=v ...] [--json]
prints the table for a config (maxscale/tools/params_table.py).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import ml_collections

from maxscale.errors import ConfigError

ROLES = ("embedding", "hidden", "readout", "norm", "bias", "router", "expert_in", "expert_out")
MATRIX_ROLES = ("hidden", "router", "expert_in", "expert_out")  # inside the blocks, scaled like hidden matrices
EPS_DEPTH_SCOPES = ("blocks", "all")  # where eps gets m_L^-alpha: CompleteP Table 1 | nanoGPT-mup completep branch
WIDTH_GROWS = ("head_dim", "heads")  # which attention dimension scale_shapes() grows with width


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """What the parameterization needs to know about one parameter (stored as nnx.Param metadata)."""

    role: str
    axes: tuple[str, ...]  # logical axis names, one per dim, e.g. ('layers', 'embed', 'heads', 'head_dim')
    fan_in: tuple[str, ...]  # axes contracted in the forward pass; () for vectors
    # what a matrix does in its block, where rules or tools treat matrices of one role apart (the query's zero
    # init, dyn's groups): query, key, value, attn_out, mlp_in, mlp_out; "" for the rest
    kind: str = ""


@dataclasses.dataclass(frozen=True)
class Rule:
    """One row of the table: how a parameterization scales with width and depth."""

    width: bool  # muP-style width scaling of init, LR, eps, readout multiplier
    depth_alpha: float  # residual branches x m_L^-alpha; LR of block params x m_L^(alpha-1) when alpha > 0
    attn_exponent: float  # attention logits x d_head^-exponent (relative to the base head dim, see attn_scale)
    source: str


RULES: dict[str, Rule] = {
    "sp": Rule(width=False, depth_alpha=0.0, attn_exponent=0.5, source="standard parameterization"),
    "mup": Rule(width=True, depth_alpha=0.0, attn_exponent=1.0, source="Yang et al. 2022, TP-V Table 8"),
    "depth_mup": Rule(
        width=True, depth_alpha=0.5, attn_exponent=1.0, source="Bordelon et al. 2023; Yang et al. 2023 (TP-VI)"
    ),
    "completep": Rule(width=True, depth_alpha=1.0, attn_exponent=1.0, source="Dey et al. 2025 (CompleteP) Table 1"),
}


def follow_width(cfg: ml_collections.ConfigDict, field: str, own: int, scales: bool = True) -> int:
    """The base size for `field` when it is left at 0: the model's own size `own`, times base_width / width when
    the dimension grows with width (`scales`), so a run's base is one model however few base sizes were set.
    ConfigError (one line) if that is not a whole number."""
    p, m = cfg.parameterization, cfg.model
    if not scales or p.base_width == m.width:
        return own
    size = own * p.base_width / m.width
    if size != int(size) or size < 1:
        raise ConfigError(
            f"parameterization.base_width={p.base_width} with model.width={m.width}: the base's {field[5:]} would be "
            f"{own} x {p.base_width}/{m.width} = {size:g}, not a whole number; set parameterization.{field} explicitly"
        )
    return int(size)


def resolve(cfg: ml_collections.ConfigDict) -> None:
    """Fills base shapes of 0 (in place; every field was checked against its declaration in config.resolve,
    maxscale/defaults.py). The base is one model: left at 0, the base depth is
    the model's own, and every width dimension follows base_width / width as the model's own sizes do
    (`width_grows` says whether heads or the head dim grow), so `--config.parameterization.base_width=64` alone
    describes the width-64 model, never a half-scaled one."""
    p, m = cfg.parameterization, cfg.model
    if p.base_width == 0:
        p.base_width = m.width
    if p.base_depth == 0:
        p.base_depth = m.depth
    for base, own, scales in (
        ("base_num_heads", m.num_heads, p.width_grows == "heads"),
        ("base_head_dim", m.head_dim, p.width_grows == "head_dim"),
        ("base_ffn_size", m.ffn_size, True),
    ):
        if p[base] == 0:
            p[base] = follow_width(cfg, base, own, scales)
    if p.embed_init_std == 0.0:
        p.embed_init_std = p.init_std
    for field, choices in (("eps_depth_scope", EPS_DEPTH_SCOPES),):
        if p[field] not in choices:
            raise ConfigError(
                f"parameterization.{field}={p[field]!r} is not supported; choose one of {', '.join(choices)}"
            )


def _moe_sizes(moe, expert_ffn_size: int, num_experts: int | None = None) -> dict[str, int]:
    """Sizes of the MoE axes; the shared experts' hidden size follows the expert size (same ratio as the model's)."""
    shared = moe.num_shared * moe.shared_ffn_size
    if expert_ffn_size != moe.expert_ffn_size:  # a base size: the same ratio to the expert size as the model's
        shared = shared * expert_ffn_size / max(moe.expert_ffn_size, 1)
    experts = moe.num_experts if num_experts is None else num_experts
    return {"experts": experts, "expert_mlp": expert_ffn_size, "shared_mlp": shared}


class Parameterization:
    """The lookup. Built from a resolved config; pure Python floats, no arrays."""

    def __init__(self, cfg: ml_collections.ConfigDict):
        self.cfg = cfg
        p, m = cfg.parameterization, cfg.model
        self.rule = RULES[p.name]
        self.alpha = self.rule.depth_alpha if p.depth_alpha == -1.0 else p.depth_alpha
        self.attn_exponent = self.rule.attn_exponent if p.attn_exponent == -1.0 else p.attn_exponent
        kv_ratio = m.num_kv_heads / m.num_heads
        self.sizes = {
            "vocab": m.vocab_size,
            "embed": m.width,
            "mlp": m.ffn_size,
            "heads": m.num_heads,
            "kv_heads": m.num_kv_heads,
            "head_dim": m.head_dim,
            "layers": m.depth,
            **_moe_sizes(m.moe, m.moe.expert_ffn_size),
        }
        self.base_sizes = {
            "vocab": m.vocab_size,
            "embed": p.base_width,
            "mlp": p.base_ffn_size,
            "heads": p.base_num_heads,
            "kv_heads": p.base_num_heads * kv_ratio,
            "head_dim": p.base_head_dim,
            "layers": p.base_depth,
            **_moe_sizes(m.moe, p.base_expert_ffn_size, p.base_num_experts),
        }
        self.m_width = m.width / p.base_width  # m_N
        self.m_depth = m.depth / p.base_depth  # m_L

    # -- forward multipliers ------------------------------------------------------------------------------------
    @property
    def input_mult(self) -> float:
        return self.cfg.parameterization.input_mult

    @property
    def output_mult(self) -> float:
        """Readout logits = output_mult * x W; muP divides by m_N (TP-V Table 8, MuReadout)."""
        mult = self.cfg.parameterization.output_mult
        return mult / self.m_width if self.rule.width else mult

    @property
    def residual_mult(self) -> float:
        """Each residual branch is multiplied by m_L^-alpha (depth-muP alpha = 1/2, CompleteP alpha = 1)."""
        return self.m_depth**-self.alpha

    @property
    def attn_scale(self) -> float:
        """Logit scale attn_mult * d^-1/2 * (d/d0)^-(exponent - 1/2): equals SP's 1/sqrt(d) at the base head dim."""
        d, d0 = self.cfg.model.head_dim, self.cfg.parameterization.base_head_dim
        return self.cfg.parameterization.attn_mult * d**-0.5 * (d / d0) ** -(self.attn_exponent - 0.5)

    def multipliers(self) -> dict[str, float]:
        return {
            "input": self.input_mult,
            "output": self.output_mult,
            "residual": self.residual_mult,
            "attn_scale": self.attn_scale,
        }

    # -- per-parameter rules --------------------------------------------------------------------------------------
    def fan_in_ratio(self, spec: ParamSpec) -> float:
        """Product over the contracted axes of size / base size (1 for vectors)."""
        return math.prod(self.sizes[a] / self.base_sizes[a] for a in spec.fan_in)

    def _in_blocks(self, spec: ParamSpec) -> bool:
        return "layers" in spec.axes

    def _depth_lr(self, spec: ParamSpec) -> float:
        # Alpha = 0 is plain muP: no depth factors at all (docs/parameterizations.md, section 2).
        if self.alpha == 0.0 or not self._in_blocks(spec):
            return 1.0
        return self.m_depth ** (self.alpha - 1.0)

    def init_std(self, spec: ParamSpec) -> float:
        std = self._init_std(spec)
        if spec.role in ("expert_in", "expert_out") and self.cfg.parameterization.expert_init_counts_experts:
            # the control: MaxText's variance_scaling(fan_in, in_axis=experts) counts E as fan-in, so the
            # experts' init shrinks as (E/E0)^-1/2 (docs/moe.md); never the default
            std /= math.sqrt(self._ratio("experts"))
        return std

    def _init_std(self, spec: ParamSpec) -> float:
        p = self.cfg.parameterization
        if spec.role in ("norm", "bias"):
            return 0.0  # norms start at one (the model adds 1), biases at zero
        if spec.role == "embedding":
            return p.embed_init_std
        if spec.role == "readout":
            return 0.0 if p.zero_init_readout else p.init_std
        if spec.kind == "query" and p.zero_init_query:
            return 0.0
        if not self.rule.width:
            return p.init_std
        if spec.role == "router":  # sigma (D/D0)^-gamma; the paper's gamma = 1 (docs/parameterizations.md, MoE)
            return p.init_std * self._ratio("embed") ** -p.router_init_gamma
        if spec.role == "expert_out" and p.expert_down_init == "mean_field":
            # sigma (D/D0)^1/2 (M/M0)^-1: an expert's output is Theta(alpha^-1/2) at init, its update Theta(1)
            return p.init_std * self._ratio("embed") ** 0.5 / self._ratio("expert_mlp")
        return p.init_std / math.sqrt(self.fan_in_ratio(spec))

    def _ratio(self, axis: str) -> float:
        return self.sizes[axis] / self.base_sizes[axis]

    def lr_factor(self, spec: ParamSpec) -> float:
        """Matrices in the blocks (hidden, router, experts): x (fan-in ratio)^-1 under muP-family rules, i.e.
        D0/D for fan-in over the width and M0/M for an expert's down projection (the paper's Table 1)."""
        if spec.role in MATRIX_ROLES and self.rule.width:
            return self._depth_lr(spec) / self.fan_in_ratio(spec)
        return self._depth_lr(spec)

    def wd_factor(self, spec: ParamSpec) -> float:
        """Norm gains and biases are never decayed. With coupled (lr * wd) decay, muP scales hidden WD by the
        fan-in ratio so that lr * wd stays width-independent; independent decay is left alone (pitfall 3)."""
        if spec.role in ("norm", "bias"):
            return 0.0
        if spec.role in MATRIX_ROLES and self.rule.width and self.cfg.optimizer.weight_decay_mode == "coupled":
            return self.fan_in_ratio(spec)
        return 1.0

    def eps_factor(self, spec: ParamSpec) -> float:
        """Adam eps tracks the gradient scale: x m_N^-1 everywhere, and x m_L^-alpha inside the blocks (CompleteP
        Table 1) or on every parameter (`eps_depth_scope="all"`, as the nanoGPT-mup completep branch does)."""
        p = self.cfg.parameterization
        if not p.scale_eps:
            return 1.0
        in_scope = self._in_blocks(spec) or p.eps_depth_scope == "all"
        depth = self.m_depth**-self.alpha if in_scope else 1.0
        if not self.rule.width:
            return depth
        if spec.role == "expert_in":  # the paper's Table 2: eps (M/M0)^-1 (L/L0)^-1
            return depth / self._ratio("expert_mlp")
        if spec.role == "expert_out":  # eps (D/D0) (M/M0)^-2 (L/L0)^-1
            return depth * self.m_width / self._ratio("expert_mlp") ** 2
        return depth / self.m_width

    def factors(self, spec: ParamSpec) -> dict[str, float]:
        return {"lr": self.lr_factor(spec), "wd": self.wd_factor(spec), "eps": self.eps_factor(spec)}


def scale_shapes(
    cfg: ml_collections.ConfigDict, width: int | None = None, depth: int | None = None, grows: str | None = None
) -> dict[str, Any]:
    """Overrides that scale a resolved config's model to `width` and/or `depth`, every width dimension together.

    The model of `cfg` is the reference: d_ffn (and heads or head_dim, per `grows`, default
    `parameterization.width_grows`) are multiplied by width / model.width, and the base shapes are pinned to `cfg`'s
    own, so the multipliers m_N, m_L are ratios to them. Returns {"model.width": ..., "parameterization.base_width":
    ..., ...}; apply with `config.override` or as a sweep point. Raises ConfigError if a size would not be whole.
    """
    m, p = cfg.model, cfg.parameterization
    grows = grows or p.width_grows
    if grows not in WIDTH_GROWS:
        raise ConfigError(f"width_grows={grows!r} is not supported; choose one of {', '.join(WIDTH_GROWS)}")
    out: dict[str, Any] = {
        f"parameterization.base_{k}": p[f"base_{k}"] for k in ("width", "depth", "num_heads", "head_dim", "ffn_size")
    }
    if width is not None:
        ratio = width / m.width
        sizes = {"model.width": m.width, "model.ffn_size": m.ffn_size}
        sizes.update(
            {"model.num_heads": m.num_heads, "model.num_kv_heads": m.num_kv_heads}
            if grows == "heads"
            else {"model.head_dim": m.head_dim}
        )
        for field, size in sizes.items():
            scaled = size * ratio
            if scaled != int(scaled) or scaled < 1:
                raise ConfigError(
                    f"width={width}: {field}={size} x {ratio:g} is not a whole number; "
                    f"choose a width that is a power-of-two multiple of {m.width}"
                )
            out[field] = int(scaled)
        if grows == "heads":
            out["model.head_dim"] = m.head_dim
        else:
            out["model.num_heads"], out["model.num_kv_heads"] = m.num_heads, m.num_kv_heads
    if depth is not None:
        out["model.depth"] = int(depth)
    return out


def spec_of(variable: Any) -> ParamSpec:
    """The ParamSpec stored as metadata on an nnx.Param."""
    meta = variable.get_metadata()
    return ParamSpec(role=meta["role"], axes=tuple(meta["axes"]), fan_in=tuple(meta["fan_in"]), kind=meta["kind"])
