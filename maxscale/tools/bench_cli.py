"""Benchmark the train step and print JSON (the measurement: maxscale/tools/bench.py).

    maxscale bench --config=configs/base.py --config.model.width=512 --config.model.num_heads=8 \\
        --config.data.seq_len=256 --config.train.batch_size=16 [--steps=10] [--compile_depths=4,64]
    maxscale bench --config=configs/moe.py --compare_dense=true   (MoE vs the dense model of equal active size)
    maxscale bench --config=configs/moe.py --config.model.moe.dispatch=dropless --dispatches=capacity \\
        --compare_dense=true --steps=30   (dropless vs capacity and dense: ratio_to_capacity, ratio_to_dense)
    maxscale bench --config=configs/base.py --checkpoint=true --config.model.width=768 \\
        --config.model.num_heads=12 --config.model.depth=12 [--saves=3] [--checkpoint_dir=/tmp]
        (seconds a checkpoint save blocks the training thread, manifest hashed inline vs in the background)
"""

from __future__ import annotations

import json

from maxscale import cli
from maxscale import config as config_lib


@cli.command("bench")
def main(argv: list[str]) -> int:
    p = cli.Parser("bench", __doc__, config=True)
    p.add_argument("--steps", type=int, default=10, help="timed steps (after the compile step)")
    p.add_argument("--compile_depths", default="", help="comma-separated depths whose compile time is measured")
    p.add_argument("--compare_dense", type=cli.flag_bool, default=False, help="MoE vs its equal-active dense model")
    p.add_argument("--dispatches", default="", help="comma-separated model.moe.dispatch values timed beside (MoE)")
    p.add_argument("--rounds", type=int, default=0, help="round-robin rounds of the compared steps (0: --steps)")
    p.add_argument("--checkpoint", type=cli.flag_bool, default=False, help="time checkpoint saves instead")
    p.add_argument("--saves", type=int, default=3, help="checkpoint saves timed (with --checkpoint=true)")
    p.add_argument("--checkpoint_dir", default=None, help="where the timed checkpoints go (default: a temp dir)")
    args = p.parse(argv)
    cfg = config_lib.resolve(args.config)
    from maxscale.tools import bench

    if args.checkpoint:
        print(json.dumps(bench.checkpoint_blocking(cfg, args.saves, args.checkpoint_dir), indent=2))
        return 0
    dispatches = tuple(d for d in args.dispatches.split(",") if d)
    result = bench.run(cfg, args.steps, args.compare_dense, dispatches=dispatches, rounds=args.rounds)
    if args.compile_depths:
        result["compile_s_by_depth"] = {}
        for depth in (int(d) for d in args.compile_depths.split(",")):
            deep = config_lib.from_json(config_lib.to_json(cfg))
            deep.model.depth = depth
            deep.parameterization.base_depth = depth
            result["compile_s_by_depth"][depth] = round(bench.compile_seconds(deep), 3)
    print(json.dumps(result, indent=2))
    return 0
