"""Tokenizers behind one small interface (`encode`, `decode`, `vocab_size`, `eos_id`, `name`), chosen by a spec string.

  byte                       UTF-8 bytes, 256 ids, NUL (0) separates documents (the default)
  tiktoken:<encoding>        a tiktoken encoding (gpt2, cl100k_base, o200k_base: fetched by tiktoken on first use) or
                             a local BPE rank file (`tiktoken:/path/x.tiktoken`, GPT-2's split pattern)
  sentencepiece:<model>      a SentencePiece model file (tools/train_tokenizer.py --kind=sentencepiece makes one)
  hf:<tokenizer.json>        a Hugging Face `tokenizers` file (tools/train_tokenizer.py --kind=bpe makes one)

The end-of-document id is the tokenizer's own: tiktoken's <|endoftext|>, SentencePiece's eos piece, and for a
tokenizer.json the `eos_token` of a tokenizer_config.json beside it, else the first of EOS_NAMES in its vocabulary.
Documents are encoded without special tokens: the corpus text is never parsed for them. The libraries are imported
on first use, so a byte-level run needs none of them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from typing import Protocol

import numpy as np

from maxscale.errors import ConfigError

KINDS = ("byte", "tiktoken", "sentencepiece", "hf")
EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>", "<|im_end|>")
VOCAB_MULTIPLE = 128  # a derived model.vocab_size is padded to this (shards over any power-of-two mesh axis)
# GPT-2's pre-tokenizer pattern (tiktoken's own for gpt2/r50k): used for local rank files
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class Tokenizer(Protocol):
    name: str  # the spec it was made from
    vocab_size: int  # ids are < vocab_size (the model's may be larger: padding)
    eos_id: int  # separates documents

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids) -> str: ...


class ByteTokenizer:
    name = "byte"
    vocab_size = 256
    eos_id = 0  # the byte tokenizer separates documents with NUL, which text files do not contain

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def decode(self, ids) -> str:
        data = bytes(int(i) for i in ids if 0 < int(i) < 256)
        return data.decode("utf-8", errors="replace")


class _Library:
    """The shared part of the library-backed tokenizers: `decode` drops ids out of range (padding) and decodes
    each document (between end-of-document ids) on its own, so a document decodes the same wherever it stands."""

    name: str
    vocab_size: int
    eos_id: int

    def decode(self, ids) -> str:
        docs, doc = [], []
        for i in map(int, ids):
            if i == self.eos_id:
                docs.append(doc)
                doc = []
            elif 0 <= i < self.vocab_size:
                doc.append(i)
        return "".join(self._decode(d) for d in [*docs, doc] if d)

    def _decode(self, ids: list[int]) -> str:
        raise NotImplementedError


class TiktokenTokenizer(_Library):
    def __init__(self, spec: str, arg: str):
        import tiktoken

        if os.path.isfile(arg):
            from tiktoken.load import load_tiktoken_bpe

            ranks = load_tiktoken_bpe(arg)
            base = os.path.basename(arg)
            eot = {"<|endoftext|>": max(ranks.values()) + 1}
            enc = tiktoken.Encoding(base, pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=eot)
        else:
            try:
                enc = tiktoken.get_encoding(arg)
            except ValueError:
                raise ConfigError(
                    f"data.tokenizer={spec!r}: unknown tiktoken encoding; use one of "
                    f"{', '.join(tiktoken.list_encoding_names())} or a path to a .tiktoken rank file"
                ) from None
        self.enc, self.name, self.vocab_size = enc, spec, enc.n_vocab
        self.eos_id = enc.eot_token

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.enc.encode_ordinary(text), dtype=np.uint32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(ids, np.uint32) for ids in self.enc.encode_ordinary_batch(texts)]

    def _decode(self, ids: list[int]) -> str:
        return self.enc.decode(ids)


class SentencePieceTokenizer(_Library):
    def __init__(self, spec: str, arg: str):
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor(model_file=arg)
        self.name, self.vocab_size, self.eos_id = spec, self.sp.get_piece_size(), self.sp.eos_id()
        if self.eos_id < 0:
            raise ConfigError(
                f"data.tokenizer={spec!r}: the model has no end-of-sentence piece; train it with one "
                f"(tools/train_tokenizer.py does, --eos_id=2)"
            )

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.sp.encode(text), dtype=np.uint32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(ids, np.uint32) for ids in self.sp.encode(texts)]

    def _decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


class HFTokenizer(_Library):
    def __init__(self, spec: str, arg: str):
        import tokenizers

        try:
            self.tok = tokenizers.Tokenizer.from_file(arg)
        except Exception as e:  # the library's own exception type; one line
            raise ConfigError(f"data.tokenizer={spec!r}: not a tokenizer.json ({' '.join(str(e).split())})") from None
        self.name, self.vocab_size = spec, self.tok.get_vocab_size(with_added_tokens=True)
        self.eos_token = _hf_eos_token(arg, self.tok.get_vocab(with_added_tokens=True))
        if self.eos_token is None:
            raise ConfigError(
                f"data.tokenizer={spec!r}: no end-of-document token (none of {', '.join(EOS_NAMES)}, and no "
                f"eos_token in a tokenizer_config.json beside it); add one, e.g. train with tools/train_tokenizer.py"
            )
        self.eos_id = self.tok.token_to_id(self.eos_token)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tok.encode(text, add_special_tokens=False).ids, dtype=np.uint32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, np.uint32) for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)


def _hf_eos_token(path: str, vocab: dict) -> str | None:
    config = os.path.join(os.path.dirname(os.path.abspath(path)), "tokenizer_config.json")
    if os.path.isfile(config):
        try:
            eos = json.load(open(config)).get("eos_token")
        except (OSError, ValueError):
            eos = None
        eos = eos.get("content") if isinstance(eos, dict) else eos
        if isinstance(eos, str) and eos in vocab:
            return eos
    return next((name for name in EOS_NAMES if name in vocab), None)


def parse(spec: str, need_file: bool = True) -> tuple[str, str]:
    """(kind, argument) of a spec; ConfigError (one line) for an unknown kind or (`need_file`) a missing file."""
    kind, _, arg = spec.partition(":")
    if kind not in KINDS or (kind == "byte") != (arg == ""):
        raise ConfigError(
            f"data.tokenizer={spec!r} is not a tokenizer; use byte, tiktoken:<encoding>, sentencepiece:<model file> "
            f"or hf:<tokenizer.json>"
        )
    if need_file and kind in ("sentencepiece", "hf") and not os.path.isfile(arg):
        raise ConfigError(f"data.tokenizer={spec!r}: no such file {arg!r}; pass the path of the tokenizer's file")
    return kind, arg


@functools.lru_cache(maxsize=16)
def get(spec: str) -> Tokenizer:
    """The tokenizer of a spec (cached: loaded once per process)."""
    kind, arg = parse(spec)
    if kind == "byte":
        return ByteTokenizer()
    return {"tiktoken": TiktokenTokenizer, "sentencepiece": SentencePieceTokenizer, "hf": HFTokenizer}[kind](spec, arg)


def spec_of(cfg) -> str:
    """A config's `data.tokenizer` ("byte" in configs saved before tokenizers were configurable)."""
    return cfg.data.get("tokenizer", "byte")


def of_config(cfg) -> Tokenizer:
    return get(spec_of(cfg))


def fingerprint(spec: str) -> str:
    """What identifies a tokenizer across machines: the name for byte and named tiktoken encodings, else the
    SHA-256 of its file (so the same file under another path matches, and an edited one does not)."""
    kind, arg = parse(spec)
    if kind == "byte" or (kind == "tiktoken" and not os.path.isfile(arg)):
        return spec
    with open(arg, "rb") as fh:
        return f"{kind}:sha256:{hashlib.sha256(fh.read()).hexdigest()[:16]}"


def padded_vocab(n: int, multiple: int = VOCAB_MULTIPLE) -> int:
    return -(-n // multiple) * multiple


def resolve_vocab(cfg) -> None:
    """config.resolve's part: the spec is valid, and model.vocab_size = 0 becomes the tokenizer's vocabulary
    padded to a multiple of 128 (256 for bytes). A set size is checked against the tokenizer when data loads, so a
    resolved config (tools, analysis) does not need the tokenizer's file."""
    parse(spec_of(cfg), need_file=False)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = padded_vocab(get(spec_of(cfg)).vocab_size)


def check_model_vocab(tok: Tokenizer, vocab_size: int) -> None:
    if tok.vocab_size > vocab_size:
        raise ConfigError(
            f"model.vocab_size={vocab_size} is smaller than tokenizer {tok.name}'s vocabulary ({tok.vocab_size}); "
            f"set --config.model.vocab_size=0 to derive {padded_vocab(tok.vocab_size)}"
        )


def header_fields(spec: str) -> dict:
    """What a token file's header records about its tokenizer."""
    tok, (kind, arg) = get(spec), parse(spec)
    named = f"{kind}:{os.path.abspath(arg)}" if kind in ("sentencepiece", "hf") else spec  # a path that works anywhere
    return {"tokenizer": named, "tokenizer_id": fingerprint(spec), "eos_id": int(tok.eos_id)}


def check_header(spec: str, header: dict, where: str) -> None:
    """A token file made with another tokenizer than `spec` is refused (one line). Headers before tokenizers were
    recorded ("tokenizer": "byte" only) are byte files."""
    recorded = header.get("tokenizer", "byte")
    recorded_id = header.get("tokenizer_id", recorded)
    if fingerprint(spec) != recorded_id:
        raise ConfigError(
            f"data.source={where!r} was tokenized with {recorded!r} ({recorded_id}), not data.tokenizer={spec!r}; "
            f"set --config.data.tokenizer={recorded} (or that file elsewhere) or re-run tools/prepare_data.py"
        )


def encode_document(tok: Tokenizer, raw: bytes) -> np.ndarray:
    """A document's ids from its file bytes: bytes as they are (NUL removed) for the byte tokenizer, else the
    UTF-8 text (invalid bytes replaced)."""
    if isinstance(tok, ByteTokenizer):
        return np.frombuffer(raw.replace(b"\0", b""), dtype=np.uint8)
    return tok.encode(raw.decode("utf-8", errors="replace"))


def num_bytes(tok: Tokenizer, ids) -> int:
    """UTF-8 bytes of the text that `ids` stand for, an end of document counting as one byte (bits per byte): for
    the byte tokenizer exactly len(ids); otherwise each document's decoded text."""
    ids = np.asarray(ids)
    if isinstance(tok, ByteTokenizer):
        return int(ids.size)
    ends = np.flatnonzero(ids == tok.eos_id)
    total, start = len(ends), 0
    for end in [*ends.tolist(), ids.size]:
        if end > start:
            total += len(tok.decode(ids[start:end]).encode("utf-8"))
        start = end + 1
    return total


def dtype_for(vocab_size: int):
    """The smallest unsigned dtype of a token file holding ids < vocab_size."""
    return np.uint8 if vocab_size <= 256 else np.uint16 if vocab_size <= 65536 else np.uint32


# -- training (tools/train_tokenizer.py) -------------------------------------------------------------------------------

TRAINABLE = ("bpe", "sentencepiece")


def train(kind: str, texts, vocab_size: int, out_dir: str) -> str:
    """Trains a tokenizer on an iterator of document texts into `out_dir`; returns its spec for `data.tokenizer`.

    bpe: byte-level BPE (Hugging Face `tokenizers`, GPT-2 style: lossless on any text) with <|endoftext|>, written
    as tokenizer.json + tokenizer_config.json (what transformers' AutoTokenizer reads). sentencepiece: a BPE model
    with byte fallback and no normalization (lossless too), eos piece id 2, written as tokenizer.model."""
    os.makedirs(out_dir, exist_ok=True)
    if kind == "bpe":
        from tokenizers import Tokenizer as HFTok
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tok = HFTok(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer)
        path = os.path.join(out_dir, "tokenizer.json")
        tok.save(path)
        write_hf_config(out_dir, "<|endoftext|>")
        return f"hf:{path}"
    if kind == "sentencepiece":
        import sentencepiece

        lines = (line for text in texts for line in text.split("\n") if line.strip())
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=lines,
            model_prefix=os.path.join(out_dir, "tokenizer"),
            vocab_size=vocab_size,
            model_type="bpe",
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            split_digits=True,
            character_coverage=0.9995,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            input_sentence_size=2_000_000,
            shuffle_input_sentence=True,
            minloglevel=2,
        )
        return f"sentencepiece:{os.path.join(out_dir, 'tokenizer.model')}"
    raise ConfigError(f"--kind={kind} is not supported; choose one of {', '.join(TRAINABLE)}")


def write_hf_config(out_dir: str, eos_token: str, max_length: int | None = None) -> None:
    """tokenizer_config.json beside a tokenizer.json: its end-of-document token (read here and by transformers)."""
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos_token, "add_bos_token": False}
    if max_length:
        config["model_max_length"] = max_length
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as fh:
        json.dump(config, fh, indent=2)
