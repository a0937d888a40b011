"""Meshes and logical-axis sharding rules.

The one table `RULES` maps the logical axes that parameters and activations carry onto the mesh axes
(`data`, `fsdp`, `tensor`, `expert`). Parameters shard by their metadata; the batch shards over (data, fsdp).
See docs/sharding.md.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated)
RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "layers": None,
    "experts": "expert",
}


def mesh_shape(cfg: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """Resolves -1 in `mesh.*` and checks the product against the device count (ConfigError otherwise)."""
    from maxscale.config import ConfigError
    sizes = {a: cfg.mesh[a] for a in MESH_AXES}
    fixed = math.prod(v for v in sizes.values() if v != -1)
    fill = [a for a, v in sizes.items() if v == -1]
    if fill:
        if num_devices % fixed:
            raise ConfigError(f"mesh: the fixed axes multiply to {fixed}, which does not divide the {num_devices} "
                              f"devices; choose sizes whose product divides {num_devices}")
        sizes[fill[0]] = num_devices // fixed
    product = math.prod(sizes.values())
    if product != num_devices:
        shape = " x ".join(f"{a}={sizes[a]}" for a in MESH_AXES)
        raise ConfigError(f"mesh: {shape} = {product} devices but {num_devices} are present; "
                          f"make the product {num_devices} or set one axis to -1")
    return sizes


def make_mesh(cfg: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    sizes = mesh_shape(cfg, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:
        from jax.experimental import mesh_utils
        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # simulated or odd topologies: plain order is fine
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(axes: Sequence[str | None], mesh: Mesh, shape: Sequence[int] | None = None) -> P:
    """PartitionSpec for logical `axes`. A mesh axis of size 1 is dropped; each mesh axis is used at most once."""
    used: set[str] = set()
    out = []
    for i, name in enumerate(axes):
        rule = RULES.get(name) if name is not None else None
        mesh_axes = (rule,) if isinstance(rule, str) else tuple(rule or ())
        mesh_axes = tuple(a for a in mesh_axes if mesh.shape[a] > 1 and a not in used)
        if shape is not None and mesh_axes and shape[i] % math.prod(mesh.shape[a] for a in mesh_axes):
            mesh_axes = ()  # checked by check_divisible with a clear message before we get here
        used.update(mesh_axes)
        out.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return P(*out)


def check_divisible(specs: dict, shapes: dict, mesh: Mesh) -> None:
    """Every sharded dimension must divide evenly over its mesh axes (ConfigError naming the size otherwise)."""
    from maxscale.config import ConfigError
    field = {"vocab": "model.vocab_size", "embed": "model.width", "heads": "model.num_heads",
             "kv_heads": "model.num_kv_heads", "mlp": "model.ffn_size", "experts": "model.num_experts"}
    for path, spec in specs.items():
        for name, size in zip(spec.axes, shapes[path]):
            rule = RULES.get(name)
            mesh_axes = [a for a in ((rule,) if isinstance(rule, str) else (rule or ())) if mesh.shape[a] > 1]
            n = math.prod(mesh.shape[a] for a in mesh_axes)
            if n > 1 and size % n:
                axes = "x".join(f"mesh.{a}={mesh.shape[a]}" for a in mesh_axes)
                raise ConfigError(f"{field.get(name, name)}={size} does not divide over {axes} ({path}); "
                                  f"choose a size divisible by {n} or a smaller mesh axis")


def param_shardings(spec_tree, mesh: Mesh, abstract_params) -> dict:
    return jax.tree.map(lambda spec, a: NamedSharding(mesh, logical_to_spec(spec.axes, mesh, a.shape)),
                        spec_tree, abstract_params, is_leaf=lambda x: hasattr(x, "axes"))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(("batch", None), mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


# -- activation constraints: active only while a trainer traces under `activation_mesh` ---------------------------
_ACTIVE_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("maxscale_mesh", default=None)


@contextlib.contextmanager
def activation_mesh(mesh: Mesh):
    token = _ACTIVE_MESH.set(mesh)
    try:
        yield
    finally:
        _ACTIVE_MESH.reset(token)


def constrain(x, axes: Sequence[str | None]):
    mesh = _ACTIVE_MESH.get()
    if mesh is None or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, mesh, x.shape)))
