"""Accelerator-performance features (docs/performance.md): attention kernels, the chunked loss, remat policies,
gradient accumulation, mixed precision, launcher XLA flags, and the one-line refusals of what cannot run."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import ROOT, one_device_mesh, tiny_config

from maxscale import config as config_lib
from maxscale.errors import ConfigError
from maxscale.launch import common as launch_common
from maxscale.model import attention, kernels, transformer
from maxscale.model.layers import Matmul
from maxscale.parallel import sharding
from maxscale.train import checkpoint as ckpt_lib
from maxscale.train import step as step_lib

SMALL = {"model.width": 32, "model.num_heads": 4, "model.depth": 1, "data.seq_len": 16, "train.batch_size": 4}


def small(**over):
    return tiny_config(**{**SMALL, **over})


def tokens_for(cfg, batch=None, seed=0):
    B = batch or cfg.train.batch_size
    return jax.random.randint(jax.random.key(seed), (B, cfg.data.seq_len + 1), 0, cfg.model.vocab_size)


def loss_and_grads(cfg, params=None, tokens=None):
    """(loss to differentiate, its gradients) of `cfg`'s model on a fixed batch (one device)."""
    setup = step_lib.Setup.build(cfg, one_device_mesh(cfg))
    params = setup.model.init(0) if params is None else params
    tokens = tokens_for(cfg) if tokens is None else tokens
    fn = jax.jit(jax.value_and_grad(lambda p, t: setup.loss_and_aux(p, t)[0]))
    return fn(params, tokens), params


def assert_trees_close(a, b, rtol, atol=0.0):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


# -- attention kernels ---------------------------------------------------------------------------------------------


def _qkv(T, H, G, K=8, B=2, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q, k, v = (jax.random.normal(ks[i], (B, T, n, K)) for i, n in enumerate((H, G, G)))
    return q, k, v, jax.random.normal(ks[3], (B, T, H, K))


def _values_and_grads(kernel, q, k, v, ct):
    out, vjp = jax.vjp(lambda q, k, v: kernel(q, k, v, 0.3), q, k, v)
    return out, vjp(ct)


@pytest.mark.parametrize("T,H,G,chunk", [(64, 4, 2, 16), (40, 4, 1, 16)])
def test_chunked_attention_equals_xla(T, H, G, chunk):
    """Causal, grouped / multi-query heads, sequences that are and are not a multiple of the chunk."""
    q, k, v, ct = _qkv(T, H, G)
    chunked = lambda *a: kernels.chunked_attention(*a, chunk=chunk)  # noqa: E731
    want, want_grads = jax.jit(lambda *a: _values_and_grads(kernels.xla_attention, *a))(q, k, v, ct)
    got, got_grads = jax.jit(lambda *a: _values_and_grads(chunked, *a))(q, k, v, ct)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert_trees_close(got_grads, want_grads, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_chunked_attention_branch_equals_xla(qk_norm):
    """The model's attention branch (projections, QK-norm or not, RoPE, grouped-query heads): values and the
    gradients of its parameters and input."""
    from maxscale.model import attention as attention_lib
    from maxscale.parameterization import Parameterization

    def branch(impl):  # each branch's own config and Context: the chunked one runs 4 blocks of 4 positions
        over = {"model.num_kv_heads": 2, "model.qk_norm": qk_norm, "model.attention_impl": impl}
        cfg = small(**over, **{"model.attention_chunk_size": 4})
        mults, ctx = Parameterization(cfg).multipliers(), transformer.build_context(cfg)
        assert ctx.attention_impl == impl and cfg.data.seq_len == 16
        return cfg, lambda p, h: attention_lib.apply(p, h, cfg, mults, Matmul(), ctx)

    cfg, xla_branch = branch("xla")
    _, chunked_branch = branch("chunked")
    params = transformer.ModelDef(cfg).init(0)["blocks"]
    p = {k: v[0] + 0.05 * jax.random.normal(jax.random.key(7), v[0].shape) for k, v in params.items()}
    h = jax.random.normal(jax.random.key(1), (2, cfg.data.seq_len, cfg.model.width))
    ct = jax.random.normal(jax.random.key(2), h.shape)

    def run(f):
        out, vjp = jax.vjp(f, p, h)
        return out, vjp(ct)

    want, want_grads = jax.jit(lambda: run(xla_branch))()
    got, got_grads = jax.jit(lambda: run(chunked_branch))()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert_trees_close(got_grads, want_grads, rtol=1e-5, atol=1e-6)


def _shapes_in(jaxpr) -> set[tuple]:
    """Every intermediate array shape of a jaxpr, sub-jaxprs (scan, while, cond, custom_vjp) included."""
    shapes = set()
    for eqn in jaxpr.eqns:
        shapes |= {tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape")}
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    shapes |= _shapes_in(inner)
    return shapes


@pytest.mark.parametrize("T,chunk", [(64, 16), (40, 16)])
def test_chunked_attention_never_builds_a_T_by_T_array(T, chunk):
    """The chunked kernel's point is memory, which equal values cannot show: in its forward and backward no
    intermediate has a T x T face; the chunk x chunk logit blocks do. A kernel that ignored `chunk` (one block of
    T) fails here while still equalling the XLA kernel in value."""
    q, k, v, ct = _qkv(T, 4, 2)
    f = lambda *a: _values_and_grads(lambda *b: kernels.chunked_attention(*b, chunk=chunk), *a)  # noqa: E731
    shapes = _shapes_in(jax.make_jaxpr(f)(q, k, v, ct).jaxpr)
    padded = T + (-T % chunk)
    assert any(s[-2:] == (chunk, chunk) for s in shapes), sorted(shapes)
    assert not any(s[-2:] in ((T, T), (padded, padded)) for s in shapes), sorted(s for s in shapes if len(s) > 1)
    xla = _shapes_in(jax.make_jaxpr(lambda *a: _values_and_grads(kernels.xla_attention, *a))(q, k, v, ct).jaxpr)
    assert any(s[-2:] == (T, T) for s in xla)  # the check sees a T x T array where one exists


def test_splash_attention_equals_xla_per_shard_in_the_pallas_interpreter():
    """The TPU kernel, run by the Pallas interpreter on the CPU, per shard of a data=2 x tensor=2 mesh (rows and
    heads split, as attention.attend runs it under shard_map)."""
    import functools

    q, k, v, _ = _qkv(256, 4, 2, K=16, B=2)
    cfg = small(**{"mesh.data": 2, "mesh.tensor": 2})
    kernel = functools.partial(kernels.splash_attention, block=128, interpret=True)  # two blocks: across-block mask
    mesh = sharding.make_mesh(cfg, jax.devices()[:4])
    got = jax.jit(lambda q, k, v: attention._per_shard(kernel, q, k, v, 0.3, mesh))(q, k, v)
    assert got.sharding.spec[:3] == ("data", None, "tensor")
    np.testing.assert_allclose(got, kernels.xla_attention(q, k, v, 0.3), rtol=1e-5, atol=1e-5)


def test_auto_picks_the_backends_kernel():
    bf16 = small(**{"model.dtype": "bfloat16"})
    assert attention.choose(bf16, "nvidia") == "cudnn"
    assert attention.choose(small(), "nvidia") == "xla"  # cuDNN needs bfloat16 operands
    assert attention.choose(small(**{"data.seq_len": 128}), "tpu") == "splash"
    assert attention.choose(bf16, "cpu") == attention.choose(bf16, "gpu") == "xla"
    assert attention.platform_of(one_device_mesh(bf16)) == "cpu"


def test_capture_keeps_the_attention_logit_stats_with_chunked_attention():
    cfg = small(**{"model.attention_impl": "chunked", "model.attention_chunk_size": 8})
    model = transformer.ModelDef(cfg)
    params = model.init(0)
    tokens = tokens_for(cfg, batch=2)[:, :-1]
    capture = ("stats",)
    stats = jax.jit(lambda p, t: model.forward(p, t, capture=capture).captured["stats"])(params, tokens)
    plain = transformer.ModelDef(small())
    want = jax.jit(lambda p, t: plain.forward(p, t, capture=capture).captured["stats"])(params, tokens)
    np.testing.assert_allclose(stats["layers"]["attn_logits"], want["layers"]["attn_logits"], rtol=1e-6)
    np.testing.assert_allclose(stats["layers"]["attn_mix"], want["layers"]["attn_mix"], rtol=1e-5)


# -- chunked cross-entropy ------------------------------------------------------------------------------------------


def test_chunked_readout_loss_equals_the_full_one():
    ks = jax.random.split(jax.random.key(1), 3)
    x, w = jax.random.normal(ks[0], (4, 32, 16)), 0.3 * jax.random.normal(ks[1], (16, 50))
    t = jax.random.randint(ks[2], (4, 32), 0, 50)

    def loss(x, w, chunk):
        out = transformer.readout_loss(x, w, t, 0.7, Matmul(), chunk)
        return out["ce"] + 0.1 * out["z_loss"], out

    value_and_grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True), static_argnums=2)
    (full, parts), grads = value_and_grad(x, w, 0)
    logits = 0.7 * jnp.einsum("btd,dv->btv", x, w)
    np.testing.assert_allclose(parts["ce"], step_lib.cross_entropy(logits, t), rtol=1e-6)  # as before the chunks
    (got, _), got_grads = value_and_grad(x, w, 8)
    np.testing.assert_allclose(got, full, rtol=1e-6)
    assert_trees_close(got_grads, grads, rtol=1e-6, atol=1e-8)


def test_chunked_loss_in_the_model_equals_the_full_one():
    over = {"model.output_z_loss": 1e-3}
    (loss, grads), params = loss_and_grads(small(**over))
    (c_loss, c_grads), _ = loss_and_grads(small(**over, **{"model.loss_chunk_size": 4}), params)
    np.testing.assert_allclose(c_loss, loss, rtol=1e-6)
    assert_trees_close(c_grads, grads, rtol=1e-6, atol=1e-8)


# -- remat policies -------------------------------------------------------------------------------------------------


def test_every_remat_policy_gives_the_same_loss_and_gradients():
    (loss, grads), params = loss_and_grads(small())
    for policy in ("full", "dots", "dots_no_batch", "save_attn_out", "offload"):
        (r_loss, r_grads), _ = loss_and_grads(small(**{"model.remat": policy}), params)
        np.testing.assert_allclose(r_loss, loss, rtol=1e-6, err_msg=policy)
        assert_trees_close(r_grads, grads, rtol=1e-5, atol=1e-8)
    # offload: the saved values go to host memory (on CPU that is the device's own memory, so only the jaxpr shows it)
    cfg = small(**{"model.remat": "offload"})
    setup = step_lib.Setup.build(cfg, one_device_mesh(cfg))
    jaxpr = jax.make_jaxpr(jax.grad(lambda p, t: setup.loss_and_aux(p, t)[0]))(params, tokens_for(cfg))
    assert "<host>" in str(jaxpr)


def test_remat_booleans_of_older_configs_still_work():
    assert small(**{"model.remat": True}).model.remat == "full"
    assert small(**{"model.remat": False}).model.remat == "none"
    cfg = config_lib.load(os.path.join(ROOT, "configs", "tiny.py"))
    config_lib.override(cfg, "model.remat", "true")
    assert config_lib.resolve(cfg).model.remat == "full"


# -- gradient accumulation ------------------------------------------------------------------------------------------


def test_microbatches_equal_one_big_batch():
    """The train step's gradients (what the optimizer gets) and loss: 4 slices of 4 = one batch of 16."""

    def grads(cfg, params, tokens):
        setup = step_lib.Setup.build(cfg, one_device_mesh(cfg))
        return jax.jit(setup._gradients)(params, setup.global_batch(np.asarray(tokens)), None)

    big = small(**{"train.batch_size": 16})
    params, tokens = transformer.ModelDef(big).init(0), tokens_for(big)
    loss, want, _ = grads(big, params, tokens)
    got_loss, got, _ = grads(small(**{"train.batch_size": 16, "train.microbatches": 4}), params, tokens)
    np.testing.assert_allclose(got_loss, loss, rtol=1e-5)
    assert_trees_close(got, want, rtol=1e-5, atol=1e-7)


def test_microbatches_route_moe_bias_by_the_whole_batchs_load():
    """The routing-bias update follows the load of the whole batch: the mean of the slices' loads."""
    cfg = small(**{"model.moe.num_experts": 4, "train.batch_size": 8})
    params, tokens = transformer.ModelDef(cfg).init(0), tokens_for(cfg)
    loads = []
    for k in (1, 2):
        setup = step_lib.Setup.build(
            small(**{"model.moe.num_experts": 4, "train.batch_size": 8, "train.microbatches": k}), one_device_mesh(cfg)
        )
        bias = jnp.zeros(setup.moe_bias_shape)
        loads.append(
            jax.jit(setup._gradients)(params, setup.global_batch(np.asarray(tokens)), bias)[2]["moe"]["moe_load"]
        )
    np.testing.assert_allclose(loads[1], loads[0], rtol=1e-6)


# -- mixed precision ------------------------------------------------------------------------------------------------


def test_bfloat16_training_keeps_float32_params_and_optimizer_state(tmp_path):
    cfg = small(**{"model.dtype": "bfloat16"})
    setup = step_lib.Setup.build(cfg, one_device_mesh(cfg))
    state, metrics = setup.train_step(setup.init_state(), setup.global_batch(np.asarray(tokens_for(cfg))))
    assert np.isfinite(float(metrics["train/loss"]))
    for leaf in jax.tree.leaves(state["params"]) + jax.tree.leaves(state["opt_state"]):
        assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype
    ckpt = ckpt_lib.Checkpointer(str(tmp_path), cfg, background=False)

    class Position:
        def get_state(self):
            return {"next_index": 0}

    ckpt.save(2, state, Position(), cfg)
    ckpt.close()
    saved = ocp.StandardCheckpointer().metadata(str(tmp_path / "2" / "state")).item_metadata.tree
    dtypes = {str(np.dtype(m.dtype)) for m in jax.tree.leaves(saved["params"])}
    assert dtypes == {"float32"}, dtypes


# -- refusals -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "over,field",
    [
        ({"model.attention_impl": "flash"}, "model.attention_impl"),
        ({"model.attention_impl": "chunked", "model.attention_chunk_size": 12}, "model.attention_chunk_size"),
        ({"model.loss_chunk_size": 12}, "model.loss_chunk_size"),
        ({"train.microbatches": 3}, "train.microbatches"),
        ({"model.remat": "sometimes"}, "model.remat"),
    ],
)
def test_bad_values_are_one_line_config_errors(over, field):
    with pytest.raises(ConfigError) as e:
        small(**over)
    assert field in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "over,field",
    [
        ({"model.attention_impl": "cudnn", "model.dtype": "bfloat16"}, "model.attention_impl=cudnn"),
        ({"model.attention_impl": "splash", "data.seq_len": 128}, "model.attention_impl=splash"),
        ({"train.batch_size": 16, "train.microbatches": 4, "mesh.data": 8}, "train.microbatches=4"),
    ],
)
def test_what_this_backend_cannot_run_is_refused_at_build(over, field):
    cfg = small(**over)
    with pytest.raises(ConfigError) as e:
        step_lib.Setup.build(cfg, sharding.make_mesh(cfg, jax.devices()[: cfg.mesh.data]))
    assert field in str(e.value) and "\n" not in str(e.value)


# -- launchers and the device benchmark -----------------------------------------------------------------------------


def test_launcher_xla_flags_come_first_so_the_users_win(monkeypatch):
    env = launch_common.xla_env("gpu", {"XLA_FLAGS": "--xla_gpu_enable_latency_hiding_scheduler=false"})
    flags = env["XLA_FLAGS"].split()
    assert flags[0] == "--xla_gpu_enable_latency_hiding_scheduler=true"
    assert flags[-1] == "--xla_gpu_enable_latency_hiding_scheduler=false"  # XLA keeps the last one
    assert "LIBTPU_INIT_ARGS" in launch_common.xla_env("tpu", {}) and launch_common.xla_env("cpu", {}) == {}
    script = launch_common.sbatch_script(["python", "x.py"], nodes=1, gpus_per_node=8)
    assert 'export XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true' in script
    assert "${XLA_FLAGS:+ $XLA_FLAGS}" in script
    manifest = launch_common.k8s_manifest(["python", "x.py"], "job", "img", 2, gpus_per_process=8)
    names = [e["name"] for e in manifest["items"][1]["spec"]["template"]["spec"]["containers"][0]["env"]]
    assert "XLA_FLAGS" in names
    monkeypatch.setenv("MAXSCALE_XLA_DEFAULTS", "0")
    assert launch_common.xla_env("gpu") == {} and "XLA_FLAGS" not in launch_common.sbatch_script(["x"], 1, 8)


def test_device_bench_parses_its_arguments_and_builds_valid_configs():
    from maxscale.tools import device_bench as bench  # tools/device_bench.py is its shim

    args = bench.parse_args(["--models=dense", "--steps=3", "--peak_tflops=989", "--out=/tmp/x.json"])
    assert (args.models, args.steps, args.out) == (["dense"], 3, "/tmp/x.json")
    for name in ("dense", "moe"):
        cfg = config_lib.resolve(bench.model_config(name, bench.parse_args([])))
        m = cfg.model
        assert (m.dtype, m.param_dtype, m.attention_impl) == ("bfloat16", "float32", "cudnn")
        assert m.loss_chunk_size and cfg.data.seq_len % m.loss_chunk_size == 0
    dense = config_lib.resolve(bench.model_config("dense", bench.parse_args([])))
    assert 0.9e9 < transformer.count_params(dense)["total"] < 1.6e9
    with pytest.raises(SystemExit):
        bench.parse_args(["--models=huge"])
