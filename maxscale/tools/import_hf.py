"""Imports a Hugging Face Llama-family checkpoint as a maxscale workdir, and `python tools/import_hf.py`.

  python tools/import_hf.py --hf=DIR --out=WORKDIR [--config=FILE.py[:arg]] [--config.<section>.<field>=<value> ...]

Reads DIR/config.json and DIR/model.safetensors (or the shards named by model.safetensors.index.json) of a
LlamaForCausalLM, a Qwen3ForCausalLM (the Llama block with RMSNorm on each query and key head), or a mixture of
experts: Glm4MoeForCausalLM (sigmoid routing, its e_score_correction_bias as the run's routing bias, shared experts,
first_k_dense_replace), Qwen3MoeForCausalLM (softmax; mlp_only_layers / decoder_sparse_step as first_dense and every)
or MixtralForCausalLM (tools/hf_moe.py: routed_scaling_factor folded into each expert's down projection; the hub's
per-expert tensors or transformers 5's fused ones), and writes
WORKDIR/config.json, WORKDIR/config.py (a --config file returning the config.json beside it) and an orbax checkpoint
at step 0 in the trainer's format (the imported params, a fresh optimizer state, step 0, the run's RNG and the data
iterator's start), so that
  python -m maxscale.train --config=WORKDIR/config.py --workdir=WORKDIR [--config.train.steps=N ...]
continues training from the checkpoint. It is the inverse of tools/export_hf.py: the same weight layout, rotary
embedding (split halves, rope_theta), GQA, tied or untied embeddings, RMSNorm gains and eps, SwiGLU.

The model fields come from config.json (width, depth, heads, kv heads, head_dim, ffn_size, vocab_size, norm_eps,
tie_embeddings, qk_norm, rope_theta; an MoE's model.moe num_experts, num_active, expert_ffn_size, num_shared,
shared_ffn_size, first_dense, every, score, combine, balance); an override giving a model field another value is
refused. Everything else (data,
optimizer, schedule, train, mesh) is --config's, maxscale's defaults without one. The parameterization is SP with
every multiplier 1 (a Llama checkpoint has none; base shapes are the model's own), whatever --config's file says;
under another one set by --config.parameterization.* its forward multipliers are divided out of the weights, so the
function stays the checkpoint's.
Tokenizer: DIR/tokenizer.json (hf:) or else DIR/tokenizer.model (sentencepiece:) is copied into WORKDIR/tokenizer/
and becomes data.tokenizer, unless --config.data.tokenizer is given.

Refused in one line naming the field: other architectures, hidden_act other than silu, attention or MLP biases,
rope scaling, partial rotary, sliding-window attention, quantized checkpoints, tensors without a maxscale place.
Nothing half-written: everything goes to a temporary directory beside WORKDIR, renamed to WORKDIR at the end;
WORKDIR must not exist yet (or be empty). Needs safetensors (the `hf` extra), not torch. docs/data.md.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time

import jax
import ml_collections
import numpy as np

from maxscale import cli, paths
from maxscale import config as config_lib
from maxscale.errors import ConfigError
from maxscale.parameterization import Parameterization
from maxscale.tools import hf_moe
from maxscale.train import tokenizers as tok_lib

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", **hf_moe.ARCHS}
# model.<field> <- config.json key (None: set below from other keys)
MODEL_FIELDS = {
    "width": "hidden_size",
    "depth": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "ffn_size": "intermediate_size",
    "vocab_size": "vocab_size",
    "norm_eps": "rms_norm_eps",
    "tie_embeddings": "tie_word_embeddings",
    "qk_norm": None,
    "rope_theta": None,
    "mlp": None,
    "norm": None,
}
CONFIG_PY = '''"""Written by tools/import_hf.py: returns the config.json beside this file (the run's resolved config).

  python -m maxscale.train --config=<this file> --workdir=<this directory> [--config.train.steps=N ...]
"""

import os

from maxscale import config


def get_config():
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "config.json")) as fh:
        return config.from_json(fh.read())
'''


def read_hf_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    try:
        with open(path) as fh:
            hf = json.load(fh)
        if not isinstance(hf, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise ConfigError(f"--hf={hf_dir}: no readable config.json ({e}); pass a save_pretrained directory") from None
    return hf


def model_fields(hf: dict) -> dict:
    """{model field: value} of a Llama-family config.json; ConfigError (one line) for what maxscale cannot run."""
    kind = hf.get("model_type")
    rope = hf.get("rope_parameters") or {}
    sliding = hf.get("use_sliding_window", True) and hf.get("sliding_window") is not None
    for bad, what in (
        (kind not in ARCHITECTURES, f"model_type={kind!r} (supported: {', '.join(ARCHITECTURES.values())})"),
        (hf.get("hidden_act", "silu") != "silu", f"hidden_act={hf.get('hidden_act')!r} (SwiGLU blocks use silu)"),
        (bool(hf.get("attention_bias")), "attention_bias=true (maxscale's projections have no biases)"),
        (bool(hf.get("mlp_bias")), "mlp_bias=true (maxscale's MLP has no biases)"),
        (hf.get("rope_scaling") is not None, f"rope_scaling={hf.get('rope_scaling')} (only null is supported)"),
        (rope.get("rope_type", "default") != "default", f"rope_parameters.rope_type={rope.get('rope_type')!r} "
         "(only 'default' is supported: maxscale's rotary embedding has no scaling)"),
        (rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5 if kind == "glm4_moe" else 1.0)) != 1,
         "partial_rotary_factor (only 1.0: every dimension rotates)"),
        (sliding, f"sliding_window={hf.get('sliding_window')} (only full attention is supported)"),
        (any(t != "full_attention" for t in hf.get("layer_types") or []), "layer_types (only full_attention)"),
        (hf.get("quantization_config") is not None, "quantization_config (dequantize the checkpoint first)"),
    ):  # fmt: skip
        if bad:
            raise ConfigError(f"config.json has {what}")
    fields = {k: hf[key] for k, key in MODEL_FIELDS.items() if key and hf.get(key) is not None}
    if kind == "mixtral":  # its intermediate_size is the experts'; no block is dense
        fields["ffn_size"] = hf.get("intermediate_size")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if not isinstance(hf.get(key), int):
            raise ConfigError(f"config.json has no integer {key}")
    fields.setdefault("num_kv_heads", hf["num_attention_heads"])
    fields.setdefault("head_dim", hf["hidden_size"] // hf["num_attention_heads"])
    fields.setdefault("norm_eps", 1e-6)
    fields.setdefault("tie_embeddings", False)
    theta = rope.get("rope_theta", hf.get("rope_theta", 10_000.0))
    qk_norm = kind in ("qwen3", "qwen3_moe") or (kind == "glm4_moe" and bool(hf.get("use_qk_norm")))
    fields.update(qk_norm=qk_norm, rope_theta=float(theta), mlp="swiglu", norm="rmsnorm")
    fields["norm_eps"], fields["tie_embeddings"] = float(fields["norm_eps"]), bool(fields["tie_embeddings"])
    return fields


def read_tensors(hf_dir: str) -> dict[str, np.ndarray]:
    """Every tensor of the checkpoint as a numpy array (one file, or the shards of the index)."""
    import ml_dtypes  # noqa: F401 - registers bfloat16 with numpy, which safetensors' numpy reader needs

    try:
        from safetensors import safe_open
    except ImportError:
        raise ConfigError("import_hf needs safetensors: pip install safetensors (or maxscale[hf])") from None
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as fh:
            files = sorted(set(json.load(fh)["weight_map"].values()))
    elif os.path.isfile(os.path.join(hf_dir, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise ConfigError(
            f"--hf={hf_dir}: no model.safetensors or model.safetensors.index.json (pytorch_model.bin is not read); "
            f"save it with save_pretrained(..., safe_serialization=True)"
        )
    tensors = {}
    for name in files:
        path = os.path.join(hf_dir, name)
        if not os.path.isfile(path):
            raise ConfigError(f"--hf={hf_dir}: the index names {name}, which is missing")
        with safe_open(path, framework="numpy") as fh:
            tensors.update({k: fh.get_tensor(k) for k in fh.keys()})
    return tensors


class Tensors:
    """The checkpoint's tensors, popped as they find their place: `take(name, shape)` (float32, shape checked)."""

    def __init__(self, tensors: dict):
        self.left = dict(tensors)

    def __call__(self, name: str, shape: tuple) -> np.ndarray:
        if name not in self.left:
            raise ConfigError(f"the checkpoint has no tensor {name}, which config.json implies")
        a = np.asarray(self.left.pop(name), np.float32)
        if a.shape != tuple(shape):
            raise ConfigError(f"{name} has shape {list(a.shape)}, config.json implies {list(shape)}")
        return a

    def has(self, name: str) -> bool:
        return name in self.left

    def pop(self, name: str) -> None:
        self.left.pop(name, None)


def _block(cfg, hf: dict, take: Tensors, pre: str, moe: bool, mults: dict) -> tuple[dict, np.ndarray | None]:
    """One block's arrays (and an MoE block's routing bias) from the tensors under `pre` (multipliers divided out)."""
    m = cfg.model
    D, H, G, K, F = m.width, m.num_heads, m.num_kv_heads, m.head_dim, m.ffn_size
    q_fold, res = mults["attn_scale"] * math.sqrt(K), mults["residual"]
    matrix = lambda suffix, rows, cols, *split: take(pre + suffix, (rows, cols)).T.reshape(*split)  # noqa: E731
    b = {
        "attn_norm": take(pre + "input_layernorm.weight", (D,)),
        "wq": matrix("self_attn.q_proj.weight", H * K, D, D, H, K) / (1.0 if m.qk_norm else q_fold),
        "wk": matrix("self_attn.k_proj.weight", G * K, D, D, G, K),
        "wv": matrix("self_attn.v_proj.weight", G * K, D, D, G, K),
        "wo": matrix("self_attn.o_proj.weight", D, H * K, H, K, D) / res,
        "mlp_norm": take(pre + "post_attention_layernorm.weight", (D,)),
    }
    if m.qk_norm:
        b["q_norm"] = take(pre + "self_attn.q_norm.weight", (K,)) / q_fold
        b["k_norm"] = take(pre + "self_attn.k_norm.weight", (K,))
    if moe:
        ff, bias = hf_moe.import_layer(cfg, hf, take, pre, res)
        return {**b, **ff}, bias
    b["w_gate"] = matrix("mlp.gate_proj.weight", F, D, D, F)
    b["w_up"] = matrix("mlp.up_proj.weight", F, D, D, F)
    b["w_down"] = matrix("mlp.down_proj.weight", D, F, F, D) / res
    return b, None


def maxscale_params(cfg: ml_collections.ConfigDict, tensors: dict[str, np.ndarray], hf: dict | None = None) -> tuple:
    """(params tree of `cfg`'s model, MoE routing bias [L_moe, E] or None) from HF tensors: export_hf.hf_weights
    inverted (multipliers divided out)."""
    from maxscale.model import transformer
    from maxscale.quant import calibrate

    m = cfg.model
    hf = hf or {"model_type": "llama"}
    mults = Parameterization(cfg).multipliers()
    D, V = m.width, m.vocab_size
    take = Tensors(tensors)
    stacks: dict = {}
    biases = []
    for layer, (stack, _) in enumerate(calibrate.depth_order(cfg)):
        b, bias = _block(cfg, hf, take, f"model.layers.{layer}.", stack == "moe_blocks", mults)
        stacks.setdefault(stack, []).append(b)
        biases += [] if bias is None else [bias]
    params = {"embed": take("model.embed_tokens.weight", (V, D)) / mults["input"]}
    params.update({k: {n: np.stack([b[n] for b in bs]) for n in bs[0]} for k, bs in stacks.items()})
    final = take("model.norm.weight", (D,))
    if m.tie_embeddings:  # transformers ties lm_head to the table and ignores a stored copy
        take.pop("lm_head.weight")
        params["final_norm"] = final / (mults["output"] / mults["input"])
    else:
        params["final_norm"] = final
        params["unembed"] = take("lm_head.weight", (V, D)).T / mults["output"]
    extra = sorted(k for k in take.left if not k.endswith("rotary_emb.inv_freq"))  # old checkpoints keep the buffer
    if extra:
        raise ConfigError(f"tensor {extra[0]} has no place in a maxscale model (biases are not supported)")
    abstract = transformer.ModelDef(cfg).abstract_params
    if jax.tree.structure(abstract) != jax.tree.structure(params):  # a layout this file does not know: a bug here
        raise ConfigError(f"the model's params {sorted(abstract)} differ from the import's {sorted(params)}")
    params = jax.tree.map(lambda a, s: np.ascontiguousarray(a, dtype=s.dtype), params, abstract)
    if not m.moe.num_experts:
        return params, None
    zeros = np.zeros((len(stacks["moe_blocks"]), m.moe.num_experts), np.float32)  # softmax routers have no bias
    return params, np.stack(biases) if biases else zeros


def build_config(hf: dict, base: str | None, overrides: list[tuple[str, str]]) -> ml_collections.ConfigDict:
    """--config (or the defaults) with the overrides, then the checkpoint's model fields; resolved."""
    cfg = config_lib.load(base) if base else config_lib.defaults()
    config_lib.check_known_fields(cfg)
    with cfg.unlocked():  # SP, multipliers 1, base shapes the model's own; --config.parameterization.* may change it
        cfg.parameterization = config_lib.defaults().parameterization
    for key, value in overrides:
        config_lib.override(cfg, key, value)
    fields = model_fields(hf)
    given = {key.removeprefix("model."): key for key, _ in overrides if key.startswith("model.")}
    for field, value in fields.items():
        if field in given and cfg.model[field] != value:
            raise ConfigError(
                f"--config.{given[field]}={cfg.model[field]} differs from the checkpoint's {value} "
                f"(config.json's {MODEL_FIELDS[field] or field}); model fields come from the checkpoint"
            )
    with cfg.unlocked():
        cfg.model.update(fields)
        cfg.model.moe.num_experts = 0
        for key, value in (hf_moe.import_fields(hf) if hf["model_type"] in hf_moe.ARCHS else {}).items():
            cfg.model.moe[key.removeprefix("model.moe.")] = value
    return config_lib.resolve(cfg)


def _tokenizer_files(hf_dir: str) -> tuple[str, list[str]] | None:
    """(kind, files to copy) of the checkpoint's tokenizer, or None."""
    if os.path.isfile(os.path.join(hf_dir, "tokenizer.json")):
        names = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
        return "hf", [n for n in names if os.path.isfile(os.path.join(hf_dir, n))]
    if os.path.isfile(os.path.join(hf_dir, "tokenizer.model")):
        return "sentencepiece", ["tokenizer.model"]
    return None


def write_checkpoint(cfg: ml_collections.ConfigDict, params: dict, ckpt_dir: str, moe_bias=None) -> None:
    """Step 0 in the trainer's format: state as Setup.init_state builds it, with `params` (and an MoE run's routing
    bias); a fresh data iterator."""
    from maxscale.tools import ptq
    from maxscale.train import checkpoint as ckpt_lib
    from maxscale.train import data as data_lib
    from maxscale.train import step as step_lib

    build = ml_collections.ConfigDict(cfg.to_dict())
    build.model.attention_impl = "xla"  # only the state's layout is needed here, on this machine's first device
    setup = step_lib.Setup.build(build, ptq.one_device_mesh(build))

    def init(p, bias):
        zero = jax.numpy.zeros([], jax.numpy.int32)
        return {
            **({"moe_bias": jax.numpy.asarray(bias, jax.numpy.float32)} if bias is not None else {}),
            "params": p,
            "opt_state": setup.tx.init(p),
            "step": zero,
            "rng": jax.random.key_data(jax.random.key(cfg.train.seed)),
            "nonfinite_steps": zero,
            "last_nonfinite_step": zero,
        }

    state = jax.jit(init, out_shardings=setup.state_shardings)(params, moe_bias)
    expected = jax.eval_shape(setup.init_state)
    same = lambda a, b: a.shape == b.shape and a.dtype == b.dtype
    if jax.tree.structure(state) != jax.tree.structure(expected) or not all(
        jax.tree.leaves(jax.tree.map(same, state, expected))
    ):
        raise ConfigError("the state built differs from the trainer's (a bug in import_hf)")
    T = cfg.data.seq_len
    dummy = data_lib.Corpus(np.zeros(T + 1, np.int32), np.zeros(T + 1, np.int32), cfg.model.vocab_size, "")
    data_iter = iter(data_lib.train_dataset(dummy, cfg))  # its state at the start: the same for any corpus
    ckpt = ckpt_lib.Checkpointer(ckpt_dir, cfg, background=False)
    try:
        ckpt.save(0, state, data_iter, cfg)
    finally:
        ckpt.close()


def import_hf(hf_dir: str, out: str, base: str | None = None, overrides=()) -> dict:
    """Writes the workdir (see the module doc); returns {architecture, parameters, tokenizer, seconds, config}."""
    t0 = time.perf_counter()
    overrides = list(overrides)
    if paths.is_url(out):
        raise ConfigError(f"--out={out}: import writes a local directory; copy it to {out} afterwards")
    out = os.path.abspath(out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ConfigError(f"--out={out} exists and is not empty; choose a new directory")
    problem = paths.writable_dir_problem(os.path.dirname(out))
    if problem:
        raise ConfigError(f"--out={out}: {problem}")
    hf = read_hf_config(hf_dir)
    tokenizer = None if any(k == "data.tokenizer" for k, _ in overrides) else _tokenizer_files(hf_dir)
    if tokenizer is not None:  # the path the copy will have once the workdir is renamed into place
        first = os.path.join(out, "tokenizer", tokenizer[1][0])
        overrides.append(("data.tokenizer", f"{tokenizer[0]}:{first}"))
    cfg = build_config(hf, base, overrides)
    params, moe_bias = maxscale_params(cfg, read_tensors(hf_dir), hf)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.import-", dir=os.path.dirname(out))
    try:
        spec = cfg.data.tokenizer
        if tokenizer is not None:
            os.makedirs(os.path.join(tmp, "tokenizer"))
            for name in tokenizer[1]:
                shutil.copyfile(os.path.join(hf_dir, name), os.path.join(tmp, "tokenizer", name))
            spec = f"{tokenizer[0]}:{os.path.join(tmp, 'tokenizer', tokenizer[1][0])}"
        tok_lib.check_model_vocab(tok_lib.get(spec), cfg.model.vocab_size)
        write_checkpoint(cfg, params, os.path.join(tmp, "checkpoints"), moe_bias)
        paths.write_text_atomic(os.path.join(tmp, "config.json"), config_lib.to_json(cfg))
        paths.write_text_atomic(os.path.join(tmp, "config.py"), CONFIG_PY)
        source = {"hf": os.path.abspath(hf_dir), "architecture": ARCHITECTURES[hf["model_type"]], "config": hf}
        paths.write_text_atomic(os.path.join(tmp, "import_hf.json"), json.dumps(source, indent=2))
        if os.path.isdir(out):
            os.rmdir(out)  # empty (checked above)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    n = sum(a.size for a in jax.tree.leaves(params))
    return {
        "architecture": source["architecture"],
        "parameters": n,
        "tokenizer": cfg.data.tokenizer,
        "seconds": time.perf_counter() - t0,
        "config": cfg,
    }


@cli.command("import_hf")
def main(argv: list[str]) -> int:
    parser = cli.Parser("import_hf", __doc__)
    parser.add_argument("--hf", required=True, help="a save_pretrained directory (config.json, *.safetensors)")
    parser.add_argument("--out", required=True, help="the new workdir")
    parser.add_argument("--config", default=None, help="FILE.py[:arg] for the fields besides the model's")
    args, rest = parser.parse_known_args(argv)  # the config is loaded after the model's fields are read
    for r in rest:
        if not (r.startswith("--config.") and "=" in r):
            parser.error(parser.unknown(r))
    overrides = [tuple(r[len("--config.") :].split("=", 1)) for r in rest]
    info = import_hf(args.hf, args.out, args.config, overrides)
    out = os.path.abspath(args.out)
    print(
        f"wrote {args.out}: {info['architecture']} ({info['parameters'] / 1e6:.2f}M parameters) as a step-0 "
        f"checkpoint, data.tokenizer={info['tokenizer']}, in {info['seconds']:.1f} s; train on with\n"
        f"  python -m maxscale.train --config={out}/config.py --workdir={out} [--config.train.steps=N]"
    )
    return 0
