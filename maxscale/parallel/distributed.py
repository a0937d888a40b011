"""Multi-process JAX runtime setup.

`initialize()` must run before any other JAX call (jax.devices(), jit, ...),
because `jax.distributed.initialize` refuses to run once an XLA backend exists.

Resolution order, first match wins:
  1. explicit fields of the `distributed` config section (a ConfigDict or None):
     coordinator_address ('' = unset), num_processes (0 = unset),
     process_id (-1 = unset), local_device_ids ('' = unset, e.g. '0,1,2,3');
  2. env set by our launchers (launch/*.py): MAXSCALE_COORDINATOR_ADDRESS,
     MAXSCALE_NUM_PROCESSES, MAXSCALE_PROCESS_ID, MAXSCALE_LOCAL_DEVICE_IDS;
  3. a SLURM job step with >1 task, or a Cloud TPU VM / GKE TPU pod:
     `jax.distributed.initialize()` with no arguments (JAX's cluster detection);
  4. otherwise single process: nothing to do.
An explicit num_processes of 1 also means single process (and skips step 3).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import jax

ENV_COORDINATOR = "MAXSCALE_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "MAXSCALE_NUM_PROCESSES"
ENV_PROCESS_ID = "MAXSCALE_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "MAXSCALE_LOCAL_DEVICE_IDS"

_INITIALIZED = False  # set once initialize() has run (whatever it decided)


def _field(cfg: Any, name: str, unset: Any) -> Any:
    """A config field, or `unset` when the section or the field is absent."""
    if cfg is None:
        return unset
    value = cfg.get(name, unset) if hasattr(cfg, "get") else getattr(cfg, name, unset)
    return unset if value is None else value


def _int(raw: str, source: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{source}={raw!r} is not an integer; set a whole number or leave it unset.") from None


def _device_ids(raw: str, source: str) -> list[int]:
    try:
        return [int(x) for x in raw.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{source}={raw!r} must be comma-separated integers such as '0,1,2,3'.") from None


def _pick(cfg: Any, name: str, unset: Any, env: str) -> tuple[Any, str]:
    """(raw value, where it came from): the config field unless it holds its
    'unset' value, else the env var (stripped), else (None, env)."""
    value = _field(cfg, name, unset)
    if value != unset:
        return value, f"distributed.{name}"
    raw = os.environ.get(env, "").strip()
    return (raw or None), env


def resolve(dist_cfg: Any = None) -> dict[str, Any]:
    """Explicit settings merged from config (wins) and MAXSCALE_* env.

    Returns {'coordinator_address': str|None, 'num_processes': int|None,
    'process_id': int|None, 'local_device_ids': list[int]|None}; None = unset.
    Raises ValueError (one line naming the config field or env var) for
    inconsistent or malformed values.
    """
    coord, coord_src = _pick(dist_cfg, "coordinator_address", "", ENV_COORDINATOR)
    num, num_src = _pick(dist_cfg, "num_processes", 0, ENV_NUM_PROCESSES)
    pid, pid_src = _pick(dist_cfg, "process_id", -1, ENV_PROCESS_ID)
    ids, ids_src = _pick(dist_cfg, "local_device_ids", "", ENV_LOCAL_DEVICE_IDS)
    num = None if num is None else _int(str(num), num_src)
    pid = None if pid is None else _int(str(pid), pid_src)
    ids = None if ids is None else _device_ids(str(ids), ids_src)

    if num is not None and num < 1:
        raise ValueError(f"{num_src}={num} must be >= 1 (0 means unset).")
    if pid is not None and pid < 0:
        raise ValueError(f"{pid_src}={pid} must be >= 0 (-1 means unset).")
    if num is not None and pid is not None and pid >= num:
        raise ValueError(f"{pid_src}={pid} must be < {num_src}={num}; process ids are 0..num_processes-1.")
    if coord:
        host, sep, port = coord.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(
                f"{coord_src}={coord!r} must be 'host:port' with a port in 1..65535, e.g. '10.0.0.1:8476'."
            )
    if num is not None and num > 1:
        for value, field, env in ((coord, "coordinator_address", ENV_COORDINATOR), (pid, "process_id", ENV_PROCESS_ID)):
            if value is None:
                raise ValueError(
                    f"distributed.{field} is required when {num_src}={num} > 1; set it in the config or via {env}."
                )
    elif num is None and (coord or pid is not None):
        raise ValueError(
            f"distributed.num_processes is required when {coord_src if coord else pid_src} "
            f"is set; set it in the config or via {ENV_NUM_PROCESSES}."
        )
    return {"coordinator_address": coord, "num_processes": num, "process_id": pid, "local_device_ids": ids}


def _in_slurm_step() -> bool:
    try:
        return "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1
    except ValueError:
        return False


def _on_tpu_pod() -> bool:
    """Cloud TPU VM / GKE TPU env, or TPU chips on the PCI bus (GCE TPU VMs
    keep the worker list in metadata, not env, so env alone can miss them)."""
    workers = os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("TPU_PROCESS_ADDRESSES") or ""
    if len([w for w in workers.split(",") if w]) > 1:
        return True
    if os.environ.get("MEGASCALE_COORDINATOR_ADDRESS") or os.environ.get("MEGASCALE_NUM_SLICES", "1") != "1":
        return True
    return _tpu_chips_present()


def _tpu_chips_present() -> bool:
    """True when libtpu is installed and TPU chips are attached to this host."""
    if importlib.util.find_spec("libtpu") is None:
        return False
    try:  # private JAX helper, hence the guard; it only reads /sys/bus/pci.
        from jax._src import hardware_utils

        return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
    except Exception:  # pylint: disable=broad-except
        return False


def _cpu_platform() -> bool:
    """True when JAX will run on CPU: JAX_PLATFORMS says cpu, or no GPU/TPU
    plugin is installed. Decided without touching the backend (see module doc)."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return platforms.split(",")[0] == "cpu"
    accelerator_plugins = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin", "libtpu")
    return all(importlib.util.find_spec(m) is None for m in accelerator_plugins)


def initialize(dist_cfg: Any = None) -> None:
    """Sets up the multi-process runtime; idempotent (later calls are no-ops)."""
    global _INITIALIZED
    if _INITIALIZED or jax.distributed.is_initialized():
        _INITIALIZED = True
        return
    s = resolve(dist_cfg)
    num = s["num_processes"]
    if num is not None and num > 1:
        if _cpu_platform():
            # Cross-process collectives on the CPU backend need gloo; the CPU client
            # reads this when it is created, i.e. after distributed init, so it must
            # be set before the first backend use. Setting it before init is safest.
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        # All values are explicit: 'deactivate' stops JAX's SLURM detection from
        # pinning each process to device SLURM_LOCALID (wrong for one process per node).
        jax.distributed.initialize(
            coordinator_address=s["coordinator_address"],
            num_processes=num,
            process_id=s["process_id"],
            local_device_ids=s["local_device_ids"],
            cluster_detection_method="deactivate",
        )
    elif num is None and (_in_slurm_step() or _on_tpu_pod()):
        jax.distributed.initialize()
    _INITIALIZED = True


def is_primary() -> bool:
    """True on process 0, the one that logs and writes single-writer files."""
    return jax.process_index() == 0


def describe() -> str:
    """One line, e.g. 'process 0/2 | local devices 2 | global devices 4 | platform cpu'."""
    return (
        f"process {jax.process_index()}/{jax.process_count()} | "
        f"local devices {jax.local_device_count()} | global devices {jax.device_count()} | "
        f"platform {jax.default_backend()}"
    )
