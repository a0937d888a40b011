"""maxscale.parallel.distributed.initialize: explicit config, environment detection, validation (in-process, with
jax.distributed.initialize recorded instead of called)."""

import os

import ml_collections
import pytest

from maxscale.parallel import distributed

# Env that would change what initialize() does; removed for these tests.
_CLUSTER_ENV_PREFIXES = ("MAXSCALE_", "SLURM_", "TPU_", "MEGASCALE_", "JAX_", "XLA_FLAGS")


@pytest.fixture
def fake_jax(monkeypatch):
    """Clean cluster env and recorders in place of jax.distributed.initialize
    and jax.config.update, so initialize() can be checked in-process."""
    for k in list(os.environ):
        if k.startswith(_CLUSTER_ENV_PREFIXES):
            monkeypatch.delenv(k)
    calls = {"init": [], "config": []}
    monkeypatch.setattr(distributed, "_INITIALIZED", False)
    monkeypatch.setattr(distributed, "_tpu_chips_present", lambda: False)
    monkeypatch.setattr(distributed.jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.jax.distributed, "initialize", lambda **kw: calls["init"].append(kw))
    monkeypatch.setattr(distributed.jax.config, "update", lambda *a: calls["config"].append(a))
    return calls


def _cfg(**kw):
    base = dict(coordinator_address="", num_processes=0, process_id=-1, local_device_ids="")
    return ml_collections.ConfigDict({**base, **kw})


def test_initialize_single_process_is_noop(fake_jax):
    distributed.initialize(None)
    distributed.initialize(_cfg())
    assert fake_jax == {"init": [], "config": []}


def test_initialize_explicit_config_beats_env_and_is_idempotent(fake_jax, monkeypatch):
    monkeypatch.setenv("MAXSCALE_COORDINATOR_ADDRESS", "10.0.0.9:1")
    monkeypatch.setenv("MAXSCALE_NUM_PROCESSES", "8")
    monkeypatch.setenv("MAXSCALE_PROCESS_ID", "7")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    cfg = _cfg(coordinator_address="10.0.0.1:8476", num_processes=2, process_id=1, local_device_ids="0,1")
    distributed.initialize(cfg)
    distributed.initialize(cfg)  # second call: no-op
    assert fake_jax["config"] == [("jax_cpu_collectives_implementation", "gloo")]
    assert fake_jax["init"] == [
        dict(
            coordinator_address="10.0.0.1:8476",
            num_processes=2,
            process_id=1,
            local_device_ids=[0, 1],
            cluster_detection_method="deactivate",
        )
    ]


def test_initialize_from_env_on_gpu_skips_gloo(fake_jax, monkeypatch):
    monkeypatch.setenv("MAXSCALE_COORDINATOR_ADDRESS", "node0:8476")
    monkeypatch.setenv("MAXSCALE_NUM_PROCESSES", "4")
    monkeypatch.setenv("MAXSCALE_PROCESS_ID", "3")
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    distributed.initialize()
    assert fake_jax["config"] == []
    assert fake_jax["init"][0]["process_id"] == 3 and fake_jax["init"][0]["local_device_ids"] is None


@pytest.mark.parametrize(
    "env",
    [
        {"SLURM_JOB_ID": "12", "SLURM_NTASKS": "16"},
        {"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"},
        {"MEGASCALE_COORDINATOR_ADDRESS": "w0"},
    ],
)
def test_initialize_auto_detects_clusters(fake_jax, monkeypatch, env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    distributed.initialize()
    assert fake_jax["init"] == [{}]


def test_initialize_single_task_slurm_and_explicit_one_process_stay_local(fake_jax, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "12")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    distributed.initialize()
    monkeypatch.setattr(distributed, "_INITIALIZED", False)
    monkeypatch.setenv("SLURM_NTASKS", "8")
    distributed.initialize(_cfg(num_processes=1))  # explicit 1 overrides detection
    assert fake_jax["init"] == []


@pytest.mark.parametrize(
    "cfg, env, field",
    [
        (dict(coordinator_address="h:1", num_processes=2, process_id=2), {}, "process_id"),
        (dict(coordinator_address="h:1", num_processes=2, process_id=-5), {}, "process_id"),
        (dict(coordinator_address="10.0.0.1", num_processes=2, process_id=0), {}, "coordinator_address"),
        (dict(coordinator_address="h:99999", num_processes=2, process_id=0), {}, "coordinator_address"),
        (dict(num_processes=2, process_id=0), {}, "coordinator_address"),
        (dict(coordinator_address="h:1", num_processes=2), {}, "process_id"),
        (dict(coordinator_address="h:1", process_id=0), {}, "num_processes"),
        (dict(num_processes=-1), {}, "num_processes"),
        (
            dict(coordinator_address="h:1", num_processes=2, process_id=0, local_device_ids="0;1"),
            {},
            "local_device_ids",
        ),
        ({}, {"MAXSCALE_NUM_PROCESSES": "two"}, "MAXSCALE_NUM_PROCESSES"),
        (
            {},
            {"MAXSCALE_NUM_PROCESSES": "2", "MAXSCALE_PROCESS_ID": "2", "MAXSCALE_COORDINATOR_ADDRESS": "h:1"},
            "MAXSCALE_PROCESS_ID=2 must be <",
        ),
    ],
)
def test_initialize_rejects_bad_values(fake_jax, monkeypatch, cfg, env, field):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match=field) as e:
        distributed.initialize(_cfg(**cfg))
    assert "\n" not in str(e.value)
    assert fake_jax["init"] == []
