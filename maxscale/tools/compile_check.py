"""Compile check: compile the train step for a target mesh on simulated CPU devices and report memory per device.

    maxscale compile-check --config=configs/base.py --mesh=data=8,fsdp=8 [--config.a.b=v ...]
        [--device=H100 | --device_memory_gb=80] [--json]

Catches, before a job is queued: sizes that do not divide over the mesh (exit 2, one line), batches that do not
split over the data-parallel axes, and shapes that do not fit in device memory (exit 1). Nothing is allocated: the
train state and batch are `jax.ShapeDtypeStruct`s carrying their shardings, and the step is only lowered and
compiled. Per-device bytes:
  parameters, optimizer state   from the shardings: shard shape x dtype, summed over leaves (exact)
  batch                         the int32 token rows this device holds
  activations + temporaries     XLA's temp buffers for the step (`compiled.memory_analysis().temp_size_in_bytes`):
                                what the backward pass keeps from the forward, plus workspace
  total                         arguments + outputs - donated (aliased) + temporaries: the step's peak estimate
The CPU compiler plans buffers differently from a TPU or GPU one (fusion, layouts), so the temporaries are an
estimate of the right order, not the exact figure; the state bytes are exact.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections

from maxscale import cli
from maxscale import config as config_lib
from maxscale.errors import ConfigError
from maxscale.model import transformer
from maxscale.parallel import sharding
from maxscale.train import step as step_lib

GIB = 2**30
DEFAULT_DEVICE_MEMORY_GB = 80.0
# Memory per device in GiB (vendor figures), looked up by a case-insensitive substring of --device.
DEVICE_MEMORY_GB = {
    "TPU v4": 32,
    "TPU v5 lite": 16,
    "TPU v5e": 16,
    "TPU v5p": 95,
    "TPU v6 lite": 32,
    "TPU v6e": 32,
    "A100-40GB": 40,
    "A100": 80,
    "H100": 80,
    "H200": 141,
    "B200": 180,
    "MI300X": 192,
}
TIGHT_FRACTION = 0.9  # above this share of device memory, runtime buffers and fragmentation may not fit
AXES = ("data", "fsdp", "tensor", "expert")


# -- the target mesh ----------------------------------------------------------------------------------------------


def parse_mesh(text: str) -> dict[str, int]:
    """`data=8,fsdp=8[,dcn_data=2]` or `8x8x1x1` (sizes in data x fsdp x tensor x expert order; missing ones
    are 1). Returns every `mesh.*` field: axes not named are 1, so the mesh is exactly the one given."""
    out = {a: 1 for a in AXES} | {f"dcn_{a}": 1 for a in AXES}
    text = text.strip()
    named = [part.partition("=") for part in filter(None, text.split(","))] if "=" in text else None
    if named is None and len(text.lower().split("x")) > len(AXES):
        raise ConfigError(f"--mesh={text}: at most {len(AXES)} sizes (data x fsdp x tensor x expert)")
    for name, _, _ in named or []:
        if name.strip() not in out:
            raise ConfigError(f"--mesh: unknown axis {name.strip()!r}; use {', '.join(out)}")
    try:
        if named is not None:
            out.update({name.strip(): int(value) for name, _, value in named})
        else:
            out.update(zip(AXES, (int(v) for v in text.lower().split("x"))))
    except ValueError:
        raise ConfigError(
            f"--mesh={text}: expected e.g. data=8,fsdp=8 or 8x8 (data x fsdp x tensor x expert)"
        ) from None
    for name, v in out.items():
        if v < 1:
            raise ConfigError(f"--mesh: {name}={v} must be a positive size (the target mesh has no -1)")
    return out


def num_devices(cfg: ml_collections.ConfigDict) -> int:
    sizes = [cfg.mesh[a] for a in AXES]
    if -1 in sizes:
        raise ConfigError(
            "--mesh is required: the config's mesh has a -1 axis, which fills whatever devices are "
            "present; give the target shape, e.g. --mesh=data=8,fsdp=8"
        )
    return math.prod(sizes)


def device_memory_gb(device: str = "", memory_gb: float = 0.0) -> tuple[float, str]:
    """(GiB per device, where it came from): --device_memory_gb, else --device from the table, else the default."""
    if memory_gb > 0:
        return memory_gb, "--device_memory_gb"
    if device:
        # the longest table name inside the device kind ("NVIDIA H100 80GB HBM3"), else a name containing it ("v5p")
        names = sorted((n for n in DEVICE_MEMORY_GB if n.lower() in device.lower()), key=len, reverse=True)
        names = names or [n for n in DEVICE_MEMORY_GB if device.lower() in n.lower()]
        if names:
            return float(DEVICE_MEMORY_GB[names[0]]), names[0]
        raise ConfigError(
            f"--device={device}: not in the table ({', '.join(DEVICE_MEMORY_GB)}); pass --device_memory_gb instead"
        )
    return DEFAULT_DEVICE_MEMORY_GB, "default"


# -- the check ----------------------------------------------------------------------------------------------------


def _bytes_per_device(tree) -> int:
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


@contextlib.contextmanager
def _captured_stderr(lines: list[str]):
    """Collects what C++ code (XLA's SPMD partitioner) writes to file descriptor 2 while the block runs."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines += tmp.read().decode(errors="replace").splitlines()


@contextlib.contextmanager
def uncached_compile():
    """Compiles inside this block are XLA's own, never loads from a persistent compilation cache (set by
    JAX_COMPILATION_CACHE_DIR, as the test suite does): a compile time, or XLA's compile log, is then a measurement.
    jax decides once per process whether it uses the cache, so the decision is reset on entry and on exit."""
    from jax.experimental.compilation_cache import compilation_cache

    before = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", before)
        compilation_cache.reset_cache()


def check(cfg: ml_collections.ConfigDict, memory_gb: float = DEFAULT_DEVICE_MEMORY_GB) -> dict:
    """Compiles the train step of resolved `cfg` on its mesh in this process (it needs enough CPU devices)."""
    n = num_devices(cfg)
    mesh = sharding.make_mesh(cfg, jax.devices("cpu")[:n])
    setup = step_lib.Setup.build(cfg, mesh)
    state = setup.abstract_state()
    batch = jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.data.seq_len + 1), jnp.int32, sharding=setup.batch_sharding)
    log: list[str] = []
    with _captured_stderr(log), uncached_compile():
        t0 = time.perf_counter()
        lowered = setup.train_step.lower(state, batch)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
    mem = compiled.memory_analysis()
    total = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    capacity = int(memory_gb * GIB)
    remats = [line for line in log if "Involuntary full rematerialization" in line]
    return {
        "mesh": {a: mesh.shape[a] for a in sharding.MESH_AXES},
        "dcn": sharding.dcn_shape(cfg),
        "devices": n,
        "params": transformer.count_params(cfg)["total"],
        "global_batch": [cfg.train.batch_size, cfg.data.seq_len],
        "remat": {True: "full", False: "none"}.get(cfg.model.remat, cfg.model.remat),  # a policy name
        "lower_seconds": round(t1 - t0, 2),
        "compile_seconds": round(t2 - t1, 2),
        "per_device_bytes": {
            "params": _bytes_per_device(state["params"]),
            "opt_state": _bytes_per_device(state["opt_state"]),
            "batch": _bytes_per_device(batch),
            "activations_and_temp": int(mem.temp_size_in_bytes),
            "arguments": int(mem.argument_size_in_bytes),
            "outputs": int(mem.output_size_in_bytes),
            "donated": int(mem.alias_size_in_bytes),
            "total": int(total),
        },
        "device_memory_bytes": capacity,
        "fits": total <= capacity,
        "verdict": ("does not fit" if total > capacity else "tight" if total > TIGHT_FRACTION * capacity else "fits"),
        # XLA replicating a tensor to reshard it: correct but slow, and a sign that a sharding rule is off
        "xla_full_rematerializations": len(remats),
        "xla_warnings": [line[:300] for line in remats[:5]],
    }


def run(cfg: ml_collections.ConfigDict, memory_gb: float = DEFAULT_DEVICE_MEMORY_GB) -> dict:
    """`check` here if this process has enough CPU devices, else in a fresh subprocess that simulates them (the
    device count is fixed when JAX's backend starts)."""
    n = num_devices(cfg)
    try:
        enough = len(jax.devices("cpu")) >= n
    except RuntimeError:  # no CPU backend in this process (JAX_PLATFORMS excludes it)
        enough = False
    if enough:
        return check(cfg, memory_gb)
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_REPO, env.get("PYTHONPATH", "")]))
    request = json.dumps({"config": cfg.to_dict(), "memory_gb": memory_gb})
    r = subprocess.run(
        [sys.executable, "-m", "maxscale.tools.compile_check", "--child"],
        input=request,
        env=env,
        capture_output=True,
        text=True,
    )
    try:
        answer = json.loads(r.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise RuntimeError(
            f"compile check subprocess failed (exit {r.returncode}): {r.stderr.strip()[-2000:]}"
        ) from None
    if "config_error" in answer:
        raise ConfigError(answer["config_error"])
    if "error" in answer:
        raise RuntimeError(answer["error"])
    return answer


_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def use_cpu_devices(n: int) -> None:
    """Makes this process simulate n CPU devices, if JAX's backend has not started yet (else a no-op: `run`
    then falls back to a subprocess). Call it first thing in a fresh process, never in a library."""
    try:
        jax.config.update("jax_num_cpu_devices", n)
        jax.config.update("jax_platforms", "cpu")
    except RuntimeError:
        pass


# -- output -------------------------------------------------------------------------------------------------------


def table(report: dict, memory_source: str = "") -> str:
    b = report["per_device_bytes"]
    mesh = " ".join(f"{a}={v}" for a, v in report["mesh"].items())
    dcn = {a: v for a, v in report["dcn"].items() if v > 1}
    if dcn:
        mesh += " (dcn " + " ".join(f"{a}={v}" for a, v in dcn.items()) + ")"
    cap = report["device_memory_bytes"]
    rows = [
        ("parameters", b["params"]),
        ("optimizer state", b["opt_state"]),
        ("batch", b["batch"]),
        ("activations + temporaries", b["activations_and_temp"]),
        ("total (peak estimate)", b["total"]),
    ]
    n = report["params"]
    count = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"
    lines = [
        f"compile check: {count} params, global batch "
        f"{report['global_batch'][0]} x {report['global_batch'][1]} tokens, remat {report['remat']}",
        f"mesh {mesh}: {report['devices']} simulated devices; lowered in {report['lower_seconds']} s, "
        f"compiled in {report['compile_seconds']} s",
        f"{'per device':<28}{'GiB':>10}{'bytes':>16}",
    ]
    lines += [f"  {name:<26}{v / GIB:>10.3f}{v:>16,d}" for name, v in rows]
    source = f", {memory_source}" if memory_source else ""
    lines.append(
        f"{report['verdict']}: {b['total'] / GIB:.2f} of {cap / GIB:.0f} GiB per device "
        f"({100 * b['total'] / cap:.1f}%{source})"
    )
    if report["xla_full_rematerializations"]:
        lines.append(
            f"warning: XLA replicated a tensor to reshard it {report['xla_full_rematerializations']} "
            f"time(s) (correct but slow; see xla_warnings in --json)"
        )
    return "\n".join(lines)


def _parse_args(argv: list[str]) -> tuple[ml_collections.ConfigDict, argparse.Namespace]:
    p = cli.Parser("compile_check", __doc__, config=True)
    p.add_argument("--mesh", default=None, help="e.g. data=8,fsdp=8 or 2x4x2 (data x fsdp x tensor)")
    p.add_argument("--device", default="", help="a device name for its memory, e.g. H100, A100-40GB, v5p")
    p.add_argument("--device_memory_gb", default="0", help="GiB per device (overrides --device)")
    cli.bool_flag(p, "json", "print the report as JSON")
    args = p.parse(argv)
    cfg = args.config
    if args.mesh:
        with cfg.mesh.unlocked():
            cfg.mesh.update(parse_mesh(args.mesh))
    try:
        args.device_memory_gb = float(args.device_memory_gb)
    except ValueError:
        raise ConfigError(f"--device_memory_gb={args.device_memory_gb}: expected a number of GiB, e.g. 80") from None
    return config_lib.resolve(cfg), args


def main(argv: list[str]) -> int:
    """The CLI: 0 fits, 1 does not fit (or XLA failed), 2 bad input or a sharding error. Run in a fresh process."""
    if argv == ["--child"]:
        return _child()
    return _main(argv)


@cli.command("compile_check")
def _main(argv: list[str]) -> int:
    cfg, args = _parse_args(argv)
    memory_gb, source = device_memory_gb(args.device, args.device_memory_gb)
    use_cpu_devices(num_devices(cfg))
    try:
        report = run(cfg, memory_gb)
    except ConfigError:
        raise
    except Exception as e:  # an XLA failure: one line, not a traceback
        first = str(e).splitlines()[0] if str(e) else ""
        print(f"compile_check: compile failed: {type(e).__name__}: {first}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2) if args.json else table(report, source))
    return 0 if report["fits"] else 1


def _child() -> int:
    """Subprocess side of `run`: a JSON request on stdin, the report (or the error) as the last stdout line."""
    request = json.loads(sys.stdin.read())
    cfg = ml_collections.ConfigDict(request["config"])
    try:
        use_cpu_devices(num_devices(cfg))
        answer = check(cfg, request["memory_gb"])
    except ConfigError as e:
        answer = {"config_error": str(e)}
    except Exception as e:
        answer = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
