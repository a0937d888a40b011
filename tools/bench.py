"""Benchmark the train step and print JSON (see maxscale/tools/bench.py).

    python tools/bench.py --config=configs/base.py --config.model.width=512 --config.model.num_heads=8 \
        --config.data.seq_len=256 --config.train.batch_size=16 [--steps=10] [--compile_depths=4,64]
    python tools/bench.py --config=configs/moe.py --compare_dense=true   (MoE vs the dense model of equal active size)
    python tools/bench.py --config=configs/base.py --checkpoint=true --config.model.width=768 \
        --config.model.num_heads=12 --config.model.depth=12 [--saves=3] [--checkpoint_dir=/tmp]
        (seconds a checkpoint save blocks the training thread, manifest hashed inline vs in the background)
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from maxscale import config as config_lib  # noqa: E402
from maxscale import errors


def main(argv) -> int:
    try:
        flag_names = ("steps", "compile_depths", "compare_dense", "checkpoint", "saves", "checkpoint_dir")
        cfg, flags = config_lib.parse_argv(argv, extra_flags=flag_names)
        cfg = config_lib.resolve(cfg)
        steps, saves = int(flags.get("steps", 10)), int(flags.get("saves", 3))
    except errors.HelpRequested as e:
        print(f"{__doc__.strip()}\n\n{e}")
        return 0
    except (errors.ConfigError, ValueError) as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return errors.EXIT_USAGE
    from maxscale.tools import bench

    if flags.get("checkpoint", "false").lower() == "true":
        print(json.dumps(bench.checkpoint_blocking(cfg, saves, flags.get("checkpoint_dir")), indent=2))
        return 0
    result = bench.run(cfg, steps=steps, compare_dense=flags.get("compare_dense", "false").lower() == "true")
    if flags.get("compile_depths"):
        result["compile_s_by_depth"] = {}
        for depth in (int(d) for d in flags["compile_depths"].split(",")):
            deep = config_lib.from_json(config_lib.to_json(cfg))
            deep.model.depth = depth
            deep.parameterization.base_depth = depth
            result["compile_s_by_depth"][depth] = round(bench.compile_seconds(deep), 3)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
