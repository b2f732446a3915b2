"""
prepare_throughput.py: how fast data/prepare.py turns text into shards.

    python bench/prepare_throughput.py                       # trains an sp1024 tokenizer first (untimed)
    python bench/prepare_throughput.py --tokenizer data/tokenizers/fineweb_1024_bpe.model --repeat 8

Times the encode-and-write stage (batched SentencePiece encoding, BOS insertion, shard writing
with sha256) on the built-in corpus, passed --repeat times, in a temporary folder. Collecting the
corpus and training the tokenizer happen before the clock starts. Prints key:value lines ending
with prepare_MB_per_s, megabytes (10^6) of UTF-8 text per second.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "data"))

import prepare  # noqa: E402
from builtin_corpus import builtin_documents  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--tokenizer", help="an existing .model (default: train one on the corpus, untimed)")
    parser.add_argument("--vocab-size", type=int, default=prepare.DEFAULT_VOCAB_SIZE)
    parser.add_argument("--repeat", type=int, default=4, help="passes over the corpus, for a steadier figure")
    parser.add_argument("--shard-tokens", type=int, default=prepare.DEFAULT_SHARD_TOKENS)
    args = parser.parse_args()

    documents, sha256 = builtin_documents()
    if args.tokenizer:
        sp = prepare.load_tokenizer_file(Path(args.tokenizer), args.vocab_size)
    else:
        model, _ = prepare.train_tokenizer(documents, args.vocab_size)
        sp = prepare.tokenizer_from_bytes(model)
    corpus = documents * args.repeat
    text_bytes = sum(len(doc.encode("utf-8")) for doc in corpus)
    print(f"corpus builtin sha256:{sha256} docs:{len(corpus)} MB:{text_bytes / 1e6:.2f} vocab:{sp.vocab_size()}")

    with tempfile.TemporaryDirectory() as out_dir:
        started = time.perf_counter()
        splits, _ = prepare.write_shards(corpus, sp, Path(out_dir), len(documents) // 10, args.shard_tokens)
        seconds = time.perf_counter() - started
    tokens = splits["val"]["tokens"] + splits["train"]["tokens"]
    print(f"prepare_bench tokens:{tokens} seconds:{seconds:.3f} tokens_per_s:{tokens / seconds:.0f} "
          f"bytes_per_token:{text_bytes / tokens:.3f}")
    print(f"prepare_speed MB_per_s:{text_bytes / 1e6 / seconds:.2f}")


if __name__ == "__main__":
    main()
