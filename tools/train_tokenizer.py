#!/usr/bin/env python3
"""Trains a BPE (Hugging Face tokenizers) or SentencePiece tokenizer on a local corpus for `data.tokenizer`.

python tools/train_tokenizer.py --source=DIR|FILE|GLOB --kind=bpe|sentencepiece --vocab_size=32000 --out=DIR
  (the logic: maxscale/train/tokenizers.py `train`, flags in maxscale/tools/prepare.py; docs/data.md)

The same command: `maxscale train-tokenizer ...` (maxscale/__main__.py).
"""

import sys

from maxscale.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["train-tokenizer", *sys.argv[1:]]))
