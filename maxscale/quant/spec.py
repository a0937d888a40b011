"""Quantization formats by name, without JAX: the config layer's part of maxscale/quant (formats.py has the math).

`none`, `int<b>` (2 <= b <= 16) or `e<x>m<y>` (1 sign bit, 1 <= x <= 7 exponent bits, y >= 0 mantissa bits,
3 <= 1+x+y <= 16). The config validates every quant field with `parse_format`, so a bad format is refused before
JAX is imported (a bad command line costs no JAX start-up).
"""

from __future__ import annotations

import dataclasses
import re

from maxscale.errors import ConfigError

MAX_EXP_BITS = 7
_FORMS = "none, int<b> with b in 2..16, or e<x>m<y> with 1 <= x <= 7 and 3 <= 1+x+y <= 16 (e.g. int8, e4m3)"


def _valid(kind: str, bits: int, exp_bits: int, man_bits: int) -> bool:
    if kind == "int":
        return 2 <= bits <= 16
    if kind == "float":
        return 1 <= exp_bits <= MAX_EXP_BITS and man_bits >= 0 and bits == 1 + exp_bits + man_bits and 3 <= bits <= 16
    return False


@dataclasses.dataclass(frozen=True)
class Format:
    """A number format. kind "int": `bits` total (sign included). kind "float": 1 sign + exp_bits + man_bits."""

    kind: str
    bits: int
    exp_bits: int = 0
    man_bits: int = 0

    def __post_init__(self):
        if not _valid(self.kind, self.bits, self.exp_bits, self.man_bits):
            raise ConfigError(f"quant format {self!r} is not supported; use {_FORMS}")

    @property
    def name(self) -> str:
        """The canonical string, which `parse_format` maps back to this format."""
        return f"int{self.bits}" if self.kind == "int" else f"e{self.exp_bits}m{self.man_bits}"

    def __str__(self) -> str:
        return self.name


def int_format(bits: int) -> Format:
    return Format("int", bits)


def float_format(exp_bits: int, man_bits: int) -> Format:
    return Format("float", 1 + exp_bits + man_bits, exp_bits, man_bits)


def parse_format(text: str | None, field: str | None = None) -> Format | None:
    """`none` (or None) -> None; `int<b>` / `e<x>m<y>` -> Format. Otherwise a one-line ConfigError naming `field`."""
    if text is None:
        return None
    s = str(text).strip().lower()
    if s == "none":
        return None
    fmt = None
    if m := re.fullmatch(r"int(\d{1,2})", s):
        if _valid("int", int(m[1]), 0, 0):
            fmt = int_format(int(m[1]))
    elif m := re.fullmatch(r"e(\d{1,2})m(\d{1,2})", s):
        x, y = int(m[1]), int(m[2])
        if _valid("float", 1 + x + y, x, y):
            fmt = float_format(x, y)
    if fmt is None:
        where = f"{field}={text!r}" if field else f"quant format {text!r}"
        raise ConfigError(f"{where} is not supported; use {_FORMS}".replace("\n", " "))
    return fmt
