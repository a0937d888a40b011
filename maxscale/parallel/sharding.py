"""Meshes and logical-axis sharding rules.

The one table `RULES` maps the logical axes that parameters and activations carry onto the mesh axes
(`data`, `fsdp`, `tensor`, `expert`). Parameters shard by their metadata; the batch shards over (data, fsdp).
Each mesh axis may span several slices (`mesh.dcn_<axis>`): the slice is then its outer factor, as in
`mesh_utils.create_hybrid_device_mesh`. See docs/sharding.md.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from maxscale.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated)
RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp", "expert"),  # expert-parallel ranks hold their own tokens outside the MoE layers
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "layers": None,
    "experts": "expert",
    "expert_mlp": "tensor",
    "shared_mlp": "tensor",
}


def mesh_shape(cfg: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """Resolves -1 in `mesh.*` and checks the product against the device count (ConfigError otherwise)."""
    sizes = {a: cfg.mesh[a] for a in MESH_AXES}
    fixed = math.prod(v for v in sizes.values() if v != -1)
    fill = [a for a, v in sizes.items() if v == -1]
    if fill:
        if num_devices % fixed:
            raise ConfigError(
                f"mesh: the fixed axes multiply to {fixed}, which does not divide the {num_devices} "
                f"devices; choose sizes whose product divides {num_devices}"
            )
        sizes[fill[0]] = num_devices // fixed
    product = math.prod(sizes.values())
    if product != num_devices:
        shape = " x ".join(f"{a}={sizes[a]}" for a in MESH_AXES)
        raise ConfigError(
            f"mesh: {shape} = {product} devices but {num_devices} are present; "
            f"make the product {num_devices} or set one axis to -1"
        )
    for a, n in dcn_shape(cfg).items():
        if sizes[a] % n:
            raise ConfigError(
                f"mesh.dcn_{a}={n} does not divide mesh.{a}={sizes[a]}; the axis is dcn x ici "
                f"devices, so choose mesh.{a} as a multiple of mesh.dcn_{a}"
            )
    return sizes


def dcn_shape(cfg: ml_collections.ConfigDict) -> dict[str, int]:
    """How many slices (granules joined by the slow data-centre network) each mesh axis spans; 1 = none."""
    return {a: cfg.mesh.get(f"dcn_{a}", 1) for a in MESH_AXES}


def device_grid(sizes: dict[str, int], dcn: dict[str, int], devices: Sequence) -> np.ndarray:
    """The devices arranged as the mesh, shape (data, fsdp, tensor, expert).

    Without DCN axes: `mesh_utils.create_device_mesh` (it follows the ICI torus on TPUs). With them, each axis of
    size n = dcn x ici has the slice as its outer factor: index i along the axis is slice i // ici, position
    i % ici inside it, as `mesh_utils.create_hybrid_device_mesh` lays it out, so only the dcn part of an axis
    crosses slices. Slices are the devices' `slice_index` when they span several (multi-slice TPU); devices of
    one slice (GPUs, CPUs: multi-process CPU devices report slice 0) are cut into consecutive groups of prod(ici)
    in list order, which is process order, so a group is a host or a run of hosts.
    """
    from jax.experimental import mesh_utils

    shape = tuple(sizes[a] for a in MESH_AXES)
    outer = tuple(dcn[a] for a in MESH_AXES)
    if math.prod(outer) == 1:
        try:
            return mesh_utils.create_device_mesh(shape, devices=devices)
        except Exception:  # simulated or odd topologies: plain order is fine
            return np.asarray(devices).reshape(shape)
    inner = tuple(s // d for s, d in zip(shape, outer))
    if len({getattr(d, "slice_index", 0) for d in devices}) > 1:
        try:
            return mesh_utils.create_hybrid_device_mesh(inner, outer, devices)
        except ValueError as e:  # e.g. dcn sizes that do not multiply to the number of slices
            raise ConfigError(f"mesh.dcn_*: {e}; make the dcn sizes multiply to the number of slices") from None
    # (dcn..., ici...) -> (dcn0, ici0, dcn1, ici1, ...) -> (dcn0*ici0, ...): the block layout of the hybrid mesh
    grid = np.asarray(devices, dtype=object).reshape(outer + inner)
    order = [i for pair in zip(range(len(shape)), range(len(shape), 2 * len(shape))) for i in pair]
    return grid.transpose(order).reshape(shape)


def make_mesh(cfg: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    grid = device_grid(mesh_shape(cfg, len(devices)), dcn_shape(cfg), devices)
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
    field = {
        "vocab": "model.vocab_size",
        "embed": "model.width",
        "heads": "model.num_heads",
        "kv_heads": "model.num_kv_heads",
        "mlp": "model.ffn_size",
        "experts": "model.moe.num_experts",
        "expert_mlp": "model.moe.expert_ffn_size",
    }
    for path, spec in specs.items():
        for name, size in zip(spec.axes, shapes[path]):
            rule = RULES.get(name)
            mesh_axes = [a for a in ((rule,) if isinstance(rule, str) else (rule or ())) if mesh.shape[a] > 1]
            n = math.prod(mesh.shape[a] for a in mesh_axes)
            if n > 1 and size % n:
                axes = "x".join(f"mesh.{a}={mesh.shape[a]}" for a in mesh_axes)
                raise ConfigError(
                    f"{field.get(name, name)}={size} does not divide over {axes} ({path}); "
                    f"choose a size divisible by {n} or a smaller mesh axis"
                )


def param_shardings(spec_tree, mesh: Mesh, abstract_params) -> dict:
    return jax.tree.map(
        lambda spec, a: NamedSharding(mesh, logical_to_spec(spec.axes, mesh, a.shape)),
        spec_tree,
        abstract_params,
        is_leaf=lambda x: hasattr(x, "axes"),
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows over (data, fsdp). With several processes, each must hold its own 1/process_count of the rows, since
    each loads only that many (data.process_rows); ConfigError for a mesh that replicates rows across processes."""
    out = NamedSharding(mesh, logical_to_spec(("batch", None), mesh))
    processes = {d.process_index for d in mesh.devices.flat}
    if len(processes) > 1:
        dp = data_parallel_size(mesh)
        rows = {idx[0].start or 0 for idx in out.addressable_devices_indices_map((dp, 1)).values()}
        if dp % len(processes) or len(rows) != dp // len(processes):
            raise ConfigError(
                f"mesh: the batch axes mesh.data x mesh.fsdp x mesh.expert = {dp} must split evenly over the "
                f"{len(processes)} processes (this one holds {len(rows)} of {dp} row blocks); make "
                f"data x fsdp x expert a multiple of the process count and keep tensor within a host"
            )
    return out


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_axes() -> tuple[str, ...]:
    """The mesh axes the batch is split over."""
    rule = RULES["batch"]
    return (rule,) if isinstance(rule, str) else tuple(rule)


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways the batch is split: the product of the batch axes (data x fsdp x expert)."""
    return math.prod(mesh.shape[a] for a in batch_axes())
