"""Tokenizes a corpus once into a token file (numpy memmaps + JSON header) for `data.source=<out>.json`, or into
ArrayRecord shards (--format=arrayrecord: the directory OUT/, for `data.source=<out>`).

  python tools/prepare_data.py --source=stdlib|FILE|DIR|GLOB --out=data/corpus [--tokenizer=byte]
         [--text_field=text] [--text_column=text] [--eval_fraction=0.02] [--max_bytes=0] [--processes=0]
         [--format=tokens|arrayrecord]

Sources: text files (each file a document; a file over 8 MB is encoded in 8 MB pieces cut at line ends), JSONL
files (*.jsonl, *.jsonl.gz is not read: one document per line, the string at --text_field) and Parquet files
(*.parquet: one document per row, the string column --text_column, read with pyarrow), or a mix under a directory.
The split is by document, as the trainer's (a stable hash of the document's name: the file's relative path, plus
@<byte offset> of a JSONL line or #<row> of a Parquet row). The output is the same for any number of processes.

Safe to interrupt: the token files are written as OUT.{train,eval}.bin.partial with a journal OUT.progress.json
(pieces done, lengths), renamed into place and the header OUT.json written last, so only a complete corpus has a
header, and an earlier complete OUT stays usable until the new one replaces it. The same command resumes from the
journal (a changed source, tokenizer or option restarts from scratch); a complete OUT of the same inputs is kept.
--format=arrayrecord: the same tokens, journal and resumption; at the end the token streams are cut into records of
data.RECORD_TOKENS tokens, written as OUT.partial/{train,eval}-*.array_record with the manifest maxscale_tokens.json
last, and renamed to OUT/ (data.write_record_dir). An interrupted conversion is redone from the journal.
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import json
import multiprocessing
import os
import sys
import time

import numpy as np

from maxscale import cli
from maxscale.errors import ConfigError
from maxscale.train import data as data_lib
from maxscale.train import tokenizers as tok_lib

PIECE_BYTES = 8 << 20  # a unit of work: small files grouped up to this size, or one piece of a larger file
JOURNAL_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Piece:
    """A part of one file: `kind` text | jsonl (byte range [start, end)) | parquet (row group `start`, first row
    `end`). `last`: the end of a text document (its end-of-document id follows). `text_only`: a whole text file of
    a directory or glob, left out if binary (as the trainer's own reader does: maxscale/train/data.py)."""

    kind: str
    path: str
    name: str
    start: int
    end: int
    last: bool = True
    text_only: bool = False


def _kind(path: str) -> str:
    return "jsonl" if path.endswith((".jsonl", ".ndjson")) else "parquet" if path.endswith(".parquet") else "text"


def _cut_points(path: str, size: int) -> list[int]:
    """Offsets that split a file into pieces of about PIECE_BYTES, each just after a newline (else a UTF-8
    character boundary): fixed by the file alone, so the output does not depend on the process count."""
    cuts = [0]
    with open(path, "rb") as fh:
        while cuts[-1] + PIECE_BYTES < size:
            fh.seek(cuts[-1] + PIECE_BYTES)
            block = fh.read(1 << 20)
            nl = block.find(b"\n")
            step = nl + 1 if nl >= 0 else next(i for i, b in enumerate(block + b"\0") if b & 0xC0 != 0x80)
            cuts.append(min(cuts[-1] + PIECE_BYTES + step, size))
    return cuts + [size] if cuts[-1] < size else cuts


def _starts_binary(path: str) -> bool:
    """A large file of a directory corpus is judged by its first MiB (a NUL byte, or bytes that are not UTF-8 before
    a character cut at the end): the whole file would be read twice."""
    with open(path, "rb") as fh:
        head = fh.read(1 << 20)
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return True
    return b"\0" in head


def plan(source: str, max_bytes: int = 0, text_column: str = "text") -> list[list[Piece]]:
    """The units of work (lists of pieces) for a source, in document order, cut after max_bytes (at a file). In a
    directory or glob, binary files are left out, as the trainer leaves them out (one file named alone is read as
    it is)."""
    files, root = data_lib.source_files(source)
    several = source not in ("stdlib", os.fspath(files[0]))
    units, group, group_bytes, total = [], [], 0, 0
    for f in files:
        path, size = os.fspath(f), os.path.getsize(f)
        if size == 0:
            continue
        name, kind = data_lib.document_name(f, root), _kind(path)
        if kind == "parquet":
            import pyarrow.parquet as pq

            meta = pq.ParquetFile(path)
            if text_column not in meta.schema_arrow.names:
                raise ConfigError(
                    f"--text_column={text_column}: {path} has no such column; its columns: "
                    f"{', '.join(meta.schema_arrow.names)}"
                )
            first = 0
            for g in range(meta.num_row_groups):
                units.append([Piece(kind, path, name, g, first)])
                first += meta.metadata.row_group(g).num_rows
        elif size > PIECE_BYTES:
            if several and kind == "text" and _starts_binary(path):
                continue
            cuts = _cut_points(path, size)
            for a, b in zip(cuts[:-1], cuts[1:]):
                units.append([Piece(kind, path, name, a, b, last=b == size)])
        else:
            if group_bytes + size > PIECE_BYTES and group:
                units.append(group)
                group, group_bytes = [], 0
            group.append(Piece(kind, path, name, 0, size, text_only=several and kind == "text"))
            group_bytes += size
        total += size + 1
        if max_bytes and total >= max_bytes:
            break
    return units + [group] if group else units


# -- workers ---------------------------------------------------------------------------------------------------------

_WORKER: dict = {}


def _init_worker(tokenizer: str, eval_fraction: float, text_field: str, text_column: str) -> None:
    tok = tok_lib.get(tokenizer)
    dtype = tok_lib.dtype_for(tok.vocab_size)
    _WORKER.update(tok=tok, dtype=dtype, fraction=eval_fraction, field=text_field, column=text_column)
    _WORKER.update(skipped=0, binary_files=0)


def _documents(piece: Piece):
    """(name, text or raw bytes, ends a document) of a piece."""
    if piece.kind == "parquet":
        import pyarrow.parquet as pq

        table = pq.ParquetFile(piece.path).read_row_group(piece.start, columns=[_WORKER["column"]])
        for i, text in enumerate(table.column(0).to_pylist()):
            if isinstance(text, str) and text:
                yield f"{piece.name}#{piece.end + i}", text, True
        return
    with open(piece.path, "rb") as fh:
        fh.seek(piece.start)
        raw = fh.read(piece.end - piece.start)
    if piece.kind == "text":
        if piece.text_only and data_lib.is_binary(raw):
            _WORKER["binary_files"] += 1
        else:
            yield piece.name, raw, piece.last
        return
    offset = piece.start
    for line in raw.split(b"\n"):
        try:
            text = json.loads(line)[_WORKER["field"]] if line.strip() else None
        except (ValueError, KeyError, TypeError):  # a bad line or one without the field: left out, counted
            text = None
        if isinstance(text, str) and text:
            yield f"{piece.name}@{offset}", text, True
        elif line.strip():
            _WORKER["skipped"] = _WORKER.get("skipped", 0) + 1
        offset += len(line) + 1


def _work(unit: list[Piece]) -> dict:
    """Token ids of one unit, per split, end-of-document ids included; and counts."""
    tok, dtype, fraction = _WORKER["tok"], _WORKER["dtype"], _WORKER["fraction"]
    _WORKER["skipped"] = _WORKER["binary_files"] = 0
    out = {s: [] for s in ("train", "eval")}
    stats = {"train_docs": 0, "eval_docs": 0, "bytes": 0}
    docs = [d for piece in unit for d in _documents(piece)]
    stats["bytes"] = sum(len(t) if isinstance(t, bytes) else len(t.encode("utf-8")) for _, t, _ in docs)
    if tok.name == "byte":  # file bytes as they are (NULs removed); JSON/Parquet strings as UTF-8
        encoded = [tok_lib.encode_document(tok, t if isinstance(t, bytes) else t.encode("utf-8")) for _, t, _ in docs]
    else:
        texts = [t.decode("utf-8", errors="replace") if isinstance(t, bytes) else t for _, t, _ in docs]
        encoded = tok.encode_batch(texts) if texts else []  # batched: the library's own threads
    for (name, _, last), ids in zip(docs, encoded):
        split = "eval" if data_lib.is_eval(name, fraction) else "train"
        out[split].append(ids.astype(dtype, copy=False))
        if last:
            out[split].append(np.array([tok.eos_id], dtype))
            stats[f"{split}_docs"] += 1
    stats["skipped"], stats["binary_files"] = _WORKER["skipped"], _WORKER["binary_files"]
    return {"tokens": {s: np.concatenate(v) if v else np.zeros(0, dtype) for s, v in out.items()}, **stats}


# -- the run ---------------------------------------------------------------------------------------------------------


def _plan_id(units: list, options: dict) -> str:
    """Identifies what the output is made of: every piece with its file's size and mtime, and the options."""
    stamps = {p.path: [os.path.getsize(p.path), os.stat(p.path).st_mtime_ns] for u in units for p in u}
    text = json.dumps([JOURNAL_VERSION, options, [[dataclasses.astuple(p) for p in u] for u in units], stamps])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _is_complete(out: str, plan_id: str, tokenizer: str, fmt: str = "tokens") -> dict | None:
    records = fmt == "arrayrecord"
    path = os.path.join(out, data_lib.RECORD_MANIFEST) if records else f"{out}.json"
    if not os.path.isfile(path):
        return None
    try:
        header = (data_lib.read_record_manifest if records else data_lib.read_token_header)(path, tokenizer)
    except ConfigError:
        return None
    return header if header.get("plan") == plan_id else None


def _resume(out: str, plan_id: str, itemsize: int) -> dict:
    """The journal of an interrupted run of the same plan, its partial files truncated to what it recorded; else a
    fresh journal (partial files emptied)."""
    fresh = {"plan": plan_id, "units": 0, "train": 0, "eval": 0, "train_docs": 0, "eval_docs": 0, "bytes": 0}
    fresh["skipped"] = fresh["binary_files"] = 0
    try:
        journal = json.load(open(f"{out}.progress.json"))
        lengths_ok = all(os.path.getsize(f"{out}.{s}.bin.partial") >= journal[s] * itemsize for s in ("train", "eval"))
        ok = journal.get("plan") == plan_id and lengths_ok
    except (OSError, ValueError, KeyError, TypeError):
        ok = False
    journal = journal if ok else fresh
    for split in ("train", "eval"):
        with open(f"{out}.{split}.bin.partial", "ab") as fh:
            fh.truncate(journal[split] * itemsize)  # what a killed run appended after its journal is dropped
    return journal


def _save_journal(out: str, journal: dict) -> None:
    with open(f"{out}.progress.json.tmp", "w") as fh:
        json.dump(journal, fh)
    os.replace(f"{out}.progress.json.tmp", f"{out}.progress.json")


def _progress(done: int, total: int, journal: dict, started: float, start_bytes: int, final: bool = False) -> str:
    elapsed = max(time.perf_counter() - started, 1e-9)
    rate = (journal["bytes"] - start_bytes) / elapsed
    eta = (total - done) * elapsed / max(done - journal.get("_first", 0), 1)
    tokens = journal["train"] + journal["eval"]
    line = (
        f"prepare_data: {done}/{total} pieces  {journal['bytes'] / 1e6:,.1f} MB  {tokens / 1e6:,.2f}M tokens  "
        f"{rate / 1e6:.2f} MB/s  {tokens / max(journal['bytes'], 1):.3f} tokens/byte"
    )
    return line + ("" if final else f"  ETA {int(eta) // 60}:{int(eta) % 60:02d}")


def prepare(
    source: str,
    out: str,
    tokenizer: str = "byte",
    eval_fraction: float = 0.02,
    max_bytes: int = 0,
    text_field: str = "text",
    text_column: str = "text",
    processes: int = 0,
    log=None,
    fail_after: int = 0,
    fmt: str = "tokens",
) -> dict:
    """Writes OUT.json / OUT.train.bin / OUT.eval.bin (see the module doc); returns the header. `processes` 0 =
    one per CPU. `log(line)` gets progress lines. `fail_after` > 0 (tests): raise after that many units. `fmt`:
    tokens | arrayrecord (the directory OUT/ instead)."""
    itemsize = np.dtype(tok_lib.dtype_for(tok_lib.get(tokenizer).vocab_size)).itemsize  # a bad spec fails here
    units = plan(source, max_bytes, text_column)
    options = {"tokenizer": tok_lib.fingerprint(tokenizer), "eval_fraction": eval_fraction, "field": text_field}
    options["column"] = text_column
    plan_id = _plan_id(units, options)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    header = _is_complete(out, plan_id, tokenizer, fmt)
    if header is not None:
        return {**header, "up_to_date": True}
    journal = _resume(out, plan_id, itemsize)
    journal["_first"] = journal["units"]
    log = log or (lambda line: None)
    started, start_bytes, last_log = time.perf_counter(), journal["bytes"], 0.0
    todo = units[journal["units"] :]
    processes = max(1, min(processes or os.cpu_count() or 1, len(todo)))
    init_args = (tokenizer, eval_fraction, text_field, text_column)
    pool = None
    if processes > 1:  # spawn: no fork of a process that may hold threads (JAX, tokenizers)
        pool = multiprocessing.get_context("spawn").Pool(processes, _init_worker, init_args)
        results = pool.imap(_work, todo)
    else:
        _init_worker(*init_args)
        results = map(_work, todo)
    try:
        files = {s: open(f"{out}.{s}.bin.partial", "ab") for s in ("train", "eval")}
        for result in results:
            for split, fh in files.items():
                result["tokens"][split].tofile(fh)
                fh.flush()
                os.fsync(fh.fileno())
                journal[split] += len(result["tokens"][split])
            for key in ("train_docs", "eval_docs", "bytes", "skipped", "binary_files"):
                journal[key] = journal.get(key, 0) + result[key]
            journal["units"] += 1
            _save_journal(out, {k: v for k, v in journal.items() if not k.startswith("_")})
            if time.perf_counter() - last_log > 2.0 and journal["units"] < len(units):
                log(_progress(journal["units"], len(units), journal, started, start_bytes))
                last_log = time.perf_counter()
            if fail_after and journal["units"] - journal["_first"] >= fail_after:
                raise RuntimeError(f"prepare: stopped after {fail_after} units (fail_after, a test)")
        for fh in files.values():
            fh.close()
    finally:
        if pool is not None:
            pool.terminate()
    log(_progress(journal["units"], len(units), journal, started, start_bytes, final=True))
    return _finish(out, tokenizer, source, eval_fraction, journal, plan_id, fmt)


def _finish(out: str, tokenizer: str, source: str, eval_fraction: float, journal: dict, plan_id: str, fmt: str) -> dict:
    """Renames the partial files into place (or converts them to ArrayRecord) and writes the header last."""
    tok = tok_lib.get(tokenizer)
    if journal["train_docs"] + journal["eval_docs"] == 0:
        binary = journal.get("binary_files", 0)
        why = f"all {binary} files are binary" if binary else "empty files, or no --text_field / --text_column text"
        raise ConfigError(f"--source={source!r}: no documents ({why})")
    dtype = tok_lib.dtype_for(tok.vocab_size)
    lengths = [journal["train"], journal["eval"]]
    if min(lengths) < 2:  # too few documents to split by document: as the trainer does, hold out the tail
        tokens = [np.fromfile(f"{out}.{s}.bin.partial", dtype) for s in ("train", "eval")]
        for split, part in zip(("train", "eval"), data_lib.hold_out_tail(*tokens, eval_fraction)):
            part.tofile(f"{out}.{split}.bin.partial")
            journal[split] = len(part)
        _save_journal(out, {k: v for k, v in journal.items() if not k.startswith("_")})  # a rerun redoes no harm
    docs = journal["train_docs"] + journal["eval_docs"]
    description = f"{docs} documents, {journal['bytes'] / 1e6:.1f} MB, {tok.name}"
    if journal.get("binary_files"):
        description += f", skipped {journal['binary_files']} binary files"
    header = data_lib.token_header(tokenizer, tok.vocab_size, source, description)
    header["plan"] = plan_id
    splits = ("train", "eval")
    if fmt == "arrayrecord":
        header.update({s: {"documents": int(journal[f"{s}_docs"])} for s in splits}, bytes=int(journal["bytes"]))
        header["skipped_records"] = int(journal["skipped"])
        streams = {s: np.memmap(f"{out}.{s}.bin.partial", dtype, "r", shape=(journal[s],)) for s in splits}
        header = data_lib.write_record_dir(out, header, streams)
        for split in splits:
            os.remove(f"{out}.{split}.bin.partial")
        os.remove(f"{out}.progress.json")
        return header
    if os.path.exists(f"{out}.json"):
        os.remove(f"{out}.json")  # the old header must not describe the new files for a moment
    for split in splits:
        os.replace(f"{out}.{split}.bin.partial", f"{out}.{split}.bin")
        header[split] = {
            "file": os.path.basename(f"{out}.{split}.bin"),
            "tokens": int(journal[split]),
            "documents": int(journal[f"{split}_docs"]),
        }
    header["bytes"], header["skipped_records"] = int(journal["bytes"]), int(journal["skipped"])
    data_lib.write_header(out, header)
    os.remove(f"{out}.progress.json")
    return header


def iter_texts(source: str, text_field: str = "text", text_column: str = "text", max_bytes: int = 0):
    """The document texts of a source (as prepare reads them), one string per document piece."""
    _init_worker("byte", 0.5, text_field, text_column)
    for unit in plan(source, max_bytes, text_column):
        for piece in unit:
            for _, text, _ in _documents(piece):
                yield text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text


TRAIN_TOKENIZER_DOC = """Trains a tokenizer on a local corpus (text, JSONL or Parquet files, read as by prepare_data).

  python tools/train_tokenizer.py --source=DIR|FILE|GLOB --kind=bpe|sentencepiece --vocab_size=32000 --out=DIR
         [--text_field=text] [--text_column=text] [--max_bytes=0]

bpe: byte-level BPE (Hugging Face tokenizers) -> DIR/tokenizer.json (+ tokenizer_config.json), data.tokenizer=hf:...
sentencepiece: BPE with byte fallback -> DIR/tokenizer.model, data.tokenizer=sentencepiece:...
It prints the data.tokenizer value to use (docs/data.md).
"""


@cli.command("train_tokenizer")
def train_tokenizer_main(argv: list[str]) -> int:
    parser = cli.Parser("train_tokenizer", TRAIN_TOKENIZER_DOC)
    parser.add_argument("--source", required=True, help="a text/JSONL/Parquet file, a directory or a glob")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--kind", default="bpe", choices=tok_lib.TRAINABLE)
    parser.add_argument("--vocab_size", type=int, default=32000)
    parser.add_argument("--text_field", default="text")
    parser.add_argument("--text_column", default="text")
    parser.add_argument("--max_bytes", type=int, default=0, help="train on the first files up to this many bytes")
    args = parser.parse(argv)
    texts = iter_texts(args.source, args.text_field, args.text_column, args.max_bytes)
    spec = tok_lib.train(args.kind, texts, args.vocab_size, args.out)
    tok = tok_lib.get(spec)
    print(f"trained {args.kind} ({tok.vocab_size} tokens, end of document id {tok.eos_id}): data.tokenizer={spec}")
    return 0


@cli.command("prepare_data")
def main(argv: list[str]) -> int:
    import argparse

    parser = cli.Parser("prepare_data", __doc__)
    parser.add_argument("--source", required=True, help="stdlib, a text/JSONL/Parquet file, a directory or a glob")
    parser.add_argument("--out", required=True, help="output prefix: writes OUT.json, OUT.train.bin, OUT.eval.bin")
    parser.add_argument("--tokenizer", default="byte", help="byte | tiktoken:ENC | sentencepiece:FILE | hf:FILE")
    parser.add_argument("--text_field", default="text", help="JSONL: the field holding each document's text")
    parser.add_argument("--text_column", default="text", help="Parquet: the column holding each document's text")
    parser.add_argument("--eval_fraction", type=float, default=0.02)
    parser.add_argument("--max_bytes", type=int, default=0, help="stop after the file that reaches this many bytes")
    parser.add_argument("--processes", type=int, default=0, help="worker processes; 0 = one per CPU")
    parser.add_argument("--format", default="tokens", choices=("tokens", "arrayrecord"), help="OUT.json + .bin | OUT/")
    parser.add_argument("--fail_after", type=int, default=0, help=argparse.SUPPRESS)  # tests: interrupt
    args = parser.parse(argv)
    tty = sys.stderr.isatty()
    log = lambda line: print(("\r\033[K" + line) if tty else line, end="" if tty else "\n", file=sys.stderr)
    if not 0.0 < args.eval_fraction < 1.0:
        raise ConfigError(f"--eval_fraction={args.eval_fraction} must lie in (0, 1)")
    fields = (args.eval_fraction, args.max_bytes, args.text_field, args.text_column, args.processes)
    header = prepare(args.source, args.out, args.tokenizer, *fields, log, args.fail_after, args.format)
    if tty:
        print(file=sys.stderr)
    state = "up to date" if header.get("up_to_date") else "wrote"
    where = f"{args.out}/ (ArrayRecord)" if args.format == "arrayrecord" else f"{args.out}.json"
    print(
        f"{state} {where}: {header['train']['tokens']:,} train and {header['eval']['tokens']:,} eval "
        f"tokens ({header['dtype']}, vocab {header['vocab_size']}, {header['tokenizer']})"
    )
    return 0
