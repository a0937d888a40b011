"""What the forward pass needs besides params and tokens, built once in setup and passed down: no globals.

`Context` holds the mesh (activation sharding constraints, the Pallas attention kernel's shard_map, the
expert-parallel MoE paths), the compute dtype and the quantizer of the matmul entry point, and the attention kernel
resolved for the backend. The model never looks these up in module state or context variables: the same params and
tokens under the same Context always trace the same program.

`Recorder` is how the one forward reports what it computes on the side (`capture`): a block creates one per trace
of its body and returns what it recorded as scan outputs, so nothing escapes a `jax.lax.scan` or `jax.checkpoint`.
It sees every matmul through the entry point (`layers.Matmul`), knowing the weight's name, role and equation:
  quant_errors   per tensor kind (weights, activations, kv, probs), the sum of the relative RMS errors
                 ||x - q(x)|| / ||x|| of every tensor the quantizer changed, and their count
  moments        X^T X (float32 [I, I]) of the input of every named matrix of role `hidden` or `readout`
                 (GPTQ's Hessians), with I the weight's contracted features in the activation's order; for the
                 routed experts (roles `expert_in`, `expert_out`) one per expert, [E, I, I], over the rows routed
                 to it: from the grouped rows and their groups (`Matmul.ragged`, `Matmul.grouped`, `grouped_input`)
                 or, where the activation has an experts axis (capacity's [E, C, D] slots), per slice of that axis
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from maxscale.model.layers import input_moments
from maxscale.parallel import sharding

EXPERT_ROLES = ("expert_in", "expert_out")  # routed experts' matrices: moments per expert
CAPTURES = ("stats", "quant_errors", "moments")  # what `capture` may ask of the forward (transformer.Output)
QUANT_KINDS = ("weights", "activations", "kv", "probs")


def relative_rms_error(x, x_hat) -> jax.Array:
    """||x - x_hat|| / ||x|| (Frobenius, float32); 0 when both are zero, inf when only x is."""
    x, x_hat = jnp.asarray(x, jnp.float32), jnp.asarray(x_hat, jnp.float32)
    num, den = jnp.linalg.norm((x - x_hat).ravel()), jnp.linalg.norm(x.ravel())
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), jnp.where(num > 0, jnp.inf, 0.0))


def expert_moments(x, eq: str, axis: int) -> jax.Array:
    """X^T X [E, I, I] per slice of the activation's experts axis `axis` (einsum `eq`, the weight's first axis)."""
    inputs, _, out = eq.replace(" ", "").partition("->")
    x_sub = inputs.split(",")[0]
    letter = x_sub[axis]
    eq_one = f"{x_sub.replace(letter, '')},{inputs.split(',')[1].replace(letter, '')}->{out.replace(letter, '')}"
    return jax.vmap(lambda x_e: input_moments(x_e, eq_one))(jnp.moveaxis(x, axis, 0))


class Recorder:
    """Collects, while one block (or the embedding/readout) is traced, what `capture` asked for; `outputs()` returns
    it as arrays of that trace. Created per trace: never stored beyond the function that made it."""

    def __init__(self, capture: frozenset):
        self.capture = capture
        self.qerr: dict[str, list] = {}
        self.moments: dict[str, jax.Array] = {}

    def quantized(self, kind: str, x, x_hat) -> None:
        if "quant_errors" in self.capture and x_hat is not x:  # a quantizer returns x itself when it skips x
            self.qerr.setdefault(kind, []).append(relative_rms_error(x, x_hat))

    def matmul_input(self, name: str | None, role: str, eq: str, x) -> None:
        if "moments" not in self.capture or name is None:
            return
        if role in ("hidden", "readout"):
            self.moments[name] = input_moments(x, eq)
        elif role in EXPERT_ROLES:
            x_sub, w_sub = eq.replace(" ", "").partition("->")[0].split(",")
            if w_sub[0] in x_sub:  # the weight's experts axis is one of the activation's: one X^T X per expert
                self.moments[name] = expert_moments(x, eq, x_sub.index(w_sub[0]))

    def grouped_input(self, name: str | None, role: str, x_RI, group_R, num_groups: int) -> None:
        """Per-expert X^T X [E, I, I] of grouped rows `x_RI`, row r belonging to expert group_R[r] (>= E: none)."""
        if "moments" in self.capture and name is not None and role in EXPERT_ROLES:
            rows_of = lambda e: jnp.where((group_R == e)[:, None], x_RI, 0)  # noqa: E731  (expert e's rows)
            self.moments[name] = jax.vmap(lambda e: input_moments(rows_of(e), "ri,io->ro"))(jnp.arange(num_groups))

    def outputs(self) -> dict:
        """{"quant_errors": {kind: [sum, count]}, "moments": {name: [I, I]}} for what was asked."""
        out = {}
        if "quant_errors" in self.capture:
            out["quant_errors"] = {
                k: jnp.stack([jnp.sum(jnp.stack(v)), jnp.asarray(len(v), jnp.float32)]) for k, v in self.qerr.items()
            }
        if "moments" in self.capture:
            out["moments"] = dict(self.moments)
        return out


@dataclasses.dataclass(frozen=True)
class Context:
    """The run's mesh (None: no constraints, one device), compute dtype, quantizer (None: full precision) and
    attention kernel (a name of attention.IMPLEMENTATIONS, already resolved for the backend)."""

    mesh: Mesh | None = None
    dtype: Any = jnp.float32
    quantizer: Any = None
    attention_impl: str = "xla"

    def constrain(self, x, axes: Sequence[str | None]):
        """`x` constrained to the logical `axes` on the mesh (as it is without a mesh or on one device)."""
        if self.mesh is None or self.mesh.size == 1:
            return x
        spec = sharding.logical_to_spec(axes, self.mesh, x.shape)
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

    def with_bits(self, qbits: dict | None) -> "Context":
        """This context with the quantizer's widths of some kinds replaced by traced int32 arrays (the members of a
        pack that differ in bit width: quant/qat.py); unchanged for None or {}."""
        if not qbits or self.quantizer is None:
            return self
        return dataclasses.replace(self, quantizer=self.quantizer.with_bits(qbits))
