"""The parameterization table of a config: per parameter its role, init std and LR / WD / eps factors, plus the
forward multipliers. `python -m maxscale.parameterization --config=FILE [--config.a.b=v ...] [--json]`.
"""

from __future__ import annotations

import json

import ml_collections

from maxscale import cli
from maxscale import config as config_lib
from maxscale.model import transformer
from maxscale.parameterization import Parameterization


def describe(cfg: ml_collections.ConfigDict) -> dict:
    """The table for a resolved config: one row per parameter, plus the forward multipliers. No arrays made."""
    par = Parameterization(cfg)
    rows = []
    for path, spec, shape in transformer.param_specs(cfg):
        std = par.init_std(spec)
        init = "ones" if spec.role == "norm" else "normal" if std else "zeros"
        rows.append(
            {
                "path": path,
                "shape": list(shape),
                "role": spec.role,
                "axes": list(spec.axes),
                "init": init,
                "init_std": std,
                **par.factors(spec),
            }
        )
    return {
        "parameterization": cfg.parameterization.name,
        "source": par.rule.source,
        "depth_alpha": par.alpha,
        "attn_exponent": par.attn_exponent,
        "m_width": par.m_width,
        "m_depth": par.m_depth,
        "multipliers": par.multipliers(),
        "axis_multipliers": axis_multipliers(cfg, par),
        "params": rows,
    }


def axis_multipliers(cfg: ml_collections.ConfigDict, par: Parameterization) -> dict[str, float]:
    """size / base size per logical axis that can scale: what grows in this run relative to its base."""
    axes = ["embed", "mlp", "heads", "head_dim", "layers"]
    if cfg.model.moe.num_experts:
        axes += ["experts", "expert_mlp"]
    return {a: par.sizes[a] / par.base_sizes[a] for a in axes}


def _format_table(table: dict) -> str:
    lines = [
        f"parameterization={table['parameterization']} ({table['source']}) depth_alpha={table['depth_alpha']} "
        f"attn_exponent={table['attn_exponent']} m_width={table['m_width']:.6g} m_depth={table['m_depth']:.6g}",
        "multipliers: " + "  ".join(f"{k}={v:.6g}" for k, v in table["multipliers"].items()),
        "size / base: " + "  ".join(f"{k}={v:.6g}" for k, v in table["axis_multipliers"].items()),
        f"{'path':<28} {'shape':<22} {'role':<10} {'init_std':>10} {'lr':>9} {'wd':>9} {'eps':>9}",
    ]
    for r in table["params"]:
        init = f"{r['init_std']:.4g}" if r["init"] == "normal" else r["init"]
        lines.append(
            f"{r['path']:<28} {str(tuple(r['shape'])):<22} {r['role']:<10} {init:>10} "
            f"{r['lr']:>9.4g} {r['wd']:>9.4g} {r['eps']:>9.4g}"
        )
    return "\n".join(lines)


@cli.command("maxscale.parameterization")
def main(argv: list[str]) -> int:
    p = cli.Parser("maxscale.parameterization", __doc__, config=True)
    cli.bool_flag(p, "json", "print the table as JSON")
    args = p.parse(argv)
    table = describe(config_lib.resolve(args.config))
    print(json.dumps(table, indent=2) if args.json else _format_table(table))
    return 0
