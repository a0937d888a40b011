"""The config schema: every field a run can set, declared once with its default, a one-line doc, its choices or
range, and its kinds. `maxscale.config` loads, overrides and validates against it (`config.resolve`).

Kinds say what a field is to the tools, so that a new field is sorted into every list by being declared:
  id      part of the run id (tools/sweep.py): it changes what a run computes. Fields without it (logging, mesh,
          checkpointing) are UNHASHED_FIELDS, also the fields a reused sweep result may differ in
  resume  may change between a run and its restart (RESUMABLE_FIELDS, train/loop.py); every other field must match
  pack    may differ between the members of one vectorized program (PACKABLE_FIELDS, train/vectorized.py)
The derived lists name a whole section where every field of it has the kind (so a field written before one was
removed, or after one was added, is covered too). Choice names are declared here and nowhere else in the config:
tests/test_schema.py asserts that they equal the keys of the tables that implement them (the config sits below
the model and the trainer and cannot import them). Sizes of 0 mean 'derive from the other fields'; the rules that
derive them, and the checks that relate several fields, live in `maxscale.config.resolve`.

A row of the table is (name, default, spec, doc); spec holds space-separated tokens: a range (">0", ">=0", ">1",
">=1" or an interval "[0,1)"), `or=V` (a value accepted besides the range: -1 = the parameterization's own, 0 =
off), choices ("swiglu|gelu") and kinds ("resume", "pack"; "-id" leaves the field out of the run id).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import ml_collections

ID, RESUME, PACK = "id", "resume", "pack"


@dataclasses.dataclass(frozen=True)
class Field:
    """One config field (see the module doc)."""

    name: str  # dotted: "model.moe.num_experts"
    default: Any
    doc: str
    choices: tuple[str, ...] = ()
    check: str = ""  # ">0", ">=0", ">1", ">=1" or an interval "[0,1)"
    allow: Any = None  # accepted besides the range
    kinds: frozenset = frozenset({ID})

    def problem(self, value) -> str | None:
        """None for a valid value, else the one-line message naming the field and the fix."""
        if self.choices:
            if value in self.choices:
                return None
            return f"{self.name}={value!r} is not supported; choose one of {', '.join(self.choices)}"
        numeric = isinstance(self.default, (int, float)) and not isinstance(self.default, bool)
        if numeric and isinstance(value, (int, float)) and not isinstance(value, bool):
            too_big = _size_problem(self.name, value, isinstance(self.default, int))
            if too_big:
                return too_big
        if not self.check or (self.allow is not None and value == self.allow):
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{self.name}={value!r} must be a number ({self.doc})"
        if _in_range(self.check, value):
            return None
        hint = HINTS.get(self.name, "")
        if self.check == ">0" and isinstance(self.default, int):  # a size or a count
            return f"{self.name}={value} must be positive; " + (hint or f"set --config.{self.name} to a value > 0")
        if self.check == ">=0":
            return f"{self.name}={value} must be >= 0 ({hint or '0 means derived/off'})"
        rule = f"be {self.check[:-1]} {self.check[-1]}" if self.check[0] == ">" else f"lie in {_spaced(self.check)}"
        return f"{self.name}={value} must {rule}" + (f" ({hint})" if hint else "")


def _size_problem(name: str, value: int | float, integer: bool) -> str | None:
    """Non-finite numbers, and integers no array, seed or step counter can hold, are refused for every numeric
    field (checked or not): they would otherwise pass a range check and fail later with a traceback."""
    if not math.isfinite(value):
        return f"{name}={value} must be a finite number"
    limit = WIDE_INTS.get(name, INT_LIMIT)
    if integer and abs(value) >= limit:
        return f"{name}={value} is too large; it must be below {limit} in absolute value"
    return None


def _spaced(interval: str) -> str:
    return interval.replace(",", ", ")


def _in_range(check: str, v) -> bool:
    if check[0] == ">":
        bound = float(check.lstrip(">="))
        return v >= bound if check.startswith(">=") else v > bound
    lo, hi = (float(x) for x in check[1:-1].split(","))
    return (lo <= v if check[0] == "[" else lo < v) and (v <= hi if check[-1] == "]" else v < hi)


def _section(prefix: str, rows: list[tuple]) -> list[Field]:
    """Fields from (name, default, spec, doc) rows."""
    out = []
    for name, default, spec, doc in rows:
        opts: dict = {"kinds": {ID}}
        for token in spec.split():
            if token[0] in ">[(":
                opts["check"] = token
            elif token.startswith("or="):
                opts["allow"] = json.loads(token[3:])
            elif "|" in token:
                opts["choices"] = tuple(token.split("|"))
            elif token == "-id":
                opts["kinds"].discard(ID)
            else:
                assert token in (RESUME, PACK), token
                opts["kinds"].add(token)
        out.append(Field(f"{prefix}.{name}", default, doc, **{**opts, "kinds": frozenset(opts["kinds"])}))
    return out


MESH_AXES = ("data", "fsdp", "tensor", "expert")
HINTS = {  # said after a bad value where the rule alone does not say what to do
    "optimizer.grad_clip_ratio": "clip at ratio x running norm",
    "train.spike_factor": "a multiple of the running mean loss; 0 turns spike logging off",
    "parameterization.depth_alpha": "or -1 for the parameterization's own",
    "parameterization.attn_exponent": "or -1 for the parameterization's own",
    **{f"mesh.{a}": "-1 fills the remaining devices" for a in MESH_AXES},
    **{f"mesh.dcn_{a}": "1 = the axis stays inside one slice" for a in MESH_AXES},
    "data.seed": "a seed is an integer in [0, 2**31)",
    "train.seed": "a seed is an integer in [0, 2**31)",
}
INT_LIMIT = 2**31  # integer fields stay below this (seeds, sizes, counts: what int32 and numpy's seeding take)
WIDE_INTS = {"data.max_bytes": 2**53}  # byte counts may exceed it
GRANULARITY = "per_tensor|per_channel|per_token|per_block"
FORMAT = "none | int<b> (b = 2..16) | e<x>m<y> (1+x+y = 3..16 bits), checked by quant/config.py"
RUN = "-id resume"  # may change on restart and does not change the numbers

_FIELDS = [
    *_section(
        "model",
        [
            ("width", 256, ">0", "d_model"),
            ("depth", 4, ">0", "number of transformer blocks"),
            ("num_heads", 4, ">0", "query heads"),
            ("num_kv_heads", 0, ">=0", "grouped-query attention; 0 = num_heads"),
            ("head_dim", 0, ">=0", "0 = width // num_heads"),
            ("ffn_size", 0, ">=0", "0 = 4 * width (gelu) or 8/3 * width rounded up to a multiple of 64 (swiglu)"),
            ("vocab_size", 256, ">=0", ">= the tokenizer's and a token file's; 0 = data.tokenizer's, padded to 128"),
            ("mlp", "swiglu", "swiglu|gelu", "the MLP of dense blocks and experts"),
            ("norm", "rmsnorm", "rmsnorm|layernorm", "the normalization"),
            ("norm_eps", 1e-6, ">0", "epsilon of the norms"),
            ("tie_embeddings", False, "", "the readout is the embedding table"),
            ("qk_norm", False, "", "normalize queries and keys per head"),
            ("rope_theta", 10_000.0, ">0", "rotary embedding base"),
            ("dtype", "float32", "float32|bfloat16", "compute dtype (weights, optimizer state and loss stay f32)"),
            ("param_dtype", "float32", "float32|bfloat16", "dtype the weights are stored in"),
            (
                "remat",
                "none",
                "none|full|dots|dots_no_batch|save_attn_out|offload -id resume",
                "what the backward pass recomputes per block (docs/performance.md); true/false = full/none",
            ),
            (
                "attention_impl",
                "auto",
                "auto|xla|chunked|cudnn|splash|explicit",
                "auto: cudnn (NVIDIA GPU, bfloat16), splash (TPU), else xla (docs/performance.md)",
            ),
            ("attention_chunk_size", 512, ">0", "chunked attention: positions per block (a divisor of data.seq_len)"),
            ("loss_chunk_size", 0, ">=0", "readout + loss over chunks of this many positions; 0 = at once"),
            ("output_z_loss", 0.0, ">=0", "weight of the output z-loss, mean log(Z)^2 of the readout; 0 = off"),
        ],
    ),
    # Mixture of experts (maxscale/model/moe.py, docs/moe.md); num_experts=0 is a dense model.
    *_section(
        "model.moe",
        [
            ("num_experts", 0, ">=0", "E routed experts per MoE block; 0 = a dense model"),
            ("num_active", 2, ">=0", "k experts per token"),
            ("expert_ffn_size", 0, ">=0", "M, hidden size of each expert; 0 = ffn_size // num_active"),
            ("num_shared", 0, ">=0", "shared experts run on every token"),
            ("shared_ffn_size", 0, ">=0", "0 = expert_ffn_size"),
            ("first_dense", 0, ">=0", "the first n blocks keep a dense MLP; the rest are MoE ..."),
            ("every", 1, ">=1", "... every n-th of them: n - 1 dense then one MoE (2 = alternate)"),
            ("score", "sigmoid", "sigmoid|softmax", "router scores: sigmoid (the paper) or softmax"),
            ("combine", "mean_k", "mean_k|renorm", "mean_k: (1/k) sum gate x expert (paper); renorm: gates sum to 1"),
            ("balance", "bias", "bias|aux|none", "bias: routing bias from the load, outside the optimizer; aux loss"),
            ("bias_rule", "linear", "linear|sign", "linear: b -= rate (Load - k/E) (the paper); sign: DeepSeek-V3"),
            ("bias_rate", 0.01, ">=0", "linear: the paper's eta_b"),
            ("aux_loss_weight", 0.01, ">=0", "with balance=aux: weight of the load-balancing loss (1 at balance)"),
            ("z_loss_weight", 0.0, ">=0", "router z-loss weight"),
            ("dispatch", "dropless", "dropless|capacity|dense", "dropless (exact), capacity (drops overflow), dense"),
            (
                "grouped_impl",
                "auto",
                "auto|tiled|tiled_loop|ragged_dot -id resume",
                "dropless's grouped matmuls (all exact); auto: ragged_dot on TPU, tiled_loop on CPU, else tiled",
            ),
            ("capacity_factor", 1.25, ">0", "capacity: slots per expert = ceil(cf k tokens / E); later tokens drop"),
        ],
    ),
    # Rules live in maxscale/parameterization; these are their inputs. Base shapes of 0 = the model's own.
    *_section(
        "parameterization",
        [
            ("name", "sp", "sp|mup|depth_mup|completep", "the rules (parameterization.RULES)"),
            ("depth_alpha", -1.0, "[0,2] or=-1", "branch multiplier m_L^-alpha; -1 = the parameterization's own"),
            ("base_width", 0, ">=0", "base model's width"),
            ("base_depth", 0, ">=0", "base model's depth"),
            ("base_num_heads", 0, ">=0", "base model's heads"),
            ("base_head_dim", 0, ">=0", "base model's head dim"),
            ("base_ffn_size", 0, ">=0", "base model's MLP size"),
            ("init_std", 0.02, ">0 pack", "sigma: base init std of every matrix"),
            ("embed_init_std", 0.0, ">=0 pack", "0 = init_std"),
            ("input_mult", 1.0, "pack", "embedding output multiplier"),
            ("output_mult", 1.0, "pack", "readout multiplier (muP divides it by m_N)"),
            ("attn_mult", 1.0, "pack", "attention logit multiplier"),
            ("attn_exponent", -1.0, "[0,2] or=-1", "logit scale d_head^-exponent; -1 = the parameterization's own"),
            ("zero_init_readout", False, "", "the readout starts at zero"),
            ("zero_init_query", False, "", "the query projection starts at zero"),
            ("scale_eps", True, "", "muP-family eps scaling (CompleteP Table 1); off = the same eps everywhere"),
            ("eps_depth_scope", "blocks", "blocks|all", "eps x m_L^-alpha on blocks (CompleteP) or all (nanoGPT)"),
            ("width_grows", "head_dim", "head_dim|heads", "scale_shapes(): head_dim (fixed heads) or heads"),
            ("base_num_experts", 0, ">=0", "MoE base shapes (0 = the model's own); k/E must match the base's"),
            ("base_num_active", 0, ">=0", "base model's k"),
            ("base_expert_ffn_size", 0, ">=0", "base model's expert size"),
            ("router_init_gamma", 1.0, "", "router init std x (D/D0)^-gamma under muP-family rules (paper: 1)"),
            ("expert_init_counts_experts", False, "", "control: expert init x (E/E0)^-1/2 (MaxText's fan-in)"),
            ("expert_down_init", "mean_field", "mean_field|fan_in", "mean_field (the paper) or fan_in (muP control)"),
            ("check_kappa", True, "", "refuse k/E unlike the base's: hyperparameters do not transfer across k/E"),
        ],
    ),
    # Quantized training (maxscale/quant).
    *_section(
        "quant",
        [
            ("weights", "none", "pack", f"P_w: matmul weights (straight-through gradient): {FORMAT}"),
            ("activations", "none", "pack", "P_a: matmul inputs"),
            ("kv", "none", "pack", "P_kv: attention keys and values"),
            ("weights_granularity", "per_channel", GRANULARITY, "scale groups of P_w"),
            ("activations_granularity", "per_tensor", GRANULARITY, "scale groups of P_a"),
            ("kv_granularity", "per_token", GRANULARITY, "scale groups of P_kv"),
            ("block_size", 32, ">=1", "per_block: values sharing one scale along the contracted axis"),
            ("whole_attention", False, "", "also quantize queries and attention probabilities at the kv format"),
            ("embeddings", False, "", "quantize the embedding lookup's table too (hidden matrices always are)"),
            ("readout", False, "", "quantize the readout"),
            ("router", False, "", "quantize the MoE router"),
            ("asymmetric", False, "", "integer formats: min/max with a zero point instead of symmetric absmax"),
            ("stochastic", False, "", "stochastic rounding (integer formats)"),
        ],
    ),
    *_section(
        "optimizer",
        [
            ("lr", 3e-3, ">0 pack", "peak learning rate"),
            ("b1", 0.9, "[0,1) pack", "Adam beta1"),
            ("b2", 0.95, "[0,1) pack", "Adam beta2"),
            ("eps", 1e-8, ">0 pack", "Adam epsilon"),
            ("weight_decay", 0.0, ">=0 pack", "decay rate"),
            ("weight_decay_mode", "coupled", "coupled|independent", "coupled: p -= lr*wd*p; independent: sched*wd*p"),
            ("grad_clip", 1.0, ">=0", "global mode: clip the global gradient norm at this; 0 = no clipping at all"),
            (
                "grad_clip_mode",
                "auto",
                "auto|global|relative",
                "relative: x the running norm; auto: SP global, else rel",
            ),
            ("grad_clip_ratio", 2.0, ">1", "relative mode: clip at this x the running mean norm"),
        ],
    ),
    *_section(
        "schedule",
        [
            ("name", "cosine", "constant|cosine|wsd|power", "LR schedule (train/optim.py SCHEDULES)"),
            ("warmup_steps", 0, ">=0", "linear warmup steps"),
            ("final_lr_fraction", 0.1, "[0,1]", "cosine and wsd end at lr * this"),
            ("decay_fraction", 0.2, "[0,1]", "wsd: the last fraction of steps decays linearly"),
            ("power_t0", 100.0, ">0", "power: eta0 * (1 + t/t0)^-chi * (1 - t/T)^delta"),
            ("power_chi", 0.5, "", "power: chi"),
            ("power_delta", 0.0, "", "power: delta"),
        ],
    ),
    *_section(
        "data",
        [
            ("source", "stdlib", "", "stdlib | text file, glob or directory | token file from tools/prepare_data.py"),
            ("seq_len", 128, ">0", "positions per sequence"),
            ("seed", 0, ">=0 pack", "document order and batches"),
            ("eval_fraction", 0.02, "(0,1)", "share of documents held out for eval"),
            ("max_bytes", 0, ">=0", "caps the corpus read; 0 = no limit"),
            ("tokenizer", "byte", "", "byte | tiktoken:<enc> | sentencepiece:<file> | hf:<tokenizer.json>"),
        ],
    ),
    # Writers beside metrics.jsonl and TensorBoard (maxscale/train/metrics.py).
    *_section(
        "metrics",
        [
            ("wandb_project", "", "resume", '"" = no Weights & Biases; else log there (needs `pip install wandb`)'),
            ("wandb_mode", "offline", "offline|online resume", "offline: files under <workdir>/wandb; online"),
        ],
    ),
    *_section(
        "train",
        [
            ("batch_size", 16, ">0", "global, in sequences"),
            ("microbatches", 1, ">0", "gradient accumulation: the batch as this many slices, one optimizer step"),
            ("steps", 1000, ">0 resume", "optimizer steps"),
            ("seed", 0, ">=0 pack", "initialization"),
            ("eval_every", 200, ">0 resume", "steps between evals"),
            ("eval_steps", 4, ">=0 resume", "batches per eval"),
            ("log_every", 10, f">0 {RUN}", "steps between logged metrics"),
            ("dyn_every", 0, "resume", "training-dynamics metrics (dyn/, docs/analysis.md) every n steps; 0 = off"),
            ("sample_tokens", 200, f">=0 {RUN}", "generated at the end of the run; 0 = none"),
            ("sample_prompt", "def ", RUN, "prompt of that sample"),
            ("peak_flops", 0.0, f">=0 {RUN}", "per-device peak for MFU; 0 = known table, else measured at start"),
            (
                "nan_policy",
                "stop",
                "stop|skip resume",
                "non-finite loss: stop (last good checkpoint) or skip the update",
            ),
            ("spike_factor", 2.0, ">1 or=0 resume", "log a loss spike above this x the running mean loss; 0 = off"),
            ("preempt_grace_s", 0.0, ">=0 resume", "after SIGTERM/SIGINT, exit within this many seconds; 0 = no limit"),
            ("debug_nan_at_step", 0, ">=0 resume", "for tests: make the loss and gradients of this step NaN; 0 = off"),
        ],
    ),
    # Two tiers (train/checkpoint_tiers.py, docs/reliability.md): persistent <workdir>/checkpoints, and an optional
    # frequent local one (e.g. node-local disk) that restores first when it is newer and intact.
    *_section(
        "checkpoint",
        [
            ("every", 500, f">0 {RUN}", "persistent tier; also at the end, on preemption and at each keep_steps"),
            ("max_to_keep", 3, f">0 {RUN}", "rolling persistent steps, besides keep_steps"),
            ("keep_steps", (), RUN, "steps kept in the persistent tier (analysis); CLI: =10,100,1000"),
            ("local_every", 0, f">=0 {RUN}", "local tier, at steps that are not persistent saves; 0 = off"),
            ("local_dir", "", RUN, '"" = <workdir>/checkpoints_local; node-local paths need one process'),
            ("local_max_to_keep", 2, f">0 {RUN}", "rolling local steps"),
            ("async_save", True, RUN, "write checkpoints in the background"),
            ("verify", True, RUN, "check each file's CRC-32 against the checkpoint's manifest before restoring"),
        ],
    ),
    # Axis sizes in devices; -1 fills the rest. dcn_<axis>: how many slices (hosts joined by the data-centre
    # network) that axis spans, a divisor of its size (docs/sharding.md). members, member_batch: vectorized packs.
    *_section(
        "mesh",
        [
            ("data", -1, f">0 or=-1 {RUN}", "data-parallel devices"),
            ("fsdp", 1, f">0 or=-1 {RUN}", "fully sharded data-parallel devices"),
            ("tensor", 1, f">0 or=-1 {RUN}", "tensor-parallel devices"),
            ("expert", 1, f">0 or=-1 {RUN}", "expert-parallel devices"),
            ("dcn_data", 1, f">=1 {RUN}", "slices the data axis spans"),
            ("dcn_fsdp", 1, f">=1 {RUN}", "slices the fsdp axis spans"),
            ("dcn_tensor", 1, f">=1 {RUN}", "slices the tensor axis spans"),
            ("dcn_expert", 1, f">=1 {RUN}", "slices the expert axis spans"),
            ("members", 1, RUN, "packs: the member axis split over this many device groups (1 = none)"),
            ("member_batch", 0, RUN, "members a pack's step computes side by side; 0 = auto"),
        ],
    ),
    *_section(
        "distributed",
        [
            ("coordinator_address", "", RUN, "jax.distributed coordinator (parallel/distributed.py)"),
            ("num_processes", 0, RUN, "0 = from the environment"),
            ("process_id", -1, RUN, "-1 = from the environment"),
            ("local_device_ids", "", RUN, "comma-separated; '' = all"),
        ],
    ),
]
FIELDS: tuple[Field, ...] = tuple(_FIELDS)
BY_NAME = {f.name: f for f in FIELDS}
CHOICES = {f.name: f.choices for f in FIELDS if f.choices}

# Fields no longer declared, with the only value they ever took effect with: a config (an old config.json) that
# carries one at that value loads, resumes and keeps its run id; any other value is refused (config.resolve).
REMOVED = {"optimizer.name": "adamw"}  # was validated to be adamw and never read


def _derived(kind: str, has: bool = True) -> tuple[str, ...]:
    """The fields with (`has`) or without a kind, a section by its name when every field in it qualifies."""
    out = []
    for f in FIELDS:
        if (kind in f.kinds) != has:
            continue
        parts = f.name.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            inside = [g for g in FIELDS if g.name == prefix or g.name.startswith(prefix + ".")]
            if all((kind in g.kinds) == has for g in inside):
                break
        if prefix not in out:
            out.append(prefix)
    return tuple(out)


RESUMABLE_FIELDS = _derived(RESUME)  # may differ from the run in the workdir (train/loop.py)
UNHASHED_FIELDS = _derived(ID, has=False)  # left out of the run id (tools/sweep.py)
PACKABLE_FIELDS = _derived(PACK)  # may differ inside a vectorized pack (train/vectorized.py)


def defaults() -> ml_collections.ConfigDict:
    """Every field a run can set, with its default. Sizes of 0 mean 'derive from the other fields'."""
    tree: dict = {}
    for f in FIELDS:
        *sections, leaf = f.name.split(".")
        node = tree
        for s in sections:
            node = node.setdefault(s, {})
        node[leaf] = f.default
    # model.remat also takes true/false (configs before the policies existed), so its type is open
    tree["model"]["remat"] = ml_collections.FieldReference("none", field_type=object)
    return ml_collections.ConfigDict(tree)
