"""Paths may be URLs: gs:// workdirs reach orbax, metrics and TensorBoard unchanged; file:// URLs are local paths."""

import json
import os

import fsspec
import pytest
from conftest import one_device_mesh, tiny_config
from etils.epath import backend as epath_backend
from fsspec.implementations.memory import MemoryFileSystem

from maxscale import paths
from maxscale.train import checkpoint as ckpt_lib
from maxscale.train import faults, loop
from maxscale.train import metrics as metrics_lib


class FakeGCS(MemoryFileSystem):
    """An in-memory object store behind `gs://` for epath's fsspec backend (no network here)."""

    protocol = ("gs", "gcs")
    store: dict = {}
    pseudo_dirs = [""]


def forget_filesystems() -> None:
    """epath caches one filesystem per protocol (and fsspec one instance per class and arguments): dropped, so
    the next `gs://` path meets the implementation registered now (gcsfs, or FakeGCS here)."""
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    fsspec.AbstractFileSystem.clear_instance_cache()
    for name in ("gs", "gcs"):  # each class keeps its own instances (and their cached listings)
        fsspec.get_filesystem_class(name).clear_instance_cache()


@pytest.fixture
def fake_gcs(monkeypatch):
    FakeGCS.store.clear()
    registry = {name: fsspec.registry.get(name) for name in ("gs", "gcs")}
    for name in ("gs", "gcs"):
        fsspec.register_implementation(name, FakeGCS, clobber=True)
    forget_filesystems()
    yield FakeGCS.store
    FakeGCS.store.clear()
    for name, impl in registry.items():  # gcsfs again for later tests (tests/test_gcs.py)
        if impl is not None:
            fsspec.register_implementation(name, impl, clobber=True)
    forget_filesystems()


class Recorder:
    """Stands in for a constructor: records its first argument, then refuses to go on (orbax's arrays would go
    through tensorstore's own GCS driver, which needs a network)."""

    def __init__(self):
        self.args = []

    def __call__(self, directory, *args, **kwargs):
        self.args.append(os.fspath(directory))
        raise RuntimeError("recorded")


def test_as_path_keeps_urls_and_resolves_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert os.fspath(paths.as_path("gs://bucket/run")) == "gs://bucket/run"
    assert os.fspath(paths.join("gs://bucket/run", "checkpoints")) == "gs://bucket/run/checkpoints"
    assert os.fspath(paths.as_path("runs/x")) == str(tmp_path / "runs" / "x")
    assert os.fspath(paths.as_path("file:///tmp/a%20b")) == "/tmp/a b"
    assert paths.is_url("s3://b/k") and not paths.is_url("file:///tmp/x") and not paths.is_url("runs/x")
    assert paths.writable_dir_problem("gs://bucket/run") is None  # remote: not probed
    assert "cannot create directories under /proc/self" in paths.writable_dir_problem("/proc/self/run")


def test_metrics_writer_writes_a_gs_workdir_through_the_object_store(fake_gcs, monkeypatch):
    tensorboard = []
    monkeypatch.setattr(metrics_lib, "SummaryWriter", lambda d, **kw: tensorboard.append(d) or _NullTB())
    writer = metrics_lib.MetricWriter("gs://bucket/run", remote_flush_s=0.0)
    writer.write(1, {"train/loss": 2.5})
    writer.write(2, {"train/loss": 2.0})
    writer.close()
    assert tensorboard == ["gs://bucket/run/tensorboard"]
    assert set(fake_gcs) == {"gs://bucket/run/metrics.jsonl"}
    assert [r["step"] for r in metrics_lib.read_metrics("gs://bucket/run")] == [1, 2]
    assert [r["step"] for r in faults.rewind_metrics("gs://bucket/run", 1)] == [1]  # resume rewinds it too
    assert [r["step"] for r in metrics_lib.read_metrics("gs://bucket/run")] == [1]
    assert not os.path.exists("gs:")


def test_gs_workdir_reaches_orbax_unchanged(fake_gcs, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(**{"train.steps": 2})
    loop.check_workdir("gs://bucket/run", cfg)  # nothing there yet: accepted without a local probe
    orbax = Recorder()
    monkeypatch.setattr(ckpt_lib.ocp, "CheckpointManager", orbax)
    monkeypatch.setattr(metrics_lib, "SummaryWriter", lambda d, **kw: _NullTB())
    trainer = loop.Trainer(cfg, "gs://bucket/run", mesh=one_device_mesh(cfg))
    with pytest.raises(RuntimeError, match="recorded"):
        trainer.run()
    assert orbax.args == ["gs://bucket/run/checkpoints"]
    assert json.loads(fake_gcs["gs://bucket/run/config.json"].getvalue()) == json.loads(cfg.to_json())
    assert os.listdir(tmp_path) == []  # nothing local: no `gs:` directory under the working directory


def test_a_run_with_a_file_url_workdir_writes_the_local_directory(tmp_path, tiny_corpus, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(**{"train.steps": 4, "train.log_every": 2, "checkpoint.every": 2, "train.sample_tokens": 0})
    url = f"file://{tmp_path}/run"
    loop.check_workdir(url, cfg)
    result = loop.Trainer(cfg, url, mesh=one_device_mesh(cfg), corpus=tiny_corpus).run()
    assert result["step"] == 4
    assert ckpt_lib.committed_steps(tmp_path / "run" / "checkpoints") == [2, 4]
    assert [r["step"] for r in metrics_lib.read_metrics(tmp_path / "run") if "train/loss" in r] == [1, 2, 4]
    assert sorted(os.listdir(tmp_path)) == ["run"]
    loop.check_workdir(url, cfg)  # the same run again: accepted (it would resume)


class _NullTB:
    def add_scalar(self, *a):
        pass

    def close(self):
        pass


def test_walk_files_names_each_file_relative_to_the_top(tmp_path):
    (tmp_path / "top" / "a" / "b").mkdir(parents=True)
    (tmp_path / "top" / "z.txt").write_text("z")
    (tmp_path / "top" / "a" / "b" / "c.bin").write_bytes(b"\0")
    walked = [(rel, os.fspath(p)) for rel, p in paths.walk_files(tmp_path / "top")]
    assert walked == [
        ("a/b/c.bin", str(tmp_path / "top" / "a" / "b" / "c.bin")),
        ("z.txt", str(tmp_path / "top" / "z.txt")),
    ]
    assert list(paths.walk_files(f"file://{tmp_path}/top")) == list(paths.walk_files(tmp_path / "top"))


def test_tree_helpers_list_copy_and_remove_local_trees(tmp_path):
    assert paths.list_dir(tmp_path / "absent") == []  # an object-store prefix with no objects is absent too
    (tmp_path / "a" / "sub").mkdir(parents=True)
    (tmp_path / "a" / "marker").write_text("m")
    (tmp_path / "a" / "sub" / "x.bin").write_bytes(b"\x00\x01")
    paths.copy_tree(tmp_path / "a", tmp_path / "b")
    assert [rel for rel, _ in paths.walk_files(tmp_path / "b")] == ["marker", "sub/x.bin"]
    assert (tmp_path / "b" / "sub" / "x.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in paths.list_dir(tmp_path)) == ["a", "b"]
    paths.remove_tree(tmp_path / "a", first=("marker",))
    assert not (tmp_path / "a").exists()
    (tmp_path / "b").chmod(0o500)  # nothing under b can go (unless root, who may delete anyway)
    try:
        paths.remove_tree(tmp_path / "b" / "sub", ignore_errors=True)  # never raises
        if os.geteuid() != 0:
            with pytest.raises(OSError):
                paths.remove_tree(tmp_path / "b" / "sub")
    finally:
        (tmp_path / "b").chmod(0o700)
