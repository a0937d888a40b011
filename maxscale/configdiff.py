"""Differences between two config dicts (resolved configs as JSON objects): what a resumed run or a reused sweep
result is checked with."""

from __future__ import annotations

import json
from typing import Iterable


def diff_fields(old: dict, new: dict, skip: Iterable[str] = (), prefix: str = "") -> list[str]:
    """["field old -> new", ...] for every field whose value differs, in field order; `skip` lists fields or whole
    sections (and their fields) to leave out. Values compare as JSON (a list equals the same tuple)."""
    skip = tuple(skip)
    out = []
    for k in sorted(set(old) | set(new)):
        field = f"{prefix}{k}"
        if any(field == f or field.startswith(f + ".") for f in skip):
            continue
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff_fields(a, b, skip, field + ".")
        elif json.dumps(a) != json.dumps(b):
            out.append(f"{field} {a!r} -> {b!r}")
    return out
