"""Tokenise UPMC Food-101 titles once, so runs need no tokenizer.

Writes ``bert_tokens_<layout>_<split>.npz`` (BERT token ids, padded to ``--max-length`` with id 0)
into the dataset folder, for every release split of the layout found there (public:
train/test; CGGM JSON: train/test and dev when present). The ``food101`` loader reads these files
whenever it is not given ``tokenizer_path``.

    python datasets/food101/prepare.py DATA/food101 --tokenizer /path/to/bert-base-uncased

``--tokenizer`` is a local folder holding ``vocab.txt`` (e.g. a saved ``bert-base-uncased``);
nothing is downloaded. See README.md in this folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mmbalance.datasets.food101 import LAYOUTS, write_token_cache
from mmbalance.errors import MMBalanceError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="the Food-101 dataset folder (public or CGGM JSON layout)")
    parser.add_argument("--tokenizer", required=True, help="local BERT tokenizer folder (vocab.txt)")
    parser.add_argument("--layout", default="auto", choices=LAYOUTS)
    parser.add_argument(
        "--max-length", type=int, default=50, help="tokens per title (default: %(default)s, as CGGM)"
    )
    args = parser.parse_args(argv)
    try:
        written = write_token_cache(args.folder, args.layout, args.tokenizer, args.max_length)
    except MMBalanceError as exc:
        print(f"prepare.py: error: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
