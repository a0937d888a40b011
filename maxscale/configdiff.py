"""Differences between two config dicts (resolved configs as JSON objects): what a resumed run or a reused sweep
result is checked with."""

from __future__ import annotations

import json
from typing import Iterable

from maxscale.defaults import REMOVED

_MISSING = object()


def diff_fields(
    old: dict, new: dict, skip: Iterable[str] = (), prefix: str = "", defaults: dict | None = None
) -> list[str]:
    """["field old -> new", ...] for every field whose value differs, in field order; `skip` lists fields or whole
    sections (and their fields) to leave out. Values compare as JSON (a list equals the same tuple).

    `defaults` (the defaults as the same nested dict): a field that `old` lacks (it was written before the field
    existed) and whose new value is its default is no difference, the rule by which sweep run ids leave out fields
    at their default; a field added with a default that changes behaviour in this config still differs. A field
    removed since (`defaults.REMOVED`) that `old` holds at the only value it had and `new` lacks is no difference."""
    skip = tuple(skip)
    out = []
    for k in sorted(set(old) | set(new)):
        field = f"{prefix}{k}"
        if any(field == f or field.startswith(f + ".") for f in skip):
            continue
        a, b = old.get(k, _MISSING), new.get(k)
        if k not in new and field in REMOVED and json.dumps(a) == json.dumps(REMOVED[field]):
            continue
        d = defaults.get(k, _MISSING) if isinstance(defaults, dict) else _MISSING
        if a is _MISSING and d is not _MISSING and json.dumps(b, default=str) == json.dumps(d, default=str):
            continue
        a = None if a is _MISSING else a
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff_fields(a, b, skip, field + ".", d if isinstance(d, dict) else None)
        elif a is None and isinstance(b, dict) and isinstance(d, dict):  # a whole section added since
            out += diff_fields({}, b, skip, field + ".", d)
        elif json.dumps(a) != json.dumps(b):
            out.append(f"{field} {a!r} -> {b!r}")
    return out
