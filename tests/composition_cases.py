"""The composition suite's cases (tests/test_composition.py): a covering array over the features of maxscale, so
that every pair of values of any two factors runs together in at least one short training run.

A case is a dict {factor: value name}; `overrides(case)` turns it into `{config field: value}`, the same fields a
user passes as `--config.a.b=v`. The array is built by `all_pairs`, a small deterministic greedy algorithm (AETG
style: each new row starts from the first uncovered pair and fills the other factors with the value that covers
the most still-uncovered pairs), so the cases and their order are the same on every machine.
"""

from __future__ import annotations

import itertools

# The cheapest honest model: configs/tiny.py shrunk to 2 blocks of width 32, 6 steps of 8 x 16 tokens, every step
# logged, a checkpoint every 3 steps (so a kill after step 3 resumes mid-run) and one eval at the end.
STEPS, CKPT_EVERY, LR, PACK_LRS = 6, 3, 1e-2, (1e-2, 5e-3)
FIXED = {
    "model.width": 32,
    "model.depth": 2,
    "model.num_heads": 2,
    "model.ffn_size": 64,
    "data.seq_len": 16,
    "data.max_bytes": 200_000,
    "train.batch_size": 8,
    "train.steps": STEPS,
    "train.log_every": 1,
    "train.eval_every": STEPS,
    "train.eval_steps": 1,
    "train.sample_tokens": 0,
    "train.peak_flops": 1e11,
    "schedule.warmup_steps": 0,
    "checkpoint.every": CKPT_EVERY,
    "checkpoint.async_save": False,
    "optimizer.lr": LR,
}
_MOE = {"model.moe.num_experts": 4, "model.moe.num_active": 2, "model.moe.expert_ffn_size": 32}
_CAPACITY = {**_MOE, "model.moe.dispatch": "capacity", "model.moe.capacity_factor": 2.0}
MODELS = {
    "dense": {},
    "moe_capacity": _CAPACITY,
    "moe_dropless": {**_MOE, "model.moe.dispatch": "dropless"},
    # first_dense=1 then groups of every=2 blocks (one dense, one MoE) need 1 + 2n blocks
    "moe_layout": {**_CAPACITY, "model.moe.first_dense": 1, "model.moe.every": 2, "model.depth": 3},
    "moe_shared": {**_CAPACITY, "model.moe.num_shared": 1},
    "moe_router": {
        **_CAPACITY,
        "model.moe.score": "softmax",
        "model.moe.combine": "renorm",
        "model.moe.balance": "aux",
    },
}
QUANT = {
    "none": {},
    "int8": {"quant.weights": "int8"},
    "w4a8kv4": {"quant.weights": "int4", "quant.activations": "int8", "quant.kv": "int4"},
    "e4m3": {"quant.activations": "e4m3"},
}
# name -> (devices the process sees, the mesh of a dense model, the mesh of an MoE model)
MESHES = {
    "one": (1, {"mesh.data": 1}, {"mesh.data": 1}),
    "data2_fsdp2": (4, {"mesh.data": 2, "mesh.fsdp": 2}, {"mesh.data": 2, "mesh.fsdp": 2}),
    "tensor2": (2, {"mesh.data": 1, "mesh.tensor": 2}, {"mesh.data": 1, "mesh.tensor": 2}),
    "expert2": (2, {"mesh.data": 2}, {"mesh.data": 1, "mesh.expert": 2}),  # a dense model has no expert axis
}
SWITCHES = {
    "microbatches": {"train.microbatches": 2},
    "chunked_attention": {"model.attention_impl": "chunked", "model.attention_chunk_size": 8},
    "loss_chunks": {"model.loss_chunk_size": 8},
    "bfloat16": {"model.dtype": "bfloat16"},
    "remat": {"model.remat": "full"},
    # at the checkpoint steps: dyn/dh_step is resume-exact only from a multiple of dyn_every (train/dyn.py)
    "dyn_metrics": {"train.dyn_every": CKPT_EVERY},
}
FACTORS = {
    "model": list(MODELS),
    "param": ["sp", "mup", "depth_mup", "completep"],
    "quant": list(QUANT),
    "mesh": list(MESHES),
    "pack": ["single", "pack2"],  # pack2: a 2-point sweep (optimizer.lr) run by tools/sweep.py --vectorize=2
    **{s: ["off", "on"] for s in SWITCHES},  # each step switch is its own factor: their pairs are covered too
}


def all_pairs(factors: dict[str, list]) -> list[dict]:
    """Rows {factor: value} that together hold every pair of values of any two factors (greedy, deterministic)."""
    names = list(factors)
    sizes = [len(factors[f]) for f in names]
    uncovered = {
        (i, a, j, b)
        for i, j in itertools.combinations(range(len(names)), 2)
        for a in range(sizes[i])
        for b in range(sizes[j])
    }
    # Fill the largest factors first: they have the most pairs left to cover.
    fill_order = sorted(range(len(names)), key=lambda i: -sizes[i])
    rows = []
    while uncovered:
        i0, a0, j0, b0 = min(uncovered)
        row = {i0: a0, j0: b0}
        for i in (i for i in fill_order if i not in row):  # the value covering the most new pairs, then the first
            row[i] = max(range(sizes[i]), key=lambda v, i=i, row=row: (_gain(uncovered, row, i, v), -v))
        for i, j in itertools.combinations(sorted(row), 2):
            uncovered.discard((i, row[i], j, row[j]))
        rows.append({names[i]: factors[names[i]][row[i]] for i in range(len(names))})
    return rows


def _gain(uncovered: set, row: dict, i: int, v: int) -> int:
    """How many uncovered pairs factor i at value v would cover beside the values already in `row`."""
    return sum((min(i, k), v if i < k else w, max(i, k), w if i < k else v) in uncovered for k, w in row.items())


def covered_pairs(rows: list[dict]) -> set:
    """The pairs ((factor, value), (factor, value)) that `rows` hold."""
    return {pair for row in rows for pair in itertools.combinations(sorted(row.items()), 2)}


def all_pairs_of(factors: dict[str, list]) -> set:
    return {
        ((f, a), (g, b)) for f, g in itertools.combinations(sorted(factors), 2) for a in factors[f] for b in factors[g]
    }


def resume_subset(rows: list[dict]) -> list[int]:
    """Indices of the fewest rows that hold every value of every factor at least once (an exact search, smallest
    size first, the first such set in index order): the cases that are also killed and resumed. The size is at least
    the largest factor's number of values (6 models), and 6 suffice for the array of `all_pairs`."""
    values = sorted({(f, v) for f, vs in FACTORS.items() for v in vs})
    bit = {fv: 1 << i for i, fv in enumerate(values)}
    masks = [sum(bit[fv] for fv in row.items() if fv in bit) for row in rows]
    full = (1 << len(values)) - 1
    for k in range(max(len(vs) for vs in FACTORS.values()), len(rows) + 1):
        for combo in itertools.combinations(range(len(rows)), k):
            mask = 0
            for r in combo:
                mask |= masks[r]
            if mask == full:
                return list(combo)
    raise ValueError("the rows do not hold every value")


def case_name(index: int, case: dict) -> str:
    """c07-moe_router-mup-int8-tensor2-pack2+remat+bfloat16: the factors a reader looks for, in order."""
    on = "".join(f"+{s}" for s in SWITCHES if case[s] == "on")
    return f"c{index:02d}-{case['model']}-{case['param']}-{case['quant']}-{case['mesh']}-{case['pack']}{on}"


def devices(case: dict) -> int:
    return MESHES[case["mesh"]][0]


def overrides(case: dict) -> dict:
    """{config field: value} of one case (for a pack: of its first point; `points` gives both)."""
    expert = case["model"] != "dense"  # packs too: their members share the expert axis (tests/test_moe_ep.py)
    out = {**FIXED, **MODELS[case["model"]], **QUANT[case["quant"]], **MESHES[case["mesh"]][2 if expert else 1]}
    out["parameterization.name"] = case["param"]
    for s, fields in SWITCHES.items():
        if case[s] == "on":
            out.update(fields)
    return out


def points(case: dict) -> list[dict]:
    """The sweep points of a case: one, or the two learning rates of a pack."""
    base = overrides(case)
    return [base] if case["pack"] == "single" else [{**base, "optimizer.lr": lr} for lr in PACK_LRS]


def cli_flags(case: dict) -> list[str]:
    """`--config.a.b=v` flags of a single case, as a user types them after `python -m maxscale.train`."""
    return [f"--config.{k}={v}" for k, v in overrides(case).items()]


def sweep_file(name: str, base_config: str, cases: list[dict]) -> str:
    """The text of a sweep file (configs/sweeps/*.py format) whose points are every point of `cases`."""
    pts = [p for c in cases for p in points(c)]
    return f"def get_sweep():\n    return {{'name': {name!r}, 'config': {base_config!r}, 'points': {pts!r}}}\n"
