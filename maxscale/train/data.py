"""Data: corpus sources, tokenization (`data.tokenizer`, tokenizers.py), a deterministic grain pipeline, per-process
shards, checkpointable state.

Sources (`data.source`):
  stdlib             the Python standard library's own .py files (found via sysconfig): every machine has it
  a path/glob/dir    text files; each file is a document, encoded with `data.tokenizer` when the run starts
  *.json             a token file header written by tools/prepare_data.py (numpy memmaps beside it); its tokenizer
                     must be `data.tokenizer` (checked by content, not path)
  an ArrayRecord dir a directory written by tools/prepare_data.py --format=arrayrecord (or a glob of its
                     *.array_record shards), recognised by its manifest maxscale_tokens.json; the same token streams
                     as a token file, in records of RECORD_TOKENS tokens read by random access (RecordTokens)

The split is by document (a stable hash of the document's name), so eval text never appears in training. A corpus
of a single document falls back to holding out its tail. Training batches are a pure function of (seed, step):
window indices are shuffled by grain (a fresh permutation each epoch), batched globally, and each process then
loads only its own rows. So the global batch is the same for any number of processes, and the iterator state is
one integer, saved in checkpoints as JSON (maxscale/train/checkpoint.py).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import sysconfig
import zlib
from typing import TYPE_CHECKING

import ml_collections
import numpy as np
from etils import epath

from maxscale import paths
from maxscale.errors import ConfigError
from maxscale.train import tokenizers as tok_lib
from maxscale.train.tokenizers import ByteTokenizer  # noqa: F401 - re-exported: data.ByteTokenizer

if TYPE_CHECKING:
    import grain

EOS = ByteTokenizer.eos_id  # the byte tokenizer separates documents with NUL, which text files do not contain
TOKEN_FILE_FORMAT = "maxscale-tokens-v1"
# ArrayRecord corpora: each split's token stream cut into records of RECORD_TOKENS tokens (the last one shorter),
# written with one record per chunk (group_size:1: a read decodes only the record asked for) and uncompressed (token
# ids hardly compress, and decompression would cost the input pipeline CPU on every random read)
RECORD_FORMAT = "maxscale-arrayrecord-v1"
RECORD_MANIFEST = "maxscale_tokens.json"  # written last: only a complete directory has one
RECORD_TOKENS = 4096
SHARD_RECORDS = 16384  # records per shard file: 64M tokens
RECORD_OPTIONS = "group_size:1,uncompressed"


@dataclasses.dataclass
class Corpus:
    train: np.ndarray  # 1-D token ids (uint8/uint16/uint32, possibly a memmap)
    eval: np.ndarray
    vocab_size: int
    description: str


# -- sources -------------------------------------------------------------------------------------------------------


def _stdlib_files() -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for d, dirs, names in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in ("site-packages", "__pycache__"))
        files += [os.path.join(d, n) for n in sorted(names) if n.endswith(".py")]
    return files


def _remote_files(source: str) -> list[epath.Path]:
    """Files under a URL: a directory (recursively), a glob (wildcards after the bucket), or one object."""
    path = paths.as_path(source)
    if glob.has_magic(source):
        parts = source.split("/")
        first = next(i for i, part in enumerate(parts) if glob.has_magic(part))
        return list(epath.Path("/".join(parts[:first])).glob("/".join(parts[first:])))
    if path.is_dir():
        return [root / name for root, _, names in path.walk() for name in names]
    return [path]


def _text_files(source: str) -> list:
    if paths.is_url(source):
        files = sorted((f for f in _remote_files(source) if f.is_file()), key=os.fspath)
    elif os.path.isdir(source):
        files = [os.path.join(d, n) for d, _, names in os.walk(source) for n in names]
    else:
        files = glob.glob(source, recursive=True)
    if not paths.is_url(source):
        files = sorted(f for f in files if os.path.isfile(f))
    if not files:
        raise ConfigError(
            f"data.source={source!r}: no such file, directory or glob match; "
            f"pass a text file, a directory, a glob, a token-file header (.json) or 'stdlib'"
        )
    return files


def check_source(source: str) -> None:
    """The one-line ConfigError of a local data.source that matches nothing (URLs and stdlib are checked when read)."""
    if source != "stdlib" and not paths.is_url(source) and not glob.glob(source, recursive=True):
        _text_files(source)


def source_files(source: str) -> tuple[list, str]:
    """(files in a fixed order, the root their document names are relative to) of a text source or 'stdlib'."""
    if source == "stdlib":
        return _stdlib_files(), sysconfig.get_paths()["stdlib"]
    files = _text_files(source)
    if paths.is_url(source):
        root = source if paths.as_path(source).is_dir() else os.fspath(files[0].parent)
    else:
        root = source if os.path.isdir(source) else os.path.dirname(files[0])
    return files, root


def document_name(f, root: str) -> str:
    """The name a file's document is split by: its path relative to the source's root."""
    return os.fspath(f)[len(root) :].lstrip("/") if paths.is_url(f) else os.path.relpath(f, root)


def is_eval(name: str, fraction: float) -> bool:
    return zlib.crc32(name.encode()) / 2**32 < fraction


def hold_out_tail(train: np.ndarray, evals: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Too few documents to split by document (a split under 2 tokens): the tail of everything is held out."""
    if len(evals) >= 2 and len(train) >= 2:
        return train, evals
    everything = np.concatenate([train, evals])
    cut = int(len(everything) * (1 - fraction))
    return everything[:cut], everything[cut:]


def is_binary(raw: bytes) -> bool:
    """Not text: a NUL byte (no text file holds one; the byte tokenizer ends documents with it) or not UTF-8."""
    return b"\0" in raw or raw.decode("utf-8", "replace").encode() != raw  # invalid bytes became U+FFFD


def _read_documents(files: list, root: str, cfg_data, tok, skip_binary: bool = False) -> tuple[dict, int, int, int]:
    """({"train": ids, "eval": ids}, documents, bytes read, binary files skipped) of text files, each document ended by
    the tokenizer's end-of-document id; with `skip_binary` (a directory or glob), binary files are counted, not read."""
    parts = {"train": [], "eval": []}
    dtype = tok_lib.dtype_for(tok.vocab_size)
    total = skipped = 0
    for f in files:
        raw = paths.as_path(f).read_bytes()
        if not raw:
            continue
        if skip_binary and is_binary(raw):
            skipped += 1
            continue
        doc = tok_lib.encode_document(tok, raw).astype(dtype, copy=False)
        split = "eval" if is_eval(document_name(f, root), cfg_data.eval_fraction) else "train"
        parts[split] += [doc, np.array([tok.eos_id], dtype)]
        total += (len(doc) if tok.name == "byte" else len(raw)) + 1  # bytes read (byte files: less NULs)
        if cfg_data.max_bytes and total >= cfg_data.max_bytes:
            break
    if total == 0:
        what = f"all {skipped} files are binary (NUL bytes or not UTF-8)" if skipped else "the files are empty"
        raise ConfigError(f"data.source={cfg_data.source!r}: {what}; pass a non-empty text corpus")
    out = {k: np.concatenate(v) if v else np.zeros(0, dtype) for k, v in parts.items()}
    return out, (len(parts["train"]) + len(parts["eval"])) // 2, total, skipped


def read_token_header(header_path: str, tokenizer: str = "byte") -> dict:
    """A token file's header, checked: format, tokenizer (one line if another), and the sizes of its files."""
    try:
        header = json.loads(paths.read_text(header_path))
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"data.source={header_path!r}: not a readable token-file header ({e}); make one with tools/prepare_data.py"
        ) from None
    if header.get("format") != TOKEN_FILE_FORMAT:
        raise ConfigError(
            f"data.source={header_path!r}: not a {TOKEN_FILE_FORMAT} header; make one with tools/prepare_data.py"
        )
    tok_lib.check_header(tokenizer, header, header_path)
    base = paths.as_path(header_path).parent
    for split in ("train", "eval"):
        path = base / header[split]["file"]
        expected = header[split]["tokens"] * np.dtype(header["dtype"]).itemsize
        if not path.is_file() or path.stat().length != expected:
            raise ConfigError(
                f"data.source={header_path!r}: {path} is missing or not {expected} bytes; re-run tools/prepare_data.py"
            )
    return header


def _read_token_file(header_path: str, tokenizer: str) -> Corpus:
    header = read_token_header(header_path, tokenizer)
    base = paths.as_path(header_path).parent
    arrays = {}
    for split in ("train", "eval"):
        path, n = base / header[split]["file"], header[split]["tokens"]
        if paths.is_url(path):  # no memmap over an object store: the split is read into memory once
            arrays[split] = np.frombuffer(path.read_bytes(), dtype=header["dtype"])
        else:
            empty = np.zeros(0, header["dtype"])
            arrays[split] = np.memmap(path, dtype=header["dtype"], mode="r", shape=(n,)) if n else empty
    what = f"({header['train']['tokens'] / 1e6:.1f}M train tokens, {header.get('tokenizer', 'byte')})"
    return Corpus(arrays["train"], arrays["eval"], header["vocab_size"], f"token file {header_path} {what}")


class RecordTokens:
    """One split's token stream in ArrayRecord shards, read through grain's ArrayRecordDataSource: `len`, slices
    and `read(starts, length)` (a batch of windows: each record they span is read once)."""

    def __init__(self, files: list, tokens: int, record_tokens: int, dtype: str):
        self.files, self.tokens, self.record_tokens, self.dtype = files, tokens, record_tokens, np.dtype(dtype)
        self._source = None

    @property
    def source(self):
        if self._source is None:
            import grain

            self._source = grain.sources.ArrayRecordDataSource([os.fspath(f) for f in self.files])
        return self._source

    def __len__(self) -> int:
        return self.tokens

    def read(self, starts, length: int) -> np.ndarray:
        """[len(starts), length] tokens: row i is the stream's tokens [starts[i], starts[i] + length)."""
        C, starts = self.record_tokens, np.asarray(starts, np.int64)
        first, last = starts // C, (starts + length - 1) // C
        keys = sorted({int(k) for a, b in zip(first, last) for k in range(a, b + 1)})
        records = {k: self.source[k] for k in keys}  # one by one: __getitems__ starts a thread pool per call
        out = np.empty((len(starts), length), self.dtype)
        for row, (s, a, b) in enumerate(zip(starts, first, last)):
            span = np.concatenate([np.frombuffer(records[k], self.dtype) for k in range(a, b + 1)])
            out[row] = span[s - a * C : s - a * C + length]
        return out

    def __getitem__(self, index):
        start, stop, _ = index.indices(self.tokens)  # slices only (what the pipeline and the tools take)
        return self.read([start], stop - start)[0] if stop > start else np.zeros(0, self.dtype)

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self[:], dtype)


def record_manifest(source: str) -> str | None:
    """The manifest path of an ArrayRecord corpus that `source` names (its directory, or a glob or file of its
    *.array_record shards); None for any other source. Shards without a manifest: ConfigError (one line)."""
    shards = ".array_record" in os.path.basename(source)
    if not shards and (source == "stdlib" or source.endswith(".json") or glob.has_magic(source)):
        return None
    base = os.path.dirname(source) if shards else source
    path = paths.join(base, RECORD_MANIFEST)
    local_shards = not paths.is_url(source) and glob.glob(os.path.join(glob.escape(source), "*.array_record"))
    if not shards and not path.is_file() and not local_shards:
        return None  # a directory of text files
    if glob.has_magic(base) or not path.is_file():
        raise ConfigError(
            f"data.source={source!r}: no {RECORD_MANIFEST} in {base!r}; point data.source at a directory written by "
            f"tools/prepare_data.py --format=arrayrecord (or at its *.array_record shards)"
        )
    return os.fspath(path)


def read_record_manifest(path: str, tokenizer: str = "byte") -> dict:
    """An ArrayRecord corpus's manifest, checked: format, tokenizer (one line if another) and the shards' record
    counts (grain's data source reads each shard's footer)."""
    base = os.path.dirname(path)
    try:
        header = json.loads(paths.read_text(path))
        if not isinstance(header, dict) or header.get("format") != RECORD_FORMAT:
            raise ValueError(f"not a {RECORD_FORMAT} manifest")
        for split in ("train", "eval"):
            n, expected = len(record_tokens(header, split, base).source), header[split]["records"]
            if n != expected:
                raise ValueError(f"the {split} shards hold {n} records, not {expected}")
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:  # RuntimeError: array_record's
        raise ConfigError(
            f"data.source={base!r}: unreadable ArrayRecord corpus ({' '.join(str(e).split())}); "
            f"re-run tools/prepare_data.py --format=arrayrecord"
        ) from None
    tok_lib.check_header(tokenizer, header, base)
    return header


def record_tokens(header: dict, split: str, base: str) -> RecordTokens:
    files = [paths.join(base, name) for name in header[split]["files"]]
    return RecordTokens(files, header[split]["tokens"], header["record_tokens"], header["dtype"])


def read_corpus(cfg_data) -> Corpus:
    """The train and eval token streams of `data.source` (text, stdlib, a token file or ArrayRecord), unchecked."""
    manifest = record_manifest(cfg_data.source)
    if manifest is not None:
        header, base = read_record_manifest(manifest, cfg_data.tokenizer), os.path.dirname(manifest)
        train, evals = (record_tokens(header, split, base) for split in ("train", "eval"))
        what = f"ArrayRecord {base} ({header['train']['tokens'] / 1e6:.1f}M train tokens, {header['tokenizer']})"
        return Corpus(train, evals, header["vocab_size"], what)
    if cfg_data.source.endswith(".json"):
        return _read_token_file(cfg_data.source, cfg_data.tokenizer)
    tok = tok_lib.get(cfg_data.tokenizer)
    files, root = source_files(cfg_data.source)
    several = cfg_data.source not in ("stdlib", os.fspath(files[0]))  # a directory or glob: binary files skipped
    parts, n_docs, total, skipped = _read_documents(files, root, cfg_data, tok, several)
    train, evals = hold_out_tail(parts["train"], parts["eval"], cfg_data.eval_fraction)
    what = "byte tokens" if tok.name == "byte" else f"{(len(train) + len(evals)) / 1e6:.2f}M tokens of {tok.name}"
    what += f"; skipped {skipped} binary files (NUL bytes or not UTF-8)" if skipped else ""
    prefix = "Python stdlib sources: " if cfg_data.source == "stdlib" else ""
    return Corpus(train, evals, tok.vocab_size, f"{prefix}{n_docs} documents, {total / 1e6:.1f} MB, {what}")


def load_corpus(cfg: ml_collections.ConfigDict) -> Corpus:
    """Reads the corpus named by `data.source` and checks it against the tokenizer, model and sequence length."""
    d = cfg.data
    tok_lib.check_model_vocab(tok_lib.get(d.tokenizer), cfg.model.vocab_size)
    corpus = read_corpus(d)
    if corpus.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the data's vocabulary "
            f"({corpus.vocab_size}); set --config.model.vocab_size={corpus.vocab_size} or more"
        )
    for split in ("train", "eval"):
        n = len(getattr(corpus, split))
        if n < d.seq_len + 1:
            raise ConfigError(
                f"data.seq_len={d.seq_len} is longer than the {split} split ({n} tokens of "
                f"{d.source!r}); lower data.seq_len or use more data"
            )
    return corpus


# -- batches -------------------------------------------------------------------------------------------------------


class _Windows:
    """Random access to windows of seq_len + 1 tokens at stride seq_len."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len
        self.count = (len(tokens) - 1) // seq_len

    def rows(self, indices: np.ndarray) -> np.ndarray:
        T = self.seq_len
        if isinstance(self.tokens, RecordTokens):  # one read for the batch's records
            return self.tokens.read(np.asarray(indices) * T, T + 1).astype(np.int32)
        return np.stack([np.asarray(self.tokens[i * T : i * T + T + 1], dtype=np.int32) for i in indices])


def process_rows(global_batch: int, process_index: int, process_count: int) -> slice:
    if global_batch % process_count:
        raise ConfigError(
            f"train.batch_size={global_batch} does not divide over {process_count} processes; "
            f"make it a multiple of {process_count}"
        )
    per = global_batch // process_count
    return slice(process_index * per, (process_index + 1) * per)


def train_dataset(
    corpus: Corpus, cfg: ml_collections.ConfigDict, process_index: int = 0, process_count: int = 1
) -> grain.IterDataset:
    """Infinite iterator of {'tokens': int32 [local_batch, seq_len + 1]}; batch t depends only on (seed, t)."""
    import grain  # here: tools that only read or write token files (and their worker processes) skip its import

    windows = _Windows(corpus.train, cfg.data.seq_len)
    rows = process_rows(cfg.train.batch_size, process_index, process_count)
    ds = grain.MapDataset.range(windows.count).shuffle(seed=cfg.data.seed).repeat()
    ds = ds.batch(cfg.train.batch_size, drop_remainder=True, batch_fn=np.asarray)
    ds = ds.map(lambda idx: {"tokens": windows.rows(idx[rows])})
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))


def eval_batches(
    corpus: Corpus, cfg: ml_collections.ConfigDict, process_index: int = 0, process_count: int = 1
) -> list[dict]:
    """The fixed held-out batches (the first windows of the eval split, cycled if short)."""
    windows = _Windows(corpus.eval, cfg.data.seq_len)
    rows = process_rows(cfg.train.batch_size, process_index, process_count)
    B = cfg.train.batch_size
    out = []
    for step in range(cfg.train.eval_steps):
        idx = np.arange(step * B, (step + 1) * B) % windows.count
        out.append({"tokens": windows.rows(idx[rows])})
    return out


def token_header(tokenizer: str, vocab_size: int, source: str, description: str) -> dict:
    """A token file's header before its splits are added: format, dtype, vocabulary and tokenizer."""
    dtype, tok_fields = np.dtype(tok_lib.dtype_for(vocab_size)).name, tok_lib.header_fields(tokenizer)
    head = {"format": TOKEN_FILE_FORMAT, "dtype": dtype, "vocab_size": int(vocab_size), **tok_fields}
    return {**head, "source": source, "description": description}


def write_header(out: str, header: dict) -> None:
    """Writes `<out>.json` atomically: written last, a header always describes complete files."""
    paths.write_text_atomic(f"{out}.json", json.dumps(header, indent=2))


def write_token_file(cfg: ml_collections.ConfigDict, out: str) -> dict:
    """Tokenizes `data.source` in memory into `<out>.train.bin`, `<out>.eval.bin` and the header `<out>.json`
    (tools/prepare_data.py does the same for large corpora, in parallel and resumably)."""
    corpus = load_corpus(cfg)
    header = token_header(cfg.data.tokenizer, corpus.vocab_size, cfg.data.source, corpus.description)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    for split in ("train", "eval"):
        tokens = np.asarray(getattr(corpus, split), dtype=header["dtype"])
        path = f"{out}.{split}.bin"
        tokens.tofile(path + ".tmp")
        os.replace(path + ".tmp", path)
        header[split] = {"file": os.path.basename(path), "tokens": int(len(tokens))}
    write_header(out, header)
    return header


def write_record_dir(out: str, header: dict, splits: dict[str, np.ndarray]) -> dict:
    """Writes the token streams `splits` as the ArrayRecord corpus `out/`: shards, then the manifest (`header` plus
    format, record size and per split its files, tokens and records), into `out.partial/`, which then replaces
    `out` (an earlier `out` is moved aside first and deleted after). Returns the manifest."""
    from array_record.python.array_record_module import ArrayRecordWriter

    tmp, old, C = f"{out}.partial", f"{out}.old", RECORD_TOKENS
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    os.makedirs(tmp)
    header = {**header, "format": RECORD_FORMAT, "record_tokens": C}
    for split, tokens in splits.items():
        records = -(-len(tokens) // C)
        shards = max(1, -(-records // SHARD_RECORDS))
        files = [f"{split}-{i:05d}-of-{shards:05d}.array_record" for i in range(shards)]
        for i, name in enumerate(files):
            writer = ArrayRecordWriter(os.path.join(tmp, name), RECORD_OPTIONS)
            for r in range(i * SHARD_RECORDS, min((i + 1) * SHARD_RECORDS, records)):
                writer.write(np.ascontiguousarray(tokens[r * C : (r + 1) * C]).tobytes())
            writer.close()
        header[split] = {**header.get(split, {}), "files": files, "tokens": int(len(tokens)), "records": records}
    with open(os.path.join(tmp, RECORD_MANIFEST), "w") as fh:
        json.dump(header, fh, indent=2)
    if os.path.exists(out):
        os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return header
