"""The options of a mixture-of-experts layer (`cfg.model.moe.*` plus `cfg.model.mlp`); the config's values are
validated and derived in `maxscale.config.resolve`."""

from __future__ import annotations

import dataclasses

from maxscale.defaults import CHOICES as _SCHEMA
from maxscale.errors import ConfigError

# Names of the implementations in moe.py's tables, as the config schema declares them (moe.py asserts that they
# agree). config.resolve validates the config's values; these guard a MoEConfig built directly.
CHOICES = {**{k: _SCHEMA[f"model.moe.{k}"] for k in ("score", "combine", "dispatch")}, "mlp": _SCHEMA["model.mlp"]}
CHOICES["grouped_impl"] = _SCHEMA["model.moe.grouped_impl"]  # moe_dispatch.grouped_impl: dropless's matmuls


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
    grouped_impl: str = "auto"  # dropless's grouped matmul: auto|tiled|tiled_loop|ragged_dot (moe_layout.grouped_impl)
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
