"""Validation of the `quant.*` config section (formats and granularities; ConfigError with one line)."""

from __future__ import annotations

from maxscale.errors import ConfigError
from maxscale.quant.spec import parse_format

KINDS = ("weights", "activations", "kv")


def resolve(cfg) -> None:
    q = cfg.quant
    for kind in KINDS:
        fmt = parse_format(q[kind], field=f"quant.{kind}")
        q[kind] = "none" if fmt is None else fmt.name  # canonical spelling: e4m3, int8, none
    if q.whole_attention and q.kv == "none":
        raise ConfigError("quant.whole_attention=true needs a format in quant.kv (e.g. --config.quant.kv=int8)")
