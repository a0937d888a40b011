"""Data: deterministic batches, per-process shares of one global batch, saved/restored iterator state, splits."""

import json
import subprocess
import sys

import numpy as np
from conftest import ROOT, tiny_config

from maxscale.train import data


def take(it, n):
    return [next(it)["tokens"] for _ in range(n)]


def test_batches_are_deterministic_and_shaped(tiny_corpus):
    cfg = tiny_config()
    a = take(iter(data.train_dataset(tiny_corpus, cfg)), 3)
    b = take(iter(data.train_dataset(tiny_corpus, cfg)), 3)
    assert a[0].shape == (cfg.train.batch_size, cfg.data.seq_len + 1) and a[0].dtype == np.int32
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    other = take(iter(data.train_dataset(tiny_corpus, tiny_config(**{"data.seed": 1}))), 1)
    assert not np.array_equal(other[0], a[0])


def test_processes_read_disjoint_rows_of_the_same_global_batch(tiny_corpus):
    cfg = tiny_config()
    whole = take(iter(data.train_dataset(tiny_corpus, cfg)), 2)
    parts = [take(iter(data.train_dataset(tiny_corpus, cfg, p, 4)), 2) for p in range(4)]
    for step in range(2):
        np.testing.assert_array_equal(np.concatenate([parts[p][step] for p in range(4)]), whole[step])
        assert parts[0][step].shape[0] == cfg.train.batch_size // 4


def test_iterator_state_restores_exactly(tiny_corpus):
    cfg = tiny_config()
    it = iter(data.train_dataset(tiny_corpus, cfg))
    take(it, 5)
    state = it.get_state()
    expect = take(it, 3)
    fresh = iter(data.train_dataset(tiny_corpus, cfg))
    fresh.set_state(json.loads(json.dumps(state)))
    for x, y in zip(take(fresh, 3), expect):
        np.testing.assert_array_equal(x, y)


def test_document_split_holds_out_whole_files(tmp_path):
    for i in range(40):
        (tmp_path / f"doc{i:02d}.txt").write_text(f"<{i:02d}>" + "lorem ipsum " * 30)
    cfg = tiny_config(**{"data.source": str(tmp_path), "data.eval_fraction": 0.25, "data.seq_len": 16})
    corpus = data.load_corpus(cfg)
    text = lambda a: bytes(a.astype(np.uint8)).decode()
    train_ids = {t[1:3] for t in text(corpus.train).split("\0") if t}
    eval_ids = {t[1:3] for t in text(corpus.eval).split("\0") if t}
    assert train_ids and eval_ids and not (train_ids & eval_ids)
    assert len(train_ids | eval_ids) == 40


def test_token_file_from_prepare_data(tmp_path):
    src = tmp_path / "corpus"
    src.mkdir()
    for i in range(20):
        (src / f"f{i}.txt").write_text("hello world\n" * (50 + i))
    out = tmp_path / "tokens"
    proc = subprocess.run(
        [sys.executable, "tools/prepare_data.py", f"--source={src}", f"--out={out}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    header = json.load(open(f"{out}.json"))
    cfg = tiny_config(**{"data.source": f"{out}.json", "data.seq_len": 16})
    corpus = data.load_corpus(cfg)
    assert len(corpus.train) == header["train"]["tokens"] and corpus.vocab_size == 256
    text_corpus = data.load_corpus(tiny_config(**{"data.source": str(src), "data.seq_len": 16}))
    np.testing.assert_array_equal(np.asarray(corpus.train), text_corpus.train)


def test_tokenizer_round_trip():
    tok = data.ByteTokenizer()
    assert tok.decode(tok.encode("héllo\n")) == "héllo\n"
