"""What the one forward returns (`Output`, the same type whatever it was asked) and how the per-stack outputs of
the scanned layer stacks are gathered into `Output.captured` (model/transformer.py, `Transformer.__call__`)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from maxscale.model.context import Recorder
from maxscale.model.layers import mean_abs


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Output:
    """What the forward returns, whatever it was asked: `logits` float32 [B, T, V] (None when targets were given),
    `loss` {"ce": mean cross-entropy, "z_loss": mean log(Z)^2} (None without targets), `moe` per MoE layer routing
    statistics {moe_load [L_moe, E], moe_max_load, moe_aux_loss, moe_z_loss, moe_router_entropy,
    moe_dropped_fraction, ...: [L_moe]} ({} for a dense model), `captured` what `capture` asked (see `gather`),
    `cache` the updated KV cache when decoding with one (None otherwise)."""

    logits: jax.Array | None
    loss: dict | None
    moe: dict
    captured: dict
    cache: dict | None = None


def stats_of(out: Output) -> dict:
    """The coordinate-check view of a forward run with capture=("stats",): {"embed", "embed_probe", "logits",
    "layers": {series: [depth, ...]}, "moe": Output.moe}."""
    return {**out.captured["stats"], "moe": out.moe}


def gather(outs: dict, capture: frozenset, rec: Recorder | None, logits, groups: int) -> dict:
    """Output.captured from the stacks' outs: "stats" {"layers": {series: [depth, ...]} in depth order, "logits"},
    "quant_errors" {kind: float32 mean over every tensor of that kind}, "moments" {stack: {name: [L, I, I], or
    [L, E, I, I] for an expert matrix}, plus "top": {readout name: [D, D]}}. `groups`: the number of MoE groups (MoE
    blocks) of an interleaved layout."""
    captured: dict = {}
    if "stats" in capture:
        series = {k: {n: v for n, v in o["stats"].items() if not n.startswith("moe")} for k, o in outs.items()}
        if "interleaved" in series:  # per group: its every - 1 dense blocks, then its MoE block
            G = groups
            inter, moe = series.pop("interleaved"), series.pop("moe_blocks")
            series["groups"] = {
                n: jnp.concatenate([v.reshape(G, -1, *v.shape[1:]), moe[n][:, None]], 1).reshape(-1, *v.shape[1:])
                for n, v in inter.items()
            }
        parts = list(series.values())
        captured["stats"] = {"layers": {n: jnp.concatenate([p[n] for p in parts]) for n in parts[0]}}
        if logits is not None:
            captured["stats"]["logits"] = mean_abs(logits)
    if "quant_errors" in capture:
        sums: dict = {}
        for part in [o["quant_errors"] for o in outs.values()] + [rec.outputs()["quant_errors"]]:
            for kind, v in part.items():  # [..., 2] (sum, count): summed over layers and stacks
                sums[kind] = sums.get(kind, 0.0) + v.reshape(-1, 2).sum(0)
        captured["quant_errors"] = {k: v[0] / v[1] for k, v in sums.items()}
    if "moments" in capture:
        captured["moments"] = {k: o["moments"] for k, o in outs.items()}
        captured["moments"]["top"] = rec.outputs()["moments"]
    return captured
