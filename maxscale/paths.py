"""Paths that may be URLs: workdirs, checkpoint directories, data sources and sweep roots.

Everything goes through `etils.epath` (what orbax itself uses), so `gs://bucket/run` reaches orbax, the metrics writer
and TensorBoard as a URL and never becomes `<cwd>/gs:/bucket/run`. `file:///abs/path` is a local path. Local paths
are made absolute once, here. Object stores cannot append or rename atomically; the helpers below say what they do
instead.
"""

from __future__ import annotations

import os
import re
import tempfile
import urllib.parse
from collections.abc import Iterator

from etils import epath
from etils.epath import backend as epath_backend

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(path: str | os.PathLike) -> bool:
    """True for a remote URL (`gs://`, `s3://`, ...); `file://` URLs and plain paths are local."""
    text = os.fspath(path)
    return bool(_SCHEME.match(text)) and not text.startswith("file://")


def as_path(path: str | os.PathLike) -> epath.Path:
    """An epath.Path: remote URLs unchanged, `file://` URLs and plain paths as absolute local paths."""
    text = os.fspath(path)
    if text.startswith("file://"):
        text = urllib.parse.unquote(urllib.parse.urlparse(text).path)
    if is_url(text):
        return epath.Path(text)
    return epath.Path(os.path.abspath(text))


def join(path: str | os.PathLike, *parts: str) -> epath.Path:
    return as_path(path).joinpath(*parts)


def walk_files(top: str | os.PathLike) -> Iterator[tuple[str, epath.Path]]:
    """(path relative to `top` with '/' separators, full path) of every file under `top`, sorted. epath's walk of
    an object store (fsspec) yields roots without their `gs://` scheme, so `root.relative_to(top)` fails there and
    `root / name` names a local path: the scheme is put back here. Listings are fresh (forget_listings)."""
    top = as_path(top)
    forget_listings(top)
    base = os.fspath(top).rstrip("/")
    scheme = base.split("://", 1)[0] + "://" if is_url(base) else ""
    found = []
    for root, _, names in top.walk():
        text = os.fspath(root).rstrip("/")
        if scheme and not text.startswith(scheme):
            text = scheme + text.lstrip("/")
        rel_root = text[len(base) :].strip("/")
        for name in names:
            found.append((f"{rel_root}/{name}" if rel_root else name, epath.Path(f"{text}/{name}")))
    return iter(sorted(found, key=lambda item: item[0]))


def forget_listings(path: str | os.PathLike) -> None:
    """Drops the listings an object store's client (gcsfs, through epath) cached for `path`, its parents and
    everything under it. Another process, or tensorstore (orbax's arrays), may have written there since: a stale
    listing hides new files, or names deleted ones. Local paths have no such cache."""
    if not is_url(path):
        return
    text = os.fspath(as_path(path))
    try:
        fs = epath_backend.fsspec_backend.fs(text)
    except (ImportError, ValueError):
        return  # a scheme fsspec does not serve here: nothing of it is cached either
    root = fs._strip_protocol(text).rstrip("/")
    fs.invalidate_cache(root)  # the path and its parents
    for key in [k for k in list(fs.dircache) if k.startswith(root + "/")]:
        fs.dircache.pop(key, None)


def list_dir(path: str | os.PathLike) -> list[epath.Path]:
    """What directory `path` holds, listed afresh (forget_listings); [] if there is none (an object-store prefix
    exists only once an object is under it, so a directory about to be written to is often absent)."""
    path = as_path(path)
    forget_listings(path)
    return list(path.iterdir()) if path.is_dir() else []


def remove_tree(top: str | os.PathLike, first: tuple[str, ...] = (), ignore_errors: bool = False) -> None:
    """Deletes `top` and everything under it. The files named in `first` (relative to `top`) go before the rest:
    on an object store a tree is deleted one object at a time, and a reader that checks them (a commit marker, a
    manifest) then never sees a part of the tree as whole. `ignore_errors`: what cannot go now stays."""
    top = as_path(top)
    try:
        for rel in first:
            if (top / rel).exists():
                (top / rel).unlink()
        forget_listings(top)
        if top.exists():
            top.rmtree()
    except OSError:
        if not ignore_errors:
            raise


def copy_tree(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copies every file under `src` to the same place under `dst` (on an object store, server-side copies)."""
    dst = as_path(dst)
    for rel, path in walk_files(src):
        target = dst / rel
        if not is_url(target):
            target.parent.mkdir(parents=True, exist_ok=True)
        path.copy(target)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Readers see the old or the new text, never a part: local files by rename, objects by a whole-object write."""
    path = as_path(path)
    if is_url(path):
        path.write_text(text)  # an object store replaces an object whole
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_text(path: str | os.PathLike) -> str:
    return as_path(path).read_text()


def writable_dir_problem(path: str | os.PathLike) -> str | None:
    """Why a run cannot write under `path`, or None. Remote paths are not probed (no credentials needed to plan a
    run); local ones must be, or lie under, a writable directory."""
    if is_url(path):
        return None
    probe = os.fspath(as_path(path))
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        return f"{probe} is a file, not a directory"
    try:  # permission bits do not stop root, and /proc or a read-only mount refuse anyway: really try
        os.rmdir(tempfile.mkdtemp(prefix=".maxscale-probe-", dir=probe))
    except OSError as e:
        return f"cannot create directories under {probe} ({e.strerror or type(e).__name__})"
    return None
