"""
demo_references.py: what simpler coders get on the demo's validation text, for scripts/demo.py.

The compressors (zstd -22, xz -9e, xz given the training text) see the raw UTF-8 of the
validation documents, decoded from the shards; the unigram and Kneser-Ney bigram token models
are counted on the training tokens and scored target by target with train_gpt's byte accounting.
tests/test_demo_references.py checks them on inputs small enough to work by hand.
"""

from __future__ import annotations

import lzma
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
for folder in (REPO, REPO / "data"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import train_gpt  # noqa: E402
from prepare import BOS_ID  # noqa: E402  (the shards' document marker: data/prepare.py writes it)

ZSTD_REFERENCE_LEVEL = 22
XZ_PRESET = 9 | lzma.PRESET_EXTREME  # xz -9e
UNIGRAM_ADD_K = 0.5
BIGRAM_BASE_ADD_K = 0.5  # smoothing of the Kneser-Ney continuation distribution

# ----------------------------------------------------------------------------------------------
# References
# What the model's score means depends on what simpler coders get on the same text. The
# compressors see the raw UTF-8 of the validation documents (decoded from the shards, so the
# text is exactly what the model saw); the token models are scored like the model, target by
# target, with train_gpt's byte accounting (SPEC section 5).
# ----------------------------------------------------------------------------------------------


def split_documents(tokens: np.ndarray, bos_id: int = BOS_ID) -> list[np.ndarray]:
    """The token ids of each document: the runs after each BOS (and before the first, if any)."""
    tokens = np.asarray(tokens)
    starts = np.flatnonzero(tokens == bos_id)
    pieces = np.split(tokens, starts)
    docs = [pieces[0]] if pieces[0].size else []
    docs += [piece[1:] for piece in pieces[1:]]
    return docs


def documents_text(sp, tokens: np.ndarray, bos_id: int = BOS_ID) -> str:
    """The documents of a token stream as text: each decoded by the tokenizer, joined by newlines."""
    return "\n".join(sp.decode(doc.tolist()) for doc in split_documents(tokens, bos_id))


def zstd_size(data: bytes, level: int = ZSTD_REFERENCE_LEVEL) -> int:
    import zstandard

    return len(zstandard.ZstdCompressor(level=level).compress(data))


def xz_size(data: bytes) -> int:
    return len(lzma.compress(data, format=lzma.FORMAT_XZ, preset=XZ_PRESET))


def xz_size_given(context: bytes, data: bytes) -> int:
    """What data adds to an xz stream that already holds context: xz(context + data) - xz(context)."""
    return xz_size(context + data) - xz_size(context)


def unigram_bits(train_tokens: np.ndarray, targets: np.ndarray, vocab_size: int,
                 add_k: float = UNIGRAM_ADD_K) -> np.ndarray:
    """-log2 p(target) per target, p(t) = (count(t) + k) / (N + k V) over the training tokens."""
    counts = np.bincount(np.asarray(train_tokens, dtype=np.int64), minlength=vocab_size).astype(np.float64)
    probs = (counts + add_k) / (counts.sum() + add_k * vocab_size)
    return -np.log2(probs[np.asarray(targets, dtype=np.int64)])


def kneser_ney_discount(pair_counts: np.ndarray) -> float:
    """The usual estimate D = n1 / (n1 + 2 n2) from how many pair types occur once and twice."""
    n1, n2 = int((pair_counts == 1).sum()), int((pair_counts == 2).sum())
    if n1 == 0:
        return 0.5
    return float(np.clip(n1 / (n1 + 2 * n2), 0.05, 0.95))


def bigram_bits(train_tokens: np.ndarray, prev: np.ndarray, targets: np.ndarray, vocab_size: int,
                base_add_k: float = BIGRAM_BASE_ADD_K) -> tuple[np.ndarray, float]:
    """-log2 p(target | prev) per target under an interpolated Kneser-Ney bigram, and its discount D.

    p(t | p) = max(c(p, t) - D, 0) / c(p) + D * types(p, .) / c(p) * q(t), where q(t) is the
    continuation distribution (how many different tokens precede t, add-k smoothed so that no
    token has probability 0); a previous token never seen in training predicts with q alone.
    Pairs are counted sparsely, so the vocabulary may be large.
    """
    train = np.asarray(train_tokens, dtype=np.int64)
    V = vocab_size
    codes, pair_counts = np.unique(train[:-1] * V + train[1:], return_counts=True)
    discount = kneser_ney_discount(pair_counts)
    prev_totals = np.bincount(train[:-1], minlength=V).astype(np.float64)
    prev_types = np.bincount(codes // V, minlength=V).astype(np.float64)
    preceded_by = np.bincount(codes % V, minlength=V).astype(np.float64)
    continuation = (preceded_by + base_add_k) / (preceded_by.sum() + base_add_k * V)

    prev, targets = np.asarray(prev, dtype=np.int64), np.asarray(targets, dtype=np.int64)
    query = prev * V + targets
    where = np.minimum(np.searchsorted(codes, query), codes.size - 1)
    count = np.where(codes[where] == query, pair_counts[where], 0).astype(np.float64)
    total = prev_totals[prev]
    seen = total > 0
    safe_total = np.where(seen, total, 1.0)
    backoff_weight = np.where(seen, discount * prev_types[prev] / safe_total, 1.0)
    probs = np.where(seen, np.maximum(count - discount, 0.0) / safe_total, 0.0) \
        + backoff_weight * continuation[targets]
    return -np.log2(probs), discount


def bits_per_byte(bits: np.ndarray | float, byte_count: int) -> float:
    return float(np.sum(bits)) / byte_count


@dataclass
class References:
    val_targets: int
    val_token_bytes: int  # SPEC section 5 bytes of the scored targets
    val_text_bytes: int  # raw UTF-8 of the same documents, joined by newlines
    train_tokens: int
    train_text_bytes: int
    zstd_bytes: int
    xz_bytes: int
    xz_given_train_bytes: int
    unigram_bpb: float
    bigram_bpb: float
    bigram_discount: float
    seconds: float

    def bpb(self, compressed_bytes: int) -> float:
        return 8 * compressed_bytes / self.val_text_bytes


def load_train_tokens(data_path: str, vocab_size: int) -> np.ndarray:
    """Every training shard in name order, as train_gpt's TokenStream reads them."""
    shards = train_gpt.list_shards(data_path, "train")
    return np.concatenate([train_gpt.load_data_shard(p, vocab_size) for p in shards]).astype(np.int64)


def compute_references(data_path: str, tokenizer_path: str, vocab_size: int, seq_len: int,
                       say=print) -> References:
    """All reference figures on the validation stream the model is scored on (trimmed to whole
    sequences of seq_len, as train_gpt.load_validation_tokens does)."""
    started = time.perf_counter()
    sp = train_gpt.load_tokenizer(tokenizer_path, vocab_size)
    tables = train_gpt.build_byte_tables(sp)
    val = train_gpt.load_validation_tokens(data_path, vocab_size, seq_len)  # (N + 1,)
    prev, targets = val[:-1], val[1:]
    token_bytes = int(tables.target_bytes(prev, targets).sum())
    train = load_train_tokens(data_path, vocab_size)

    val_text = documents_text(sp, val.numpy()).encode("utf-8")
    train_text = documents_text(sp, train).encode("utf-8")
    say(f"reference_text val_targets:{targets.numel()} val_token_bytes:{token_bytes} "
        f"val_text_bytes:{len(val_text)} train_tokens:{train.size} train_text_bytes:{len(train_text)}")

    t0 = time.perf_counter()
    zstd_bytes = zstd_size(val_text)
    say(f"reference name:zstd_{ZSTD_REFERENCE_LEVEL} compressed_bytes:{zstd_bytes} "
        f"bpb:{8 * zstd_bytes / len(val_text):.8f} seconds:{time.perf_counter() - t0:.1f}")
    t0 = time.perf_counter()
    xz_bytes = xz_size(val_text)
    say(f"reference name:xz_9e compressed_bytes:{xz_bytes} bpb:{8 * xz_bytes / len(val_text):.8f} "
        f"seconds:{time.perf_counter() - t0:.1f}")
    t0 = time.perf_counter()
    given_bytes = xz_size_given(train_text + b"\n", val_text)
    say(f"reference name:xz_9e_given_train compressed_bytes:{given_bytes} "
        f"bpb:{8 * given_bytes / len(val_text):.8f} seconds:{time.perf_counter() - t0:.1f}")

    prev_np, targets_np = prev.numpy(), targets.numpy()
    unigram_bpb = bits_per_byte(unigram_bits(train, targets_np, vocab_size), token_bytes)
    say(f"reference name:unigram_add{UNIGRAM_ADD_K:g} bpb:{unigram_bpb:.8f}")
    bits, discount = bigram_bits(train, prev_np, targets_np, vocab_size)
    bigram_bpb = bits_per_byte(bits, token_bytes)
    say(f"reference name:bigram_kneser_ney bpb:{bigram_bpb:.8f} discount:{discount:.4f}")
    return References(int(targets.numel()), token_bytes, len(val_text), int(train.size), len(train_text), zstd_bytes,
                      xz_bytes, given_bytes, unigram_bpb, bigram_bpb, discount, time.perf_counter() - started)
