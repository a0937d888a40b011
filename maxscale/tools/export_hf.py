"""Exports a run's checkpoint as a Hugging Face transformers model, and `python tools/export_hf.py`.

  python tools/export_hf.py --run=DIR [--step=S] --out=DIR [--dtype=float32|bfloat16]

Writes OUT/config.json and OUT/model.safetensors for LlamaForCausalLM (Qwen3ForCausalLM when model.qk_norm: the same
block with RMSNorm on each query and key head; Glm4Moe, Qwen3-MoE or Mixtral for MoE runs, below), and the
tokenizer's files beside them, so that `AutoModelForCausalLM.from_pretrained(OUT)` computes the logits maxscale
computes (tests check it to rtol 1e-4). tools/import_hf.py is the inverse (maxscale/tools/import_hf.py).
Every forward multiplier of the parameterization is folded into the weights:
  input multiplier      -> the embedding table (and 1/input_mult into the final norm's gain when tied)
  residual multiplier   -> o_proj and down_proj (each branch's last matrix)
  attention scale       -> q_proj, or the query norm's gain with qk_norm: HF scales logits by head_dim^-1/2, so
                           the query is multiplied by attn_scale * head_dim^1/2 (muP's 1/d, attn_mult, ...)
  output multiplier     -> lm_head (untied) or the final norm's gain (tied: the table stays shared)
Norm gains are the model's own (they start at one and multiply), rms_norm_eps is model.norm_eps, rope_theta is
model.rope_theta, and both rotate halves of each head (HF's rotate_half). MoE runs (maxscale/tools/hf_moe.py) become
Glm4MoeForCausalLM (score=sigmoid: the routing bias as e_score_correction_bias, which only selects; mean_k as
routed_scaling_factor 1/k; shared experts; first_dense; every=1), Qwen3MoeForCausalLM (score=softmax with qk_norm,
any layout) or MixtralForCausalLM (softmax, renorm, every block MoE), in the hub's per-expert layout, the residual
multiplier in each down projection. They compute every token-expert pair, so they equal maxscale's dropless (or
dense) dispatch, and capacity dispatch whenever no pair is dropped. Refused in one line, naming the field: what none
expresses (hf_moe.architecture), GELU MLPs and LayerNorm. Tokenizer files: hf -> tokenizer.json +
tokenizer_config.json; sentencepiece -> tokenizer.model; tiktoken -> tokenizer.json via transformers' converter (if
installed); byte -> a byte-level tokenizer.json whose ids are the UTF-8 bytes (end of document: id 0). docs/data.md:
lm-evaluation-harness usage.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct

import numpy as np

from maxscale import cli
from maxscale.errors import ConfigError
from maxscale.parameterization import Parameterization
from maxscale.quant import calibrate
from maxscale.tools import hf_moe
from maxscale.train import tokenizers as tok_lib

DTYPES = {"float32": "F32", "bfloat16": "BF16"}


def architecture(cfg) -> str:
    """The transformers model_type that computes this run's function exactly (llama, qwen3, or an MoE one of
    hf_moe.ARCHS); ConfigError (one line, naming the field) when there is none."""
    m = cfg.model
    for ok, what in (
        (m.mlp == "swiglu", f"model.mlp={m.mlp} (transformers' Llama-family blocks are SwiGLU)"),
        (m.norm == "rmsnorm", f"model.norm={m.norm} (transformers' Llama-family blocks use RMSNorm)"),
    ):
        if not ok:
            raise ConfigError(f"this run cannot be exported to transformers: {what}")
    if m.moe.num_experts:
        return hf_moe.architecture(cfg)
    return "qwen3" if m.qk_norm else "llama"


def check_exportable(cfg) -> None:
    """ConfigError (one line, naming the field) unless some transformers architecture computes the run's function."""
    architecture(cfg)


def hf_config(cfg, tok) -> dict:
    m = cfg.model
    model_type = architecture(cfg)
    arch = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", **hf_moe.ARCHS}[model_type]
    rope = {"rope_type": "default", "rope_theta": m.rope_theta}
    if model_type == "glm4_moe":
        rope["partial_rotary_factor"] = 1.0  # Glm4Moe rotates half of each head unless told otherwise
    config = {
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": m.vocab_size,
        "hidden_size": m.width,
        "intermediate_size": m.ffn_size,
        "num_hidden_layers": m.depth,
        "num_attention_heads": m.num_heads,
        "num_key_value_heads": m.num_kv_heads,
        "head_dim": m.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.data.seq_len,
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,
        "rope_parameters": rope,
        "tie_word_embeddings": bool(m.tie_embeddings),
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "bos_token_id": int(tok.eos_id),  # documents follow an end of document in training
        "eos_token_id": int(tok.eos_id),
        "torch_dtype": "float32",
        "use_cache": True,
    }
    if model_type in ("qwen3", "qwen3_moe"):
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=m.depth)
    if model_type == "mixtral":
        del config["attention_bias"], config["mlp_bias"]
    if m.moe.num_experts:
        config.update(hf_moe.config_fields(cfg, model_type))
    return config


def hf_weights(cfg, params: dict, moe_bias=None) -> dict[str, np.ndarray]:
    """{HF name: float32 array} with every forward multiplier folded in (see the module doc); `moe_bias` [L_moe, E]:
    the run's routing bias (Glm4Moe's e_score_correction_bias)."""
    m = cfg.model
    mults = Parameterization(cfg).multipliers()
    D, H, G, K = m.width, m.num_heads, m.num_kv_heads, m.head_dim
    f32 = lambda a: np.asarray(a, np.float32)
    q_fold = mults["attn_scale"] * math.sqrt(K)
    res = mults["residual"]
    embed = f32(params["embed"]) * mults["input"]
    out = {"model.embed_tokens.weight": embed}
    final = f32(params["final_norm"])
    if m.tie_embeddings:
        final = final * (mults["output"] / mults["input"])
    else:
        out["lm_head.weight"] = (f32(params["unembed"]) * mults["output"]).T
    out["model.norm.weight"] = final
    arch = architecture(cfg)
    stacks = {
        k: {n: f32(v) for n, v in params[k].items()} for k in ("blocks", "interleaved", "moe_blocks") if k in params
    }
    for layer, (stack, i) in enumerate(calibrate.depth_order(cfg)):
        pre, b = f"model.layers.{layer}.", stacks[stack]
        wq = b["wq"][i] * (1.0 if m.qk_norm else q_fold)
        out[pre + "input_layernorm.weight"] = b["attn_norm"][i]
        out[pre + "self_attn.q_proj.weight"] = wq.reshape(D, H * K).T
        out[pre + "self_attn.k_proj.weight"] = b["wk"][i].reshape(D, G * K).T
        out[pre + "self_attn.v_proj.weight"] = b["wv"][i].reshape(D, G * K).T
        out[pre + "self_attn.o_proj.weight"] = (b["wo"][i] * res).reshape(H * K, D).T
        if m.qk_norm:  # the norm follows the projection: the scale goes into its gain
            out[pre + "self_attn.q_norm.weight"] = b["q_norm"][i] * q_fold
            out[pre + "self_attn.k_norm.weight"] = b["k_norm"][i]
        out[pre + "post_attention_layernorm.weight"] = b["mlp_norm"][i]
        if stack == "moe_blocks":  # the hub's per-expert layout (transformers 5 fuses the experts when loading it)
            bias_E = None if moe_bias is None else f32(moe_bias)[i]
            out.update({pre + k: v for k, v in hf_moe.layer_weights(cfg, arch, b, i, bias_E, res).items()})
            continue
        out[pre + "mlp.gate_proj.weight"] = b["w_gate"][i].T
        out[pre + "mlp.up_proj.weight"] = b["w_up"][i].T
        out[pre + "mlp.down_proj.weight"] = (b["w_down"][i] * res).T
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def save_safetensors(path: str, tensors: dict[str, np.ndarray], dtype: str = "float32") -> None:
    """The safetensors format (8-byte header size, JSON header, raw little-endian data), written atomically; no
    library needed. bfloat16: rounded to nearest even from float32 (a routing bias stays float32: it picks experts)."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, array in tensors.items():
        kind = "float32" if name.endswith("e_score_correction_bias") else dtype
        if kind == "bfloat16":
            bits = array.astype(np.float32).view(np.uint32)
            blob = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2").tobytes()
        else:
            blob = array.astype("<f4").tobytes()
        span = [offset, offset + len(blob)]
        header[name] = {"dtype": DTYPES[kind], "shape": list(array.shape), "data_offsets": span}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path + ".tmp", "wb") as fh:
        fh.write(struct.pack("<Q", len(text)) + text)
        for blob in blobs:
            fh.write(blob)
    os.replace(path + ".tmp", path)


def _byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character map (what the tokenizers library's ByteLevel pre-tokenizer applies)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), 256)]
    moved = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


def _byte_level_tokenizer(out_dir: str) -> None:
    """A tokenizer.json whose ids are the UTF-8 bytes (a BPE without merges over the 256 byte characters); id 0
    (NUL, as its character U+0100) ends documents, as in training."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    chars = _byte_chars()
    tok = Tokenizer(models.BPE(vocab={c: b for b, c in chars.items()}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    tok_lib.write_hf_config(out_dir, chars[0])


def write_tokenizer(cfg, out_dir: str) -> str:
    """The tokenizer's files beside the model; returns what was written (one phrase)."""
    spec = tok_lib.spec_of(cfg)
    kind, arg = tok_lib.parse(spec)
    tok = tok_lib.get(spec)
    if kind == "hf":
        shutil.copyfile(arg, os.path.join(out_dir, "tokenizer.json"))
        tok_lib.write_hf_config(out_dir, tok.eos_token, cfg.data.seq_len)
        return "tokenizer.json"
    if kind == "sentencepiece":
        shutil.copyfile(arg, os.path.join(out_dir, "tokenizer.model"))
        config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False}
        config.update(eos_token=tok.sp.id_to_piece(tok.eos_id), legacy=False, model_max_length=cfg.data.seq_len)
        with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as fh:
            json.dump(config, fh, indent=2)
        return "tokenizer.model (SentencePiece)"
    try:
        if kind == "tiktoken":
            from transformers.integrations.tiktoken import convert_tiktoken_to_fast

            convert_tiktoken_to_fast(tok.enc, out_dir)
            return "tokenizer.json (converted from tiktoken)"
        _byte_level_tokenizer(out_dir)
        return "tokenizer.json (byte level: ids are UTF-8 bytes)"
    except ImportError as e:
        return f"no tokenizer files ({e.name} is not installed; see docs/data.md)"


def load_run(run_dir: str, step: int | None) -> tuple:
    """(resolved config, step, params, MoE routing bias or None) of a kept checkpoint (newest or `step`), dense or
    MoE, on one device; ConfigError (one line) if the run, a checkpoint or the step is missing, or not exportable."""
    from maxscale import config as config_lib
    from maxscale.tools import ptq
    from maxscale.train import checkpoint as ckpt_lib
    from maxscale.train import step as step_lib

    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"--run={run_dir}: no config.json; pass a run directory written by the trainer")
    with open(path) as fh:
        cfg = config_lib.from_json(fh.read())
    check_exportable(cfg)
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    steps = ckpt_lib.committed_steps(ckpt_dir)
    if not steps or (step is not None and step not in steps):
        kept = f"its steps are {steps}" if steps else "there is none"
        raise ConfigError(f"--run={run_dir}: no committed checkpoint{f' at step {step}' if steps else ''}; {kept}")
    build = config_lib.from_json(config_lib.to_json(cfg))
    build.model.attention_impl = "xla"  # reading the state needs its layout only, on this machine's first device
    setup = step_lib.Setup.build(build, ptq.one_device_mesh(build))
    step, state = ckpt_lib.load_state(ckpt_dir, setup.abstract_state(), step)
    return cfg, step, state["params"], state.get("moe_bias")


def export(run_dir: str, out_dir: str, step: int | None = None, dtype: str = "float32") -> dict:
    """Writes the model (see the module doc); returns {step, architecture, tokenizer, parameters}."""
    cfg, step, params, bias = load_run(run_dir, step)
    arch = architecture(cfg)
    if arch != "glm4_moe" and bias is not None and np.any(bias):  # e.g. a bias_rate of 0 never moves it
        raise ConfigError(
            f"this run cannot be exported to transformers: its routing bias is nonzero (max |b| "
            f"{np.abs(bias).max():.3g}, model.moe.balance={cfg.model.moe.balance}) and {arch}'s router has none"
        )
    tok = tok_lib.of_config(cfg)
    os.makedirs(out_dir, exist_ok=True)
    tensors = hf_weights(cfg, params, bias)
    save_safetensors(os.path.join(out_dir, "model.safetensors"), tensors, dtype)
    config = {**hf_config(cfg, tok), "torch_dtype": dtype}
    with open(os.path.join(out_dir, "config.json"), "w") as fh:
        json.dump(config, fh, indent=2)
    written = write_tokenizer(cfg, out_dir)
    n = sum(a.size for a in tensors.values())
    return {"step": step, "architecture": config["architectures"][0], "tokenizer": written, "parameters": n}


@cli.command("export_hf")
def main(argv: list[str]) -> int:
    parser = cli.Parser("export_hf", __doc__)
    parser.add_argument("--run", required=True, help="a run directory (config.json and checkpoints/)")
    parser.add_argument("--out", required=True, help="the output directory")
    parser.add_argument("--step", type=int, default=None, help="a kept checkpoint's step (default: the newest)")
    parser.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    args = parser.parse(argv)
    info = export(args.run, args.out, args.step, args.dtype)
    print(
        f"wrote {args.out}: {info['architecture']} ({info['parameters'] / 1e6:.2f}M parameters, {args.dtype}) from "
        f"step {info['step']}, {info['tokenizer']}"
    )
    return 0
