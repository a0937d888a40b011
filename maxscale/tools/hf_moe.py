"""The mixture-of-experts half of tools/export_hf.py and tools/import_hf.py: which transformers architecture computes
exactly a maxscale MoE run's function, and the weights and config.json fields of its MoE layers.

  maxscale run                                              transformers architecture (model_type)
  score=sigmoid, mean_k or renorm, routing bias, shared     Glm4MoeForCausalLM (glm4_moe): noaux_tc routing with
    experts, first_dense, every=1, qk_norm or not             n_group = topk_group = 1, e_score_correction_bias = the
                                                              bias (selects only), norm_topk_prob = renorm,
                                                              routed_scaling_factor = 1/k for mean_k,
                                                              first_k_dense_replace = first_dense, partial_rotary 1
  score=softmax, qk_norm, no shared expert, any layout      Qwen3MoeForCausalLM (qwen3_moe): mlp_only_layers = the
    (first_dense, every), renorm or mean_k                    dense blocks; mean_k: norm_topk_prob=false and 1/k
                                                              folded into each expert's down_proj
  score=softmax, renorm, every block MoE, no shared, no     MixtralForCausalLM (mixtral)
    qk_norm

Refused in one line naming the field: sigmoid with every > 1 (Glm4Moe's MoE layers are all those after the first k),
softmax with a routing bias (no softmax architecture selects by a bias), softmax with shared experts, and softmax
without qk_norm unless Mixtral expresses it. Shared experts of hidden size F = num_shared * shared_ffn_size become
Glm4Moe's n_shared_experts = ceil(F / M) experts of size M, zero-padded (zero rows and columns add nothing).
Each transformers MoE computes every token-expert pair, so it equals dropless (and dense) dispatch, and capacity
dispatch whenever no pair is dropped.
"""

from __future__ import annotations

import math

import numpy as np

from maxscale.errors import ConfigError

ARCHS = {"glm4_moe": "Glm4MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM"}


def _refuse(field: str, why: str) -> ConfigError:
    return ConfigError(f"this run cannot be exported to transformers: {field} ({why})")


def architecture(cfg) -> str:
    """The model_type of ARCHS that computes this MoE run's function; ConfigError (one line) when none does."""
    m, e = cfg.model, cfg.model.moe
    if e.score == "sigmoid":
        if e.every != 1:
            raise _refuse(f"model.moe.every={e.every}", "sigmoid routing exports as Glm4Moe, whose MoE blocks are all "
                          "those after first_k_dense_replace: use every=1")  # fmt: skip
        if e.num_experts < 2:
            raise _refuse(f"model.moe.num_experts={e.num_experts}", "Glm4Moe's router needs at least 2 experts")
        return "glm4_moe"
    if e.balance == "bias" and e.bias_rate:
        raise _refuse("model.moe.balance=bias", "the routing bias chooses experts; no softmax-routed transformers MoE "
                      "has one: use balance=aux or none, or score=sigmoid (Glm4Moe)")  # fmt: skip
    if e.num_shared:
        raise _refuse(f"model.moe.num_shared={e.num_shared}", "softmax-routed transformers MoEs (Qwen3-MoE, Mixtral) "
                      "have no shared expert; score=sigmoid exports as Glm4Moe, which has")  # fmt: skip
    if m.qk_norm:
        return "qwen3_moe"
    for bad, field, why in (
        (e.combine != "renorm", f"model.moe.combine={e.combine}", "Mixtral renormalises the top-k weights: renorm"),
        (e.first_dense, f"model.moe.first_dense={e.first_dense}", "every Mixtral block is MoE"),
        (e.every != 1, f"model.moe.every={e.every}", "every Mixtral block is MoE"),
    ):
        if bad:
            raise _refuse(field, f"{why}; with qk_norm=true any layout and combine export as Qwen3-MoE")
    return "mixtral"


def moe_layers(cfg) -> list[bool]:
    """Per block in depth order: whether it is an MoE block."""
    from maxscale.quant import calibrate

    return [stack == "moe_blocks" for stack, _ in calibrate.depth_order(cfg)]


def shared_experts(cfg) -> int:
    """Glm4Moe's n_shared_experts: ceil(F / M) (0 without shared experts)."""
    e = cfg.model.moe
    return math.ceil(e.num_shared * e.shared_ffn_size / e.expert_ffn_size) if e.num_shared else 0


def config_fields(cfg, arch: str) -> dict:
    """The MoE fields of config.json for `arch` (besides the Llama ones export_hf writes)."""
    m, e = cfg.model, cfg.model.moe
    K, renorm = e.num_active, e.combine == "renorm"
    if arch == "mixtral":
        aux = e.aux_loss_weight if e.balance == "aux" else 0.0
        return {"intermediate_size": e.expert_ffn_size, "num_local_experts": e.num_experts, "sliding_window": None,
                "num_experts_per_tok": K, "router_aux_loss_coef": aux, "router_jitter_noise": 0.0}  # fmt: skip
    out = {"moe_intermediate_size": e.expert_ffn_size, "num_experts_per_tok": K, "norm_topk_prob": renorm}
    if arch == "qwen3_moe":
        dense = [i for i, is_moe in enumerate(moe_layers(cfg)) if not is_moe]
        out.update(num_experts=e.num_experts, decoder_sparse_step=1, mlp_only_layers=dense, output_router_logits=False)
        return {**out, "router_aux_loss_coef": 0.0, "use_sliding_window": False, "sliding_window": None}
    out.update(n_routed_experts=e.num_experts, n_shared_experts=shared_experts(cfg), n_group=1, topk_group=1)
    out.update(first_k_dense_replace=e.first_dense, routed_scaling_factor=1.0 if renorm else 1.0 / K)
    out.update(use_qk_norm=bool(m.qk_norm), partial_rotary_factor=1.0, num_nextn_predict_layers=0)
    return out


def layer_weights(cfg, arch: str, b: dict, i: int, bias_E, res: float) -> dict[str, np.ndarray]:
    """{name after "model.layers.<l>.": HF weight} of MoE block `i` of the stack's arrays `b` (float32, [L, ...]);
    `res` the residual multiplier (folded into each down projection), `bias_E` its routing bias (Glm4Moe)."""
    e = cfg.model.moe
    out, E = {}, e.num_experts
    # mean_k as Qwen3-MoE's unnormalised top-k softmax weights: the 1/k goes into each expert's down projection
    down = res / e.num_active if arch == "qwen3_moe" and e.combine == "mean_k" else res
    pre, names = ("block_sparse_moe.", ("w1", "w3", "w2")) if arch == "mixtral" else ("mlp.", PROJ)
    out[pre + "gate.weight"] = b["router"][i].T
    for j in range(E):
        ex = f"{pre}experts.{j}."
        out[ex + names[0] + ".weight"] = b["w_gate_e"][i, j].T
        out[ex + names[1] + ".weight"] = b["w_up_e"][i, j].T
        out[ex + names[2] + ".weight"] = (b["w_down_e"][i, j] * down).T
    if arch == "glm4_moe":
        out[pre + "gate.e_score_correction_bias"] = np.asarray(
            bias_E if bias_E is not None else np.zeros(E), np.float32
        )
        n = shared_experts(cfg) * e.expert_ffn_size  # 0 without shared experts: empty matrices, as Glm4Moe has
        pad = n - e.num_shared * e.shared_ffn_size
        shared = {k: b[k][i] for k in ("w_gate_s", "w_up_s", "w_down_s")} if n else {}
        w_in = lambda k: np.pad(shared[k], ((0, 0), (0, pad))).T if n else np.zeros((0, cfg.model.width), np.float32)
        out[pre + "shared_experts.gate_proj.weight"] = w_in("w_gate_s")
        out[pre + "shared_experts.up_proj.weight"] = w_in("w_up_s")
        down = np.pad(shared["w_down_s"] * res, ((0, pad), (0, 0))) if n else np.zeros((0, cfg.model.width))
        out[pre + "shared_experts.down_proj.weight"] = np.asarray(down, np.float32).T
    return out


PROJ = ("gate_proj", "up_proj", "down_proj")


# ------------------------------------------------------------------------------------------------- import


def _layout(dense: list[bool]) -> tuple[int, int] | None:
    """(first_dense, every) whose depth order has these dense blocks (transformer.stack_depths), or None."""
    L = len(dense)
    for every in range(1, L + 1):
        groups = sum(not d for d in dense)
        first = L - groups * every
        want = [True] * first + ([True] * (every - 1) + [False]) * groups
        if first >= 0 and want == dense:
            return first, every
    return None


def import_fields(hf: dict) -> dict:
    """{dotted config key: value} of an MoE config.json (glm4_moe, qwen3_moe, mixtral); ConfigError (one line,
    naming the field) for what maxscale's MoE cannot compute."""
    kind, L = hf["model_type"], hf["num_hidden_layers"]
    K = hf.get("num_experts_per_tok")
    out = {"model.moe.num_active": K, "model.moe.num_shared": 0, "model.moe.shared_ffn_size": 0}
    if kind == "mixtral":
        M, E, dense, score = hf["intermediate_size"], hf.get("num_local_experts"), [False] * L, "softmax"
        out.update({"model.moe.combine": "renorm", "model.moe.balance": "aux"})
        out["model.moe.aux_loss_weight"] = float(hf.get("router_aux_loss_coef") or 0.0)
    elif kind == "qwen3_moe":
        M, E, score = hf.get("moe_intermediate_size"), hf.get("num_experts", hf.get("num_local_experts")), "softmax"
        step, only = hf.get("decoder_sparse_step", 1), set(hf.get("mlp_only_layers") or [])
        dense = [i in only or (i + 1) % step != 0 for i in range(L)]
        out["model.moe.combine"] = "renorm" if hf.get("norm_topk_prob", True) else "mean_k"
        out["model.moe.balance"] = "aux"
        out["model.moe.aux_loss_weight"] = float(hf.get("router_aux_loss_coef") or 0.0)
    else:  # glm4_moe
        M, E, score = (
            hf.get("moe_intermediate_size"),
            hf.get("n_routed_experts", hf.get("num_local_experts")),
            "sigmoid",
        )
        dense = [i < hf.get("first_k_dense_replace", 1) for i in range(L)]
        if hf.get("topk_group", 1) != hf.get("n_group", 1):
            raise ConfigError(f"config.json has topk_group={hf.get('topk_group')} < n_group={hf.get('n_group')} "
                              "(group-limited routing: maxscale's top-k is over all experts)")  # fmt: skip
        out["model.moe.combine"] = "renorm" if hf.get("norm_topk_prob", True) else "mean_k"
        n_shared = int(hf.get("n_shared_experts") or 0)
        out.update({"model.moe.num_shared": n_shared, "model.moe.shared_ffn_size": M if n_shared else 0})
        out["model.moe.balance"] = "bias"
    layout = _layout(dense)
    if layout is None or all(dense):
        raise ConfigError(f"config.json's MoE layers ({[i for i, d in enumerate(dense) if not d]}) are not maxscale's "
                          "first_dense dense blocks then groups of every - 1 dense and one MoE block")  # fmt: skip
    for key, value in (("num_experts_per_tok", K), ("moe_intermediate_size", M), ("experts", E)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"config.json has no positive integer {key} ({value!r})")
    out.update({"model.moe.num_experts": E, "model.moe.expert_ffn_size": M, "model.moe.score": score})
    out.update({"model.moe.first_dense": layout[0], "model.moe.every": layout[1]})
    return out


def expert_scale(hf: dict) -> float:
    """The factor HF's routing weights carry beyond maxscale's combine (folded into each expert's down projection)."""
    if hf["model_type"] != "glm4_moe":
        return 1.0 if hf["model_type"] == "mixtral" or hf.get("norm_topk_prob", True) else hf["num_experts_per_tok"]
    s = float(hf.get("routed_scaling_factor", 1.0))
    return s if hf.get("norm_topk_prob", True) else s * hf["num_experts_per_tok"]


def import_layer(cfg, hf: dict, take, pre: str, res: float) -> tuple[dict, np.ndarray | None]:
    """(maxscale MoE block arrays of one layer, its routing bias or None) from HF tensors under `pre`; `take(name,
    shape)` pops a tensor. Reads the hub's per-expert layout or transformers 5's fused gate_up_proj/down_proj."""
    e, D = cfg.model.moe, cfg.model.width
    E, M = e.num_experts, e.expert_ffn_size
    mix = hf["model_type"] == "mixtral"
    moe = pre + ("block_sparse_moe." if mix and not take.has(pre + "mlp.gate.weight") else "mlp.")
    out = {"router": take(moe + "gate.weight", (E, D)).T}
    if take.has(moe + "experts.gate_up_proj"):
        gate_up = take(moe + "experts.gate_up_proj", (E, 2 * M, D))
        out["w_gate_e"], out["w_up_e"] = gate_up[:, :M].transpose(0, 2, 1), gate_up[:, M:].transpose(0, 2, 1)
        out["w_down_e"] = take(moe + "experts.down_proj", (E, D, M)).transpose(0, 2, 1)
    else:
        names = ("w1", "w3", "w2") if moe.endswith("block_sparse_moe.") else PROJ
        ex = lambda j, n, shape: take(f"{moe}experts.{j}.{n}.weight", shape).T  # noqa: E731
        out["w_gate_e"] = np.stack([ex(j, names[0], (M, D)) for j in range(E)])
        out["w_up_e"] = np.stack([ex(j, names[1], (M, D)) for j in range(E)])
        out["w_down_e"] = np.stack([ex(j, names[2], (D, M)) for j in range(E)])
    out["w_down_e"] = out["w_down_e"] * (expert_scale(hf) / res)
    bias = None
    if hf["model_type"] == "glm4_moe":
        bias = take(moe + "gate.e_score_correction_bias", (E,))
        F = e.num_shared * e.shared_ffn_size
        if F:
            out["w_gate_s"] = take(moe + "shared_experts.gate_proj.weight", (F, D)).T
            out["w_up_s"] = take(moe + "shared_experts.up_proj.weight", (F, D)).T
            out["w_down_s"] = take(moe + "shared_experts.down_proj.weight", (D, F)).T / res
        else:
            for n in PROJ:
                take.pop(f"{moe}shared_experts.{n}.weight")
    return out, bias
