"""Metrics: JSONL, TensorBoard and (optional) Weights & Biases writers, MFU accounting, the progress line. Process 0
writes; others are silent."""

from __future__ import annotations

import functools
import json
import math
import os
import struct
import sys
import tempfile
import time
import uuid

import jax
import jax.numpy as jnp

from maxscale import paths


def _import_tensorboardx():
    """tensorboardX imports torch when torch is installed (only to accept torch tensors), which costs every run
    1.5 s of start-up and 250 MB once the `hf` extra is in the environment; hide torch during the import (an
    `import torch` then raises ImportError, which tensorboardX catches)."""
    hidden = "torch" not in sys.modules
    if hidden:
        sys.modules["torch"] = None
    try:
        import tensorboardX
        from tensorboardX.proto import event_pb2
    finally:
        if hidden:
            del sys.modules["torch"]
    return tensorboardX.SummaryWriter, event_pb2


SummaryWriter, event_pb2 = _import_tensorboardx()

# Dense bf16 matmul peaks per chip (vendor figures), used for MFU when the device kind is recognised.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "B200": 2250e12,
}


@functools.lru_cache(maxsize=None)
def measure_matmul_peak(n: int = 1024, dtype=jnp.float32, repeats: int = 10) -> float:
    """FLOP/s of one device on an n x n matmul, best of `repeats` (the CPU fallback for MFU). Measured once per
    process; on a machine busy with other work it reads low, and MFU then reads high."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def device_peak_flops(configured: float = 0.0) -> tuple[float, str]:
    """Per-device peak FLOP/s and where it came from."""
    if configured > 0:
        return configured, "config"
    kind = jax.devices()[0].device_kind
    for name, flops in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return flops, f"table ({kind})"
    return measure_matmul_peak(), f"measured matmul ({kind})"


class MetricWriter:
    """Appends one JSON object per logged step to metrics.jsonl and mirrors scalars to TensorBoard.

    `workdir` may be a URL (maxscale/paths.py). Object stores cannot append, so there the whole file is rewritten
    from memory at most every `remote_flush_s` seconds and at close; locally each record is appended at once."""

    def __init__(
        self,
        workdir: str | os.PathLike,
        enabled: bool = True,
        remote_flush_s: float = 30.0,
        purge_step: int = 0,
        config=None,
    ):
        """`purge_step` > 0 (a resumed run): TensorBoard discards the events a killed run wrote at steps >= it
        (event files are append-only; the writer records the purge and readers apply it, as TensorBoard does).
        `config`: the run's config; with `metrics.wandb_project` set, scalars also go to Weights & Biases."""
        self.enabled = enabled
        if not enabled:
            return
        project = config.get("metrics", {}).get("wandb_project", "") if config is not None else ""
        self._wandb = WandbWriter(workdir, config) if project else None
        self.path = paths.join(workdir, "metrics.jsonl")
        self._remote = paths.is_url(self.path)
        self._flush_s, self._flushed_at = remote_flush_s, time.monotonic()
        if self._remote:
            self._lines = self.path.read_text().splitlines(keepends=True) if self.path.exists() else []
        else:
            self._file = open(os.fspath(self.path), "a", buffering=1)  # line-buffered: a kill loses no line
        self._tb = SummaryWriter(os.fspath(paths.join(workdir, "tensorboard")), purge_step=purge_step or None)

    def write(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        line = json.dumps(record) + "\n"
        if self._remote:
            self._lines.append(line)
            if time.monotonic() - self._flushed_at > self._flush_s:
                self._flush_remote()
        else:
            self._file.write(line)
        for k, v in record.items():
            if k != "step":
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.write(step, scalars)

    def write_array(self, step: int, name: str, values) -> None:
        """Appends {"step": step, name: nested list} to `<name>.jsonl` (per-layer, per-expert loads, ...). Local
        workdirs only: on an object store the arrays are not kept (metrics.jsonl has their summaries)."""
        if not self.enabled or self._remote:
            return
        with open(os.fspath(self.path.parent / f"{name}.jsonl"), "a") as fh:
            rows = [[round(float(v), 6) for v in row] for row in values]
            fh.write(json.dumps({"step": int(step), name: rows}) + "\n")

    def _flush_remote(self) -> None:
        self.path.write_text("".join(self._lines))
        self._flushed_at = time.monotonic()

    def close(self) -> None:
        if self.enabled:
            if self._remote:
                self._flush_remote()
            else:
                self._file.close()
            self._tb.close()
            if self._wandb is not None:
                self._wandb.close()


class WandbWriter:
    """Scalars to a Weights & Biases run (`metrics.wandb_project`; `metrics.wandb_mode` offline by default: files
    under <workdir>/wandb, uploaded later with `wandb sync`). The W&B run id is kept in <workdir>/wandb_run_id, so a
    resumed run logs into the same W&B run (steps it already has are ignored by W&B). wandb is imported here only:
    config.resolve refuses the field in one line when it is not installed."""

    def __init__(self, workdir: str | os.PathLike, config):
        import wandb

        local = not paths.is_url(workdir)  # wandb writes local files: a remote workdir logs under the temp dir
        root = os.fspath(paths.as_path(workdir)) if local else os.path.join(tempfile.gettempdir(), "maxscale-wandb")
        os.makedirs(root, exist_ok=True)
        id_path = paths.join(workdir, "wandb_run_id")
        run_id = id_path.read_text().strip() if id_path.exists() else uuid.uuid4().hex[:12]
        if not id_path.exists():
            paths.write_text_atomic(id_path, run_id)
        m = config.metrics
        self.run = wandb.init(
            project=m.wandb_project,
            mode=m.wandb_mode,
            dir=root,
            id=run_id,
            resume="allow",
            name=os.path.basename(os.fspath(workdir).rstrip("/")),
            config=config.to_dict(),
        )

    def write(self, step: int, scalars: dict) -> None:
        self.run.log({k: float(v) for k, v in scalars.items()}, step=int(step))

    def close(self) -> None:
        self.run.finish()


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
    """The records of `workdir/metrics.jsonl` ([] if none), skipping a torn last line of a killed run."""
    path = paths.join(workdir, "metrics.jsonl")
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def read_tensorboard_scalars(logdir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} from the event files under `logdir`, read as TensorBoard does: files in name
    (time) order, and a session start with a step purges the earlier events at that step or later."""
    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(paths.as_path(logdir).glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos + 12 <= len(data):  # TFRecord: u64 length, u32 crc, payload, u32 crc
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            if event.HasField("session_log") and event.session_log.status == event.session_log.START and event.step:
                scalars = {tag: [(s, v) for s, v in rows if s < event.step] for tag, rows in scalars.items()}
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """One live line on a terminal (carriage return), one line per update otherwise (logs, CI)."""

    def __init__(self, total_steps: int, enabled: bool = True, stream=None):
        self.total, self.enabled = total_steps, enabled
        self.stream = stream if stream is not None else sys.stdout  # the current stdout, not the one at import
        self.tty = self.stream.isatty()

    def update(
        self, step: int, loss: float, tokens_per_s: float, mfu: float, seconds_per_step: float, extra: str = ""
    ) -> None:
        """A step's line. Before a rate is measured (the first logged step: its time includes compilation, so the
        trainer passes seconds_per_step 0) the rate, MFU and ETA are left out rather than shown as 0."""
        if not self.enabled:
            return
        head = f"step {step:>{len(str(self.total))}}/{self.total}  loss {loss:.4f}  "
        if seconds_per_step > 0 and tokens_per_s > 0:
            eta = _duration((self.total - step) * seconds_per_step)
            line = f"{head}{tokens_per_s:,.0f} tok/s  MFU {100 * mfu:.1f}%  ETA {eta}{extra}"
        else:
            line = f"{head}(measuring tok/s: this step includes compilation){extra}"
        if self.tty:
            self.stream.write("\r\033[K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r\033[K")
        self.stream.write(text + "\n")
        self.stream.flush()
