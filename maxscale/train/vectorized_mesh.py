"""Where the members of a vectorized pack live (train/vectorized.py): each on the whole mesh, or split over devices.

`mesh.members` = 1 (the default; read with a default, so configs without the field work): the member axis M is not
sharded. Every member uses the mesh as its single run would (its params sharded by the model's rules over data,
fsdp, tensor; the batch over the batch axes), and every device holds its share of all M members.

`mesh.members` = n > 1: the devices form n groups and the mesh gets an outer axis `members` of size n; the usual
axes (`mesh.data`, `fsdp`, `tensor`, `expert`, -1 fills) describe one group. The stacked state's leading axis is
split over `members` (leaf spec ("members", *the leaf's own spec)): each group trains M/n members, each member
sharded inside its group as a single run on that many devices would be. The vmapped step names `members` as its
SPMD axis, so the model's activation constraints keep the member axis split; members never communicate.

Which to choose: many small members on a multi-device host (a GPU or TPU box, width-64 models) train fastest with
members = number of devices, each device its own members and no collectives at all; members that need several
devices each (memory, or a batch worth splitting) keep members = 1 and use the mesh as single runs do; in between,
members = n with groups of devices/n. A pack whose size M is not a multiple of n (a sweep's last pack) uses
gcd(M, n) groups of the same size, leaving the other devices idle: its members keep their per-member mesh.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from maxscale.errors import ConfigError
from maxscale.parallel import sharding
from maxscale.train import step as step_lib

MEMBERS = "members"


def members_of(cfg) -> int:
    """`mesh.members` of a config (1 when the field is absent)."""
    n = cfg.mesh.get("members", 1)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"mesh.members={n!r} must be a positive integer (1 = every member uses the whole mesh)")
    return n


def member_batch(cfg, num_members: int, platform: str) -> int:
    """How many members one step computes side by side (`mesh.member_batch`; 0 = auto). All of them (one vmap: a
    batched program that fills a GPU or TPU) unless the pack runs on the CPU, where auto is 1: XLA:CPU runs the
    vmapped step of 7 width-64 members with 2x the CPU time of 7 single steps (its batched matmuls leave its fast
    matmul library, and its batched layer scan copies more), so there the members go one after another inside the
    one compiled step (jax.lax.map), each computed as its run alone. `mesh.members` > 1 needs the vmap."""
    n = cfg.mesh.get("member_batch", 0)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigError(f"mesh.member_batch={n!r} must be an integer >= 0 (0 = auto: 1 on CPU, else all members)")
    if members_of(cfg) > 1:
        if n not in (0, num_members):
            raise ConfigError(f"mesh.member_batch={n} needs mesh.members=1 (split members are vmapped); set it to 0")
        return num_members
    return min(n or (1 if platform == "cpu" else num_members), num_members)


def over_members(fn, in_axes: tuple, axis, batch: int, num_members: int):
    """`fn` over the leading member axis of the arguments whose in_axes entry is 0 (the others shared): jax.vmap
    when `batch` covers every member, else jax.lax.map over the members `batch` at a time."""
    if batch >= num_members:
        return jax.vmap(fn, in_axes=in_axes, spmd_axis_name=axis)

    def mapped(*args):
        xs = tuple(a if ax == 0 else None for a, ax in zip(args, in_axes))
        one = lambda x: fn(*(xi if ax == 0 else a for xi, a, ax in zip(x, args, in_axes)))  # noqa: E731
        return jax.lax.map(one, xs, batch_size=batch if batch > 1 else None)

    return mapped


def make_mesh(cfg, num_members: int, devices=None, log=print) -> Mesh:
    """The pack's mesh: sharding.make_mesh(cfg) for mesh.members = 1, else (members, data, fsdp, tensor, expert)."""
    devices = list(jax.devices() if devices is None else devices)
    n = members_of(cfg)
    if n == 1:
        return sharding.make_mesh(cfg, devices)
    if len(devices) % n:
        raise ConfigError(
            f"mesh.members={n} does not divide the {len(devices)} devices; choose a divisor of {len(devices)}"
        )
    if any(v > 1 for v in sharding.dcn_shape(cfg).values()):
        raise ConfigError(f"mesh.members={n} with mesh.dcn_* > 1 is not supported; set mesh.dcn_* to 1")
    group = len(devices) // n
    used = math.gcd(num_members, n)
    if used < n:
        log(
            f"vectorized: {num_members} members do not split over mesh.members={n}: {used} group(s) of {group} "
            f"device(s) train them, {len(devices) - used * group} device(s) stay idle"
        )
    sizes = sharding.mesh_shape(cfg, group)
    if used == 1:
        return sharding.make_mesh(cfg, devices[:group])
    shape = (used, *(sizes[a] for a in sharding.MESH_AXES))
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices=devices[: used * group])
    except Exception:  # simulated or odd topologies: plain order (consecutive groups) is fine
        grid = np.asarray(devices[: used * group], dtype=object).reshape(shape)
    return Mesh(grid, (MEMBERS, *sharding.MESH_AXES), axis_types=(AxisType.Auto,) * (1 + len(sharding.MESH_AXES)))


def member_axis(mesh: Mesh) -> str | None:
    """The mesh axis the member axis is split over, or None (replicated)."""
    return MEMBERS if MEMBERS in mesh.axis_names and mesh.shape[MEMBERS] > 1 else None


def check(mesh: Mesh, num_members: int) -> None:
    axis = member_axis(mesh)
    if axis and num_members % mesh.shape[axis]:
        n = mesh.shape[axis]
        raise ConfigError(
            f"vectorized run: {num_members} members do not split over mesh.members={n}; use a pack size "
            f"(--vectorize=K) that is a multiple of {n}, or a mesh.members that divides {num_members}"
        )
    if axis and mesh.shape["expert"] > 1:  # the expert shard_map under the members' vmap: JAX cannot bind `members`
        raise ConfigError(
            f"vectorized run: expert parallelism (mesh.expert={mesh.shape['expert']}) with the members split over "
            f"devices (mesh.members={mesh.shape[axis]}) is not supported; set mesh.members=1 (every member on the "
            "whole mesh) or mesh.expert=1"
        )


def stacked(sh: NamedSharding, axis: str | None) -> NamedSharding:
    """The sharding of [M, ...] stacked leaves whose member slices are sharded like `sh`."""
    return NamedSharding(sh.mesh, P(axis, *sh.spec))


def state_shardings(setup, member_shapes: dict) -> dict:
    """Shardings of the stacked state {"step", "members"} from one member's abstract state `member_shapes`:
    params and the optimizer moments as the single run's (step.Setup), the rest replicated; member axis first."""
    mesh, rep = setup.mesh, sharding.replicated(setup.mesh)
    params = setup.state_shardings["params"]
    one = {k: rep for k in member_shapes}
    one["params"] = params
    one["opt_state"] = step_lib._mirror_param_shardings(
        member_shapes["opt_state"], params, setup.model.abstract_params, rep
    )
    axis = member_axis(mesh)
    return {"step": rep, "members": jax.tree.map(lambda s: stacked(s, axis), one)}
