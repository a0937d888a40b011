"""The options of a mixture-of-experts layer, validated (`cfg.model.moe.*` plus `cfg.model.mlp`)."""

from __future__ import annotations

import dataclasses

from maxscale import parameterization
from maxscale.errors import ConfigError

# Names of the implementations in moe.py's tables (moe.py asserts that they agree).
CHOICES = {
    "score": ("sigmoid", "softmax"),
    "combine": ("mean_k", "renorm"),
    "dispatch": ("dropless", "capacity", "dense"),
    "mlp": ("swiglu", "gelu"),
}


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """The MoE layer's options (mirrors `cfg.model.moe.*` plus `cfg.model.mlp`)."""

    num_experts: int  # E routed experts
    num_active: int  # K experts per token
    expert_ffn_size: int  # M
    num_shared: int = 0  # shared experts, run on every token (fused into one MLP of num_shared * shared_ffn_size)
    shared_ffn_size: int = 0
    score: str = "sigmoid"  # sigmoid | softmax
    combine: str = "mean_k"  # mean_k | renorm
    dispatch: str = "dropless"  # dropless | capacity | dense
    capacity_factor: float = 1.25  # capacity path: slots per expert = ceil(cf * K * tokens / E)
    mlp: str = "swiglu"  # swiglu | gelu

    def __post_init__(self):
        for field, choices in CHOICES.items():
            if getattr(self, field) not in choices:
                raise ConfigError(f"model.moe.{field}={getattr(self, field)!r}: choose one of {', '.join(choices)}")
        if not 1 <= self.num_active <= self.num_experts:
            raise ConfigError(f"model.moe.num_active={self.num_active} must lie in [1, num_experts={self.num_experts}]")
        if self.num_shared and self.shared_ffn_size <= 0:
            raise ConfigError(f"model.moe.shared_ffn_size={self.shared_ffn_size} must be > 0 with num_shared > 0")
        if self.dispatch == "capacity" and self.capacity_factor <= 0:
            raise ConfigError(f"model.moe.capacity_factor={self.capacity_factor} must be > 0 for dispatch=capacity")

    @classmethod
    def from_config(cls, cfg) -> MoEConfig:
        """From `cfg.model.moe.<field>` for every field but `mlp`, which is `cfg.model.mlp`."""
        m = cfg.model.moe
        names = [f.name for f in dataclasses.fields(cls) if f.name != "mlp"]
        return cls(**{n: m[n] for n in names}, mlp=cfg.model.mlp)

    @property
    def shared_size(self) -> int:
        return self.num_shared * self.shared_ffn_size


BALANCE = ("bias", "aux", "none")
BIAS_RULES = ("linear", "sign")
DOWN_INITS = ("mean_field", "fan_in")


def resolve(cfg) -> None:
    """Validates `model.moe.*` and the MoE base shapes in place, filling derived sizes (ConfigError, one line)."""
    m, e, p = cfg.model, cfg.model.moe, cfg.parameterization
    for field in ("num_experts", "num_active", "expert_ffn_size", "num_shared", "shared_ffn_size", "first_dense"):
        if e[field] < 0:
            raise ConfigError(f"model.moe.{field}={e[field]} must be >= 0")
    for field, choices in (("balance", BALANCE), ("bias_rule", BIAS_RULES), *CHOICES.items()):
        if field != "mlp" and e[field] not in choices:
            raise ConfigError(f"model.moe.{field}={e[field]!r} is not supported; choose one of {', '.join(choices)}")
    if p.expert_down_init not in DOWN_INITS:
        raise ConfigError(
            f"parameterization.expert_down_init={p.expert_down_init!r} is not supported; "
            f"choose one of {', '.join(DOWN_INITS)}"
        )
    if e.num_experts == 0:
        return
    if not 1 <= e.num_active <= e.num_experts:
        raise ConfigError(f"model.moe.num_active={e.num_active} must lie in [1, model.moe.num_experts={e.num_experts}]")
    if e.first_dense >= m.depth:
        raise ConfigError(
            f"model.moe.first_dense={e.first_dense} leaves no MoE block in model.depth={m.depth}; "
            f"make it smaller or set model.moe.num_experts=0 for a dense model"
        )
    if e.every < 1 or (m.depth - e.first_dense) % e.every:
        raise ConfigError(
            f"model.moe.every={e.every} must be >= 1 and divide the {m.depth - e.first_dense} blocks after "
            f"model.moe.first_dense={e.first_dense} (groups of every - 1 dense blocks and one MoE block)"
        )
    if e.expert_ffn_size == 0:
        e.expert_ffn_size = max(m.ffn_size // e.num_active, 1)  # the dense model's active FLOPs
    if e.shared_ffn_size == 0:
        e.shared_ffn_size = e.expert_ffn_size
    for field in ("capacity_factor", "bias_rate", "aux_loss_weight", "z_loss_weight"):
        if e[field] < 0 or (field == "capacity_factor" and e[field] == 0):
            raise ConfigError(f"model.moe.{field}={e[field]} must be {'> 0' if field == 'capacity_factor' else '>= 0'}")
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
