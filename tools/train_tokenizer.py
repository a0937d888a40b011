"""Trains a BPE (Hugging Face tokenizers) or SentencePiece tokenizer on a local corpus for `data.tokenizer`.

python tools/train_tokenizer.py --source=DIR|FILE|GLOB --kind=bpe|sentencepiece --vocab_size=32000 --out=DIR
  (the logic: maxscale/train/tokenizers.py `train`, flags in maxscale/tools/prepare.py; docs/data.md)
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from maxscale.tools import prepare  # noqa: E402

if __name__ == "__main__":
    sys.exit(prepare.train_tokenizer_main())
