"""Tokenizers (byte, BPE, SentencePiece, a local tiktoken rank file) round-trip; the model's vocabulary is derived or
checked against the tokenizer; prepare_data reads text, JSONL and Parquet, gives the same output for any process
count, and an interrupted run resumed gives byte-identical files; a BPE-tokenized corpus trains end to end."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import sysconfig
from contextlib import redirect_stdout

import numpy as np
import pytest
from conftest import one_device_mesh, tiny_config

from maxscale import config as config_lib
from maxscale.errors import ConfigError
from maxscale.tools import prepare
from maxscale.train import data, loop
from maxscale.train import tokenizers as tok_lib

pytest.importorskip("tokenizers")
pytest.importorskip("sentencepiece")

VOCAB0 = {"model.vocab_size": 0}  # derived from the tokenizer
SAMPLE = "def f(x):\n    return x  # héllo wörld ✓ 😀\n\n\tTabs,  double  spaces and a NUL-free \x01 char\n"


def _stdlib_texts(n_bytes: int) -> list[str]:
    """Python sources from the standard library (every machine has them): a corpus with no download."""
    root, texts, total = sysconfig.get_paths()["stdlib"], [], 0
    for name in sorted(os.listdir(root)):
        if name.endswith(".py") and total < n_bytes:
            texts.append(open(os.path.join(root, name), encoding="utf-8", errors="replace").read()[:20_000])
            total += len(texts[-1])
    return texts


@pytest.fixture(scope="module")
def trained_tokenizers(tmp_path_factory):
    """{kind: spec} of a 512-token BPE and SentencePiece model trained on 1 MB of stdlib sources."""
    base = tmp_path_factory.mktemp("tokenizers")
    texts = _stdlib_texts(1_000_000)
    return {kind: tok_lib.train(kind, iter(texts), 512, str(base / kind)) for kind in tok_lib.TRAINABLE}


def _tiktoken_file(path) -> str:
    """A local rank file (bytes, then a few merges) for `tiktoken:<path>`."""
    pytest.importorskip("tiktoken")
    tokens = [bytes([i]) for i in range(256)] + [b"re", b"turn", b"return", b" x", b"de", b"def"]
    path.write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(tokens)))
    return f"tiktoken:{path}"


def test_tokenizers_round_trip(trained_tokenizers, tmp_path):
    specs = ["byte", *trained_tokenizers.values(), _tiktoken_file(tmp_path / "tiny.tiktoken")]
    for spec in specs:
        tok = tok_lib.get(spec)
        ids = tok.encode(SAMPLE)
        assert tok.decode(ids) == SAMPLE, spec
        assert ids.max() < tok.vocab_size and 0 <= tok.eos_id < tok.vocab_size
        with_eos = np.concatenate([ids, [tok.eos_id], ids])
        assert tok.decode(with_eos) == SAMPLE + SAMPLE  # end-of-document ids decode to nothing
        assert tok_lib.num_bytes(tok, with_eos) == 2 * len(SAMPLE.encode()) + 1
        if spec != "byte":
            assert len(ids) < len(SAMPLE.encode())  # merges happened
    assert tok_lib.get(trained_tokenizers["bpe"]).vocab_size == 512
    # the same file elsewhere is the same tokenizer; a bad spec or missing file is one line
    bpe_path = trained_tokenizers["bpe"].partition(":")[2]
    shutil.copy(bpe_path, tmp_path / "copy.json")
    assert tok_lib.fingerprint(f"hf:{tmp_path / 'copy.json'}") == tok_lib.fingerprint(trained_tokenizers["bpe"])
    for bad, words in (("bpe:x.json", "is not a tokenizer"), ("hf:/no/such.json", "no such file"), ("byte:1", "not")):
        with pytest.raises(ConfigError, match=words) as e:
            tok_lib.parse(bad)
        assert "\n" not in str(e.value)


def test_vocab_is_derived_or_checked(trained_tokenizers, tmp_path):
    bpe = trained_tokenizers["bpe"]
    assert tiny_config(**{"model.vocab_size": 0}).model.vocab_size == 256
    cfg = tiny_config(**{"model.vocab_size": 0, "data.tokenizer": bpe, "data.seq_len": 16})
    assert cfg.model.vocab_size == 512  # 512 is already a multiple of 128
    assert tok_lib.padded_vocab(50257) == 50304
    with pytest.raises(ConfigError, match=r"model.vocab_size=256 is smaller than tokenizer .*vocabulary \(512\)"):
        data.load_corpus(tiny_config(**{"data.tokenizer": bpe}))
    with pytest.raises(ConfigError, match="is not a tokenizer"):
        tiny_config(**{"data.tokenizer": "gpt2"})
    # a token file made with one tokenizer is refused under another, in one line
    src = tmp_path / "docs"
    src.mkdir()
    (src / "a.txt").write_text(SAMPLE * 50)
    prepare.prepare(str(src), str(tmp_path / "bytes"), "byte")
    with pytest.raises(ConfigError, match="was tokenized with 'byte'") as e:
        data.load_corpus(tiny_config(**{"data.source": f"{tmp_path}/bytes.json", "data.tokenizer": bpe, **VOCAB0}))
    assert "\n" not in str(e.value)


def _mixed_source(root) -> None:
    """Text files (one large enough to be cut in pieces), a JSONL file (with a bad line) and a Parquet file."""
    texts = _stdlib_texts(600_000)
    root.mkdir()
    for i, text in enumerate(texts[:12]):
        (root / f"doc{i:02d}.txt").write_text(text)
    (root / "big.txt").write_text("".join(texts[12:]))
    lines = [json.dumps({"text": t[:3000], "id": i}) for i, t in enumerate(texts[:30])] + ["{not json"]
    (root / "records.jsonl").write_text("\n".join(lines) + "\n")
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    table = pa.table({"content": [t[-2000:] for t in texts[:40]]})
    pq.write_table(table, root / "rows.parquet", row_group_size=10)


def _files(prefix) -> dict:
    return {s: open(f"{prefix}.{s}.bin", "rb").read() for s in ("train", "eval")}


def test_prepare_data_interrupted_and_resumed_is_identical(trained_tokenizers, tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "PIECE_BYTES", 64 << 10)  # many small pieces: a large file is cut, units interleave
    src = tmp_path / "src"
    _mixed_source(src)
    bpe = trained_tokenizers["bpe"]
    kw = dict(tokenizer=bpe, eval_fraction=0.1, text_column="content")
    whole = prepare.prepare(str(src), str(tmp_path / "whole"), processes=2, **kw)  # worker processes
    assert whole["skipped_records"] == 1 and whole["train"]["documents"] > 40 and whole["eval"]["tokens"] > 0
    assert len(prepare.plan(str(src), text_column="content")) > 4
    # an earlier complete output under the same prefix stays intact while a new run is interrupted
    prepare.prepare(str(src), str(tmp_path / "cut"), "byte", 0.1, text_column="content", processes=1)
    before = _files(tmp_path / "cut")
    with pytest.raises(RuntimeError, match="fail_after"):
        prepare.prepare(str(src), str(tmp_path / "cut"), processes=1, fail_after=2, **kw)
    assert os.path.exists(f"{tmp_path}/cut.progress.json")
    assert data.read_token_header(f"{tmp_path}/cut.json")["tokenizer"] == "byte" and _files(tmp_path / "cut") == before
    with open(f"{tmp_path}/cut.train.bin.partial", "ab") as fh:  # a kill mid-append leaves tokens past the journal
        fh.write(b"\x07" * 1001)
    with pytest.raises(RuntimeError, match="fail_after"):  # a second interruption, resumed from the first
        prepare.prepare(str(src), str(tmp_path / "cut"), processes=1, fail_after=1, **kw)
    resumed = prepare.prepare(str(src), str(tmp_path / "cut"), processes=2, **kw)
    assert _files(tmp_path / "cut") == _files(tmp_path / "whole")
    same = lambda h: {k: v for k, v in h.items() if k not in ("train", "eval")}
    assert same(resumed) == same(whole) and resumed["eval"]["tokens"] == whole["eval"]["tokens"]
    assert not os.path.exists(f"{tmp_path}/cut.progress.json")
    assert prepare.prepare(str(src), str(tmp_path / "cut"), processes=1, **kw).get("up_to_date")
    # what was written is the documents' tokens: the JSONL records decode back to their text
    tok = tok_lib.get(bpe)
    corpus = data.load_corpus(tiny_config(**{"data.source": f"{tmp_path}/whole.json", "data.tokenizer": bpe, **VOCAB0}))
    text = tok.decode(np.concatenate([corpus.train, corpus.eval]))
    assert json.loads(open(src / "records.jsonl").readline())["text"][:200] in text


def test_bpe_corpus_trains_end_to_end_with_sample(trained_tokenizers, tmp_path):
    bpe = trained_tokenizers["bpe"]
    src = tmp_path / "src"
    src.mkdir()
    for i, text in enumerate(_stdlib_texts(200_000)):
        (src / f"{i:03d}.py").write_text(text)
    prepare.main([f"--source={src}", f"--out={tmp_path}/tokens", f"--tokenizer={bpe}", "--processes=1"])
    cfg = tiny_config(
        **{
            "data.source": f"{tmp_path}/tokens.json",
            "data.tokenizer": bpe,
            "model.vocab_size": 0,
            "model.width": 32,
            "model.ffn_size": 64,
            "data.seq_len": 32,
            "train.steps": 10,
            "train.eval_steps": 0,  # no eval compile (tests/test_export_eval.py evaluates a run)
            "train.sample_tokens": 24,
            "train.peak_flops": 1e11,
            "checkpoint.every": 10,
            "checkpoint.async_save": False,
        }
    )
    assert cfg.model.vocab_size == 512
    out = io.StringIO()
    with redirect_stdout(out):
        result = loop.Trainer(cfg, str(tmp_path / "run"), mesh=one_device_mesh(cfg)).run()
    assert np.isfinite(result["train/loss"]) and result["train/loss"] < np.log(512) + 0.5
    sample = out.getvalue().split("sample:\n", 1)[1]
    assert sample.startswith(cfg.train.sample_prompt) and len(sample) > len(cfg.train.sample_prompt) + 10
    saved = config_lib.from_json(open(tmp_path / "run" / "config.json").read())
    assert saved.data.tokenizer == bpe and saved.model.vocab_size == 512


def _shards(directory) -> dict:
    return {n: open(os.path.join(directory, n), "rb").read() for n in sorted(os.listdir(directory))}


def test_arrayrecord_trains_like_the_token_file_and_resumes(tmp_path, monkeypatch):
    from maxscale.train import step as step_lib

    monkeypatch.setattr(prepare, "PIECE_BYTES", 64 << 10)  # several work units
    monkeypatch.setattr(data, "RECORD_TOKENS", 1000)  # windows of 33 tokens that cross records
    monkeypatch.setattr(data, "SHARD_RECORDS", 64)  # several shards per split
    src = tmp_path / "src"
    src.mkdir()
    for i, text in enumerate(_stdlib_texts(300_000)):
        (src / f"{i:03d}.py").write_text(text)
    kw = dict(tokenizer="byte", eval_fraction=0.1, processes=1)
    prepare.prepare(str(src), str(tmp_path / "tok"), **kw)
    whole = prepare.prepare(str(src), str(tmp_path / "rec"), fmt="arrayrecord", **kw)
    assert len(whole["train"]["files"]) > 1 and whole["train"]["records"] > 64 and whole["eval"]["tokens"] > 0
    # an earlier complete output stays usable while a new run is interrupted, in tokenizing or in converting
    prepare.prepare(str(src), str(tmp_path / "cut"), "byte", 0.5, processes=1, fmt="arrayrecord")
    before = _shards(tmp_path / "cut")
    with pytest.raises(RuntimeError, match="fail_after"):
        prepare.prepare(str(src), str(tmp_path / "cut"), fail_after=2, fmt="arrayrecord", **kw)
    assert _shards(tmp_path / "cut") == before
    options = data.RECORD_OPTIONS
    monkeypatch.setattr(data, "RECORD_OPTIONS", "no_such_option:1")  # the conversion fails (as a full disk would)
    with pytest.raises(Exception):  # noqa: B017 - whatever array_record raises
        prepare.prepare(str(src), str(tmp_path / "cut"), fmt="arrayrecord", **kw)
    assert _shards(tmp_path / "cut") == before and os.path.exists(f"{tmp_path}/cut.progress.json")
    monkeypatch.setattr(data, "RECORD_OPTIONS", options)
    monkeypatch.setattr(prepare, "_work", None)  # resumed from the journal: nothing is tokenized again
    resumed = prepare.prepare(str(src), str(tmp_path / "cut"), fmt="arrayrecord", **kw)
    assert _shards(tmp_path / "cut") == _shards(tmp_path / "rec") and resumed == whole
    assert not [p for p in os.listdir(tmp_path) if p.startswith("cut.")]  # no journal, partial files or directory
    assert prepare.prepare(str(src), str(tmp_path / "cut"), fmt="arrayrecord", **kw).get("up_to_date")
    # the same batches, so the same losses, as the token file: from the directory and from a glob of its shards
    cfg = tiny_config(**{"data.source": f"{tmp_path}/tok.json", "model.width": 32, "data.seq_len": 32})
    setup = step_lib.Setup.build(cfg, one_device_mesh(cfg))

    def losses(corpus, steps=3):
        state, it, out = setup.init_state(), iter(data.train_dataset(corpus, cfg)), []
        for _ in range(steps):
            state, metrics = setup.train_step(state, setup.global_batch(next(it)["tokens"]))
            out.append(float(metrics["train/loss"]))
        return out

    expected = losses(data.load_corpus(cfg))
    for source in (f"{tmp_path}/rec", f"{tmp_path}/rec/*.array_record"):
        corpus = data.load_corpus(tiny_config(**{"data.source": source, "data.seq_len": 32}))
        assert isinstance(corpus.train, data.RecordTokens) and corpus.description.startswith("ArrayRecord")
        assert losses(corpus) == expected and np.isfinite(expected).all()
    # a damaged shard, shards without their manifest (also as a directory: never read as text files): one line
    with open(tmp_path / "cut" / whole["eval"]["files"][0], "r+b") as fh:
        fh.truncate(1000)
    with pytest.raises(ConfigError, match="unreadable ArrayRecord corpus .*re-run") as e:
        data.load_corpus(tiny_config(**{"data.source": f"{tmp_path}/cut"}))
    assert "\n" not in str(e.value)
    os.remove(tmp_path / "rec" / data.RECORD_MANIFEST)
    for source in (f"{tmp_path}/rec/*.array_record", f"{tmp_path}/rec"):
        with pytest.raises(ConfigError) as e:
            data.load_corpus(tiny_config(**{"data.source": source}))
        assert "\n" not in str(e.value) and data.RECORD_MANIFEST in str(e.value)
