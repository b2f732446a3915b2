"""
correction_table.py: the error-correction table of SPEC section 9 — its byte format (the codec), the
choice of its entries (selection) and the boost arithmetic that applies it (which the causal hint
cache, causal_hints.py, shares). numpy only: no torch, no settings, no other script.

    blob = encode_table(positions, tokens, vocab_size=V, val_length=N, fingerprint=val_fingerprint(val))
    table = decode_table(blob, expect_vocab_size=V, expect_val_length=N, expect_fingerprint=...)

Selection lives here, below both scripts that use it: eval_final.py applies it inline and
build_correction_table.py's builder scores through eval_final.py, so anywhere higher would make an
import cycle. What an entry saves is the evaluation's arithmetic (eval_final.saved_bits); this
module only weighs that against what the entry costs in bytes.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import struct
import zlib
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

# ----- Table codec -----
# The table travels inside the artifact, so every byte of it counts against the score.
# This section turns (position, token) entries into bytes and back, refuses any table that
# does not belong to the validation stream at hand, and says what an entry costs to store.

TABLE_MAGIC = b"PGCT"
TABLE_FORMAT_VARINT = 1   # the seed's format: a varint gap, then a varint token id, per entry
TABLE_FORMAT_COMPACT = 2  # ours: Huffman-coded gap buckets and token ids, bit-packed
TABLE_FORMATS = (TABLE_FORMAT_VARINT, TABLE_FORMAT_COMPACT)

# Header, little-endian: magic, format, vocab size, validation length, validation fingerprint,
# entry count, body length in bytes, then a CRC-32 of the header's other fields and the body.
TABLE_HEADER = struct.Struct("<4sBIQ16sQQI")
HEADER_BYTES_BEFORE_CRC = TABLE_HEADER.size - 4
FINGERPRINT_BYTES = 16

MAX_VOCAB_SIZE = 65536     # token ids must fit the uint16 that the fingerprint hashes
MAX_VAL_LENGTH = 2 ** 40   # keeps every gap within 41 bits, so every bit-field fits in 64 bits

# Both formats store gap_i = position_i - position_(i-1) with position_(-1) = -1: the first gap
# is position_0 + 1, and every gap is at least 1.

# Why format 2 looks the way it does. Measured in bits per entry on the real-text test (1,135
# entries: the 1.5% of positions an add-one bigram model finds hardest in SentencePiece-1024
# tokens of the Python docs) and on synthetic tables at 1.5% density (uniform positions,
# tokens resampled from the real ones):
#   gaps    Golomb-Rice, best k                    7.62 real    7.63 on 1M synthetic
#           Huffman over gap buckets, m = 0..3     7.47-7.52    7.55-7.61  (code lengths included)
#           a random subset's entropy              7.48         7.49
#   tokens  fixed width                            10.0
#           canonical Huffman                      7.32 + 1.48 for its code lengths on 1,135;
#                                                  7.32 + 0.002 on 1M (entropy 7.29)
#           adaptive bit-tree, counting estimator  8.30 on 1,135; 7.30 on 300k (ideal code length)
#           adaptive bit-tree, shift-5 estimator   8.84 on 1,135; 7.43 on 300k (ideal code length)
# Real gaps are bursty (median 33, mean 66). A Huffman code over gap buckets follows that shape
# where Golomb-Rice cannot, and caps a huge gap at ~40 bits where Rice's unary part grows with
# the gap. For tokens, only the counting adaptive coder beats Huffman: by 0.5 bits an entry on
# small tables and 0.02 at the seed's size (~900k entries), where the table matters. It would
# need a range coder stepping one bit at a time in Python, several seconds per million entries
# each way, against about one for the vectorised Huffman coder here. Whole table, header
# included: 2.08 bytes an entry on the real text, 1.86 on the 1M synthetic table.
MAX_CODE_LENGTH = 24               # longest Huffman code word for gap buckets and token ids
GAP_MANTISSA_CHOICES = (0, 1, 2, 3)  # m, picked per table for the fewest bits
GAP_MANTISSA_FIELD_BITS = 2
MAX_GAP_BIT_LENGTH = MAX_VAL_LENGTH.bit_length()  # 41
# Token ids are Huffman-coded unless fixed-width ids come out smaller, as they do for a few
# thousand entries over a 65536-token vocabulary, where the code lengths would cost too much.
TOKEN_CODE_FIELD_BITS = 1
TOKEN_CODE_HUFFMAN = 0
TOKEN_CODE_FIXED_WIDTH = 1

# A list of code lengths is itself stored as Huffman-coded items of a small "length alphabet":
# symbol s < ZERO_RUN_SYMBOLS is a run of zero lengths whose count has bit length s + 1 (the
# count's lower s bits follow raw); symbol ZERO_RUN_SYMBOLS + l - 1 is one code length l.
ZERO_RUN_SYMBOLS = MAX_VOCAB_SIZE.bit_length()  # 17: a run may span the whole vocabulary
LENGTH_ALPHABET_SIZE = ZERO_RUN_SYMBOLS + MAX_CODE_LENGTH
MAX_LENGTH_CODE_LENGTH = 7         # the length alphabet's own code lengths, 3 bits each
LENGTH_CODE_LENGTH_BITS = 3
LENGTH_SYMBOL_COUNT_BITS = 6       # how many length-alphabet symbols have a stored length
LENGTH_ITEM_COUNT_BITS = 17        # items in one list: at most its alphabet size, 65536


class CorrectionTableError(ValueError):
    """A correction table (or the input for one) that cannot be used, and what to do about it."""

    def __init__(self, source: str, problem: str, fix: str):
        super().__init__(f"{source}: {problem}; {fix}.")


@dataclass(frozen=True)
class CorrectionTable:
    positions: np.ndarray  # int64, strictly increasing target positions in the validation stream
    tokens: np.ndarray     # int64, the correct token id at each of those positions
    vocab_size: int
    val_length: int
    fmt: int
    fingerprint: bytes


def val_fingerprint(val_tokens: np.ndarray) -> bytes:
    """16 bytes that identify a validation stream: SHA-256 of its length and uint16 tokens."""
    tokens = np.asarray(val_tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= MAX_VOCAB_SIZE):
        raise CorrectionTableError("validation tokens", f"ids must lie in [0, {MAX_VOCAB_SIZE})",
                                   "pass the token ids of the validation shards")
    digest = hashlib.sha256(struct.pack("<Q", tokens.size))
    digest.update(tokens.astype("<u2").tobytes())
    return digest.digest()[:FINGERPRINT_BYTES]


# --- bit packing --------------------------------------------------------------------------

class _BitWriter:
    """Collects bit-fields (arrays of values with their widths) and packs them MSB first."""

    def __init__(self):
        self._values: list[np.ndarray] = []
        self._widths: list[np.ndarray] = []
        self.bit_count = 0

    def add(self, values, widths) -> None:
        values = np.asarray(values, dtype=np.uint64).ravel()
        widths = np.broadcast_to(np.asarray(widths, dtype=np.int64), values.shape)
        self._values.append(values)
        self._widths.append(widths)
        self.bit_count += int(widths.sum())

    def to_bytes(self) -> bytes:
        if not self._values:
            return b""
        values = np.concatenate(self._values)
        widths = np.concatenate(self._widths)
        keep = widths > 0
        values, widths = values[keep], widths[keep]
        bit_chunks = []
        # Spelling every field out bit by bit takes several bytes per bit, so go in slices.
        fields_per_slice = 1 << 20
        for lo in range(0, values.size, fields_per_slice):
            slice_values = values[lo:lo + fields_per_slice]
            slice_widths = widths[lo:lo + fields_per_slice]
            field_ends = np.cumsum(slice_widths)
            bit_index = np.arange(field_ends[-1], dtype=np.int64)
            shifts = (np.repeat(field_ends, slice_widths) - 1 - bit_index).astype(np.uint64)
            bits = (np.repeat(slice_values, slice_widths) >> shifts) & np.uint64(1)
            bit_chunks.append(bits.astype(np.uint8))
        return np.packbits(np.concatenate(bit_chunks)).tobytes()


class _BitReader:
    """Random access to the bits of a byte string, many fields at once."""

    def __init__(self, data: bytes):
        self.bit_count = 8 * len(data)
        padded = np.frombuffer(bytes(data) + bytes(8), dtype=np.uint8)
        # words[i] holds bytes i..i+7 big-endian, so a field of up to 57 bits starting in byte i
        # is two shifts away; the last word is all padding, i.e. zero.
        self._words = np.ndarray(shape=(len(data) + 1,), dtype=">u8", buffer=padded,
                                 strides=(1,)).astype(np.uint64)

    def read(self, bit_offsets, widths) -> np.ndarray:
        """The unsigned values of the fields at these offsets; bits past the end read as 0."""
        bit_offsets = np.asarray(bit_offsets, dtype=np.int64)
        widths = np.broadcast_to(np.asarray(widths, dtype=np.int64), bit_offsets.shape)
        word_index = np.minimum(bit_offsets >> 3, self._words.size - 1)
        aligned = self._words[word_index] << (bit_offsets & 7).astype(np.uint64)
        shifted = aligned >> (64 - np.maximum(widths, 1)).astype(np.uint64)
        return np.where(widths > 0, shifted, np.uint64(0))

    def read_field(self, bit_offset: int, width: int) -> int:
        return int(self.read(np.array([bit_offset]), width)[0])


class _MalformedBody(Exception):
    """Raised by the body decoders; decode_table turns it into a CorrectionTableError."""


# --- canonical prefix codes ---------------------------------------------------------------

def _huffman_code_lengths(counts: np.ndarray, max_length: int) -> np.ndarray:
    """Huffman code lengths for these symbol counts (0 for absent symbols), none above max_length.

    When the optimal code is too deep, the counts are halved (keeping every present symbol)
    and the code rebuilt: the flatter distribution gives a shallower tree.
    """
    counts = np.asarray(counts, dtype=np.int64)
    while True:
        lengths = _unlimited_huffman_code_lengths(counts)
        if lengths.max(initial=0) <= max_length:
            return lengths
        counts = np.where(counts > 0, (counts + 1) // 2, 0)


def _unlimited_huffman_code_lengths(counts: np.ndarray) -> np.ndarray:
    lengths = np.zeros(counts.size, dtype=np.int64)
    present = np.flatnonzero(counts)
    if present.size == 1:
        lengths[present] = 1
        return lengths
    # Leaves are nodes 0..k-1 and each merge creates the next node, so a parent's id is larger
    # than its children's and depths can be filled in walking the ids downwards.
    heap = [(int(count), node) for node, count in enumerate(counts[present])]
    heapq.heapify(heap)
    parent = [0] * (2 * present.size - 1)
    next_node = present.size
    while len(heap) > 1:
        count_a, node_a = heapq.heappop(heap)
        count_b, node_b = heapq.heappop(heap)
        parent[node_a] = parent[node_b] = next_node
        heapq.heappush(heap, (count_a + count_b, next_node))
        next_node += 1
    depth = [0] * next_node
    for node in range(next_node - 2, -1, -1):
        depth[node] = depth[parent[node]] + 1
    lengths[present] = depth[:present.size]
    return lengths


class _PrefixCode:
    """The canonical prefix code for a list of code lengths (index = symbol, 0 = unused).

    Code words go out in order of (length, symbol). Left-aligned to the longest length they
    tile [0, 2**width) from 0 upwards, so a word's left-aligned start is the running Kraft sum
    of the words before it, and decoding a window of `width` bits is a binary search.
    """

    def __init__(self, lengths: np.ndarray):
        lengths = np.asarray(lengths, dtype=np.int64)
        used = np.flatnonzero(lengths)
        if used.size == 0:
            raise _MalformedBody("one of its codes has no code words")
        self.lengths = lengths
        self.symbols_in_order = used[np.lexsort((used, lengths[used]))]
        self.lengths_in_order = lengths[self.symbols_in_order]
        self.width = int(self.lengths_in_order.max())
        spans = np.left_shift(1, self.width - self.lengths_in_order)
        self.left_starts = np.cumsum(spans) - spans
        self.kraft_total = int(spans.sum())
        if self.kraft_total > 1 << self.width:
            raise _MalformedBody("its code lengths do not form a prefix code")
        self.words = np.zeros(lengths.size, dtype=np.uint64)
        self.words[self.symbols_in_order] = self.left_starts >> (self.width - self.lengths_in_order)

    def lookup(self, windows: np.ndarray):
        """For left-aligned windows of `width` bits: (symbols, code lengths, valid mask)."""
        windows = windows.astype(np.int64)
        valid = windows < self.kraft_total  # beyond it lie no code words (incomplete codes)
        rank = np.where(valid, np.searchsorted(self.left_starts, windows, side="right") - 1, 0)
        return self.symbols_in_order[rank], self.lengths_in_order[rank], valid


class _CodedItems(NamedTuple):
    """A run of items, each the code word of its symbol followed by some raw extra bits."""
    code: _PrefixCode
    symbols: np.ndarray
    extra_values: np.ndarray
    extra_widths: np.ndarray

    def bit_widths(self) -> np.ndarray:
        return self.code.lengths[self.symbols] + self.extra_widths

    def write(self, writer: _BitWriter) -> None:
        extra_widths = np.asarray(self.extra_widths, dtype=np.uint64)
        words = self.code.words[self.symbols]
        values = (words << extra_widths) | self.extra_values.astype(np.uint64)
        writer.add(values, self.bit_widths())


def _items_without_extra_bits(code: _PrefixCode, symbols: np.ndarray) -> _CodedItems:
    return _CodedItems(code, symbols, np.zeros(symbols.size, dtype=np.uint64),
                       np.zeros(symbols.size, dtype=np.int64))


def _decode_items(reader: _BitReader, start: int, count: int, code: _PrefixCode,
                  extra_bits_of_symbol: np.ndarray):
    """Read `count` items written by _CodedItems.write, from bit `start` on.

    Where the next item begins depends only on the bits where this one begins, so that step is
    computed for every bit offset at once with numpy; a plain loop then just hops from item to
    item. Returns (symbols, extra values, bit offset after the last item).
    """
    if count == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.uint64), start
    widest_item = code.width + int(extra_bits_of_symbol.max())
    region_end = min(reader.bit_count, start + count * widest_item)
    if region_end <= start:
        raise _MalformedBody("it ends before its entries")
    step_chunks = []
    offsets_per_chunk = 1 << 22
    for lo in range(start, region_end, offsets_per_chunk):
        offsets = np.arange(lo, min(lo + offsets_per_chunk, region_end), dtype=np.int64)
        symbols, lengths, valid = code.lookup(reader.read(offsets, code.width))
        steps = np.where(valid, lengths + extra_bits_of_symbol[symbols], 0)
        step_chunks.append(steps.astype(np.uint8))  # at most 24 + 40 bits
    steps = np.concatenate(step_chunks).tobytes()
    item_starts = [0] * count
    hop = 0
    try:
        for item in range(count):
            item_starts[item] = hop
            step = steps[hop]
            if step == 0:
                raise _MalformedBody("it holds a bit pattern that is no code word")
            hop += step
    except IndexError:
        raise _MalformedBody("its entries run past its end") from None
    if start + hop > reader.bit_count:
        raise _MalformedBody("its entries run past its end")
    offsets = np.asarray(item_starts, dtype=np.int64) + start
    symbols, lengths, _ = code.lookup(reader.read(offsets, code.width))
    extra_values = reader.read(offsets + lengths, extra_bits_of_symbol[symbols])
    return symbols, extra_values, start + hop


# --- lists of code lengths ----------------------------------------------------------------

_EXTRA_BITS_OF_LENGTH_SYMBOL = np.concatenate([np.arange(ZERO_RUN_SYMBOLS),
                                               np.zeros(MAX_CODE_LENGTH, dtype=np.int64)])


def _write_code_lengths(writer: _BitWriter, lengths: np.ndarray) -> None:
    """Store a list of code lengths as zero runs and single lengths (see LENGTH_ALPHABET_SIZE)."""
    symbols, extra_values = [], []
    index = 0
    while index < lengths.size:
        if lengths[index] == 0:
            run_end = index
            while run_end < lengths.size and lengths[run_end] == 0:
                run_end += 1
            run = run_end - index
            symbols.append(run.bit_length() - 1)
            extra_values.append(run - (1 << (run.bit_length() - 1)))
            index = run_end
        else:
            symbols.append(ZERO_RUN_SYMBOLS + int(lengths[index]) - 1)
            extra_values.append(0)
            index += 1
    symbols = np.asarray(symbols, dtype=np.int64)
    length_code = _PrefixCode(_huffman_code_lengths(
        np.bincount(symbols, minlength=LENGTH_ALPHABET_SIZE), MAX_LENGTH_CODE_LENGTH))
    stored_symbols = int(np.flatnonzero(length_code.lengths).max()) + 1
    writer.add(symbols.size, LENGTH_ITEM_COUNT_BITS)
    writer.add(stored_symbols, LENGTH_SYMBOL_COUNT_BITS)
    writer.add(length_code.lengths[:stored_symbols], LENGTH_CODE_LENGTH_BITS)
    _CodedItems(length_code, symbols, np.asarray(extra_values, dtype=np.uint64),
                _EXTRA_BITS_OF_LENGTH_SYMBOL[symbols]).write(writer)


def _code_lengths_bit_count(lengths: np.ndarray) -> int:
    scratch = _BitWriter()
    _write_code_lengths(scratch, lengths)
    return scratch.bit_count


def _read_code_lengths(reader: _BitReader, start: int, alphabet_size: int):
    """Read a list stored by _write_code_lengths; returns (lengths, bit offset after it)."""
    item_count = reader.read_field(start, LENGTH_ITEM_COUNT_BITS)
    start += LENGTH_ITEM_COUNT_BITS
    stored_symbols = reader.read_field(start, LENGTH_SYMBOL_COUNT_BITS)
    start += LENGTH_SYMBOL_COUNT_BITS
    if not 1 <= stored_symbols <= LENGTH_ALPHABET_SIZE or not 1 <= item_count <= alphabet_size:
        raise _MalformedBody("a list of code lengths has an impossible size")
    length_code_lengths = np.zeros(LENGTH_ALPHABET_SIZE, dtype=np.int64)
    length_code_lengths[:stored_symbols] = reader.read(
        start + LENGTH_CODE_LENGTH_BITS * np.arange(stored_symbols), LENGTH_CODE_LENGTH_BITS)
    start += LENGTH_CODE_LENGTH_BITS * stored_symbols
    symbols, extra_values, start = _decode_items(
        reader, start, item_count, _PrefixCode(length_code_lengths), _EXTRA_BITS_OF_LENGTH_SYMBOL)
    is_run = symbols < ZERO_RUN_SYMBOLS
    repeats = np.where(is_run, np.left_shift(1, symbols) + extra_values.astype(np.int64), 1)
    if int(repeats.sum()) != alphabet_size:
        raise _MalformedBody("a list of code lengths does not cover its alphabet")
    return np.repeat(np.where(is_run, 0, symbols - ZERO_RUN_SYMBOLS + 1), repeats), start


# --- gap buckets --------------------------------------------------------------------------
# With m mantissa bits, a gap below 2**(m+1) is its own symbol. A larger gap of bit length b
# becomes the symbol for (b, its m bits after the leading one), then its b-1-m low bits raw.

def _bit_lengths(values: np.ndarray) -> np.ndarray:
    """Bit length of each integer below 2**53 (float64 holds those exactly; 0 gives 0)."""
    return np.frexp(np.asarray(values, dtype=np.float64))[1].astype(np.int64)


def _gap_alphabet_size(mantissa_bits: int) -> int:
    return (2 << mantissa_bits) + (MAX_GAP_BIT_LENGTH - mantissa_bits - 1) * (1 << mantissa_bits)


def _gap_extra_bits_of_symbol(mantissa_bits: int) -> np.ndarray:
    symbols = np.arange(_gap_alphabet_size(mantissa_bits))
    bit_lengths = (symbols - (2 << mantissa_bits)) // (1 << mantissa_bits) + mantissa_bits + 2
    return np.where(symbols < (2 << mantissa_bits), 0, bit_lengths - 1 - mantissa_bits)


def _gaps_to_buckets(gaps: np.ndarray, mantissa_bits: int):
    """(symbols, extra values, extra widths) of the gaps in this bucketing."""
    gaps = gaps.astype(np.uint64)
    bit_lengths = _bit_lengths(gaps)
    extra_widths = np.maximum(bit_lengths - 1 - mantissa_bits, 0)
    leading_bits = (gaps >> extra_widths.astype(np.uint64)).astype(np.int64)
    bucket_symbols = ((2 << mantissa_bits)
                      + (bit_lengths - mantissa_bits - 2) * (1 << mantissa_bits)
                      + leading_bits - (1 << mantissa_bits))
    symbols = np.where(extra_widths == 0, gaps.astype(np.int64), bucket_symbols)
    extra_values = gaps & ((np.uint64(1) << extra_widths.astype(np.uint64)) - np.uint64(1))
    return symbols, extra_values, extra_widths


def _buckets_to_gaps(symbols: np.ndarray, extra_values: np.ndarray, mantissa_bits: int):
    is_own_symbol = symbols < (2 << mantissa_bits)
    bucket = symbols - (2 << mantissa_bits)
    bit_lengths = bucket // (1 << mantissa_bits) + mantissa_bits + 2
    leading_bits = (1 << mantissa_bits) + bucket % (1 << mantissa_bits)
    extra_widths = np.where(is_own_symbol, 0, bit_lengths - 1 - mantissa_bits)
    large = (leading_bits.astype(np.uint64) << extra_widths.astype(np.uint64)) | extra_values
    return np.where(is_own_symbol, symbols.astype(np.uint64), large)


# --- format 1: varints --------------------------------------------------------------------

def _encode_varint_body(gaps: np.ndarray, tokens: np.ndarray) -> bytes:
    """Per entry, the LEB128 varint of the gap, then that of the token id."""
    values = np.empty(2 * gaps.size, dtype=np.uint64)
    values[0::2], values[1::2] = gaps, tokens
    byte_counts = np.maximum((_bit_lengths(values) + 6) // 7, 1)
    value_starts = np.cumsum(byte_counts) - byte_counts
    byte_rank = np.arange(int(byte_counts.sum())) - np.repeat(value_starts, byte_counts)
    shifts = (7 * byte_rank).astype(np.uint64)
    payload = (np.repeat(values, byte_counts) >> shifts) & np.uint64(0x7F)
    more_follows = byte_rank < np.repeat(byte_counts, byte_counts) - 1
    return (payload | (more_follows.astype(np.uint64) << np.uint64(7))).astype(np.uint8).tobytes()


def _decode_varint_body(body: bytes, n_entries: int):
    if 2 * n_entries > len(body):
        raise _MalformedBody(f"{len(body)} bytes cannot hold {n_entries} entries")
    data = np.frombuffer(body, dtype=np.uint8)
    is_last_byte = data < 0x80
    value_ends = np.flatnonzero(is_last_byte) + 1
    if value_ends.size != 2 * n_entries or (data.size and not is_last_byte[-1]):
        raise _MalformedBody(f"it holds {value_ends.size} varints where {2 * n_entries} "
                             "were expected")
    if n_entries == 0:
        return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.uint64)
    value_starts = np.concatenate([[0], value_ends[:-1]])
    byte_counts = value_ends - value_starts
    if byte_counts.max() > 9:  # 9 bytes carry 63 bits; anything longer would overflow
        raise _MalformedBody("it holds a varint longer than 9 bytes")
    byte_rank = np.arange(data.size) - np.repeat(value_starts, byte_counts)
    parts = (data & 0x7F).astype(np.uint64) << (7 * byte_rank).astype(np.uint64)
    values = np.add.reduceat(parts, value_starts)
    return values[0::2], values[1::2]


# --- format 2: Huffman-coded gap buckets and token ids ------------------------------------

class _CompactPlan(NamedTuple):
    mantissa_bits: int
    gap_items: _CodedItems
    fixed_width_tokens: bool
    token_items: _CodedItems


def _gap_items(gaps: np.ndarray, mantissa_bits: int) -> _CodedItems:
    symbols, extra_values, extra_widths = _gaps_to_buckets(gaps, mantissa_bits)
    code = _PrefixCode(_huffman_code_lengths(
        np.bincount(symbols, minlength=_gap_alphabet_size(mantissa_bits)), MAX_CODE_LENGTH))
    return _CodedItems(code, symbols, extra_values, extra_widths)


def _fixed_width_token_code(vocab_size: int) -> _PrefixCode:
    return _PrefixCode(np.full(vocab_size, max(1, (vocab_size - 1).bit_length())))


def _plan_compact_body(gaps: np.ndarray, tokens: np.ndarray, vocab_size: int) -> _CompactPlan:
    """Pick m and the token code that make the body smallest, code lengths included."""
    gap_choices = [_gap_items(gaps, m) for m in GAP_MANTISSA_CHOICES]
    gap_bits = [_code_lengths_bit_count(items.code.lengths) + int(items.bit_widths().sum())
                for items in gap_choices]
    best = int(np.argmin(gap_bits))
    huffman_tokens = _items_without_extra_bits(_PrefixCode(_huffman_code_lengths(
        np.bincount(tokens, minlength=vocab_size), MAX_CODE_LENGTH)), tokens)
    huffman_token_bits = (_code_lengths_bit_count(huffman_tokens.code.lengths)
                          + int(huffman_tokens.bit_widths().sum()))
    fixed_width_tokens = _items_without_extra_bits(_fixed_width_token_code(vocab_size), tokens)
    use_fixed_width = int(fixed_width_tokens.bit_widths().sum()) <= huffman_token_bits
    return _CompactPlan(GAP_MANTISSA_CHOICES[best], gap_choices[best], use_fixed_width,
                        fixed_width_tokens if use_fixed_width else huffman_tokens)


def _encode_compact_body(plan: _CompactPlan) -> bytes:
    """Bit-packed: m (2 bits), the gap code lengths, the token code kind (1 bit), the token
    code lengths (Huffman kind only), every gap item, every token item; zero-padded."""
    writer = _BitWriter()
    writer.add(plan.mantissa_bits, GAP_MANTISSA_FIELD_BITS)
    _write_code_lengths(writer, plan.gap_items.code.lengths)
    if plan.fixed_width_tokens:
        writer.add(TOKEN_CODE_FIXED_WIDTH, TOKEN_CODE_FIELD_BITS)
    else:
        writer.add(TOKEN_CODE_HUFFMAN, TOKEN_CODE_FIELD_BITS)
        _write_code_lengths(writer, plan.token_items.code.lengths)
    plan.gap_items.write(writer)
    plan.token_items.write(writer)
    return writer.to_bytes()


def _decode_compact_body(body: bytes, n_entries: int, vocab_size: int):
    if n_entries == 0:
        if body:
            raise _MalformedBody("it has a body but no entries")
        return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64)
    if 2 * n_entries > 8 * len(body):  # every entry takes at least two bits
        raise _MalformedBody(f"{len(body)} bytes cannot hold {n_entries} entries")
    reader = _BitReader(body)
    mantissa_bits = reader.read_field(0, GAP_MANTISSA_FIELD_BITS)
    offset = GAP_MANTISSA_FIELD_BITS
    gap_code_lengths, offset = _read_code_lengths(reader, offset, _gap_alphabet_size(mantissa_bits))
    token_code_kind = reader.read_field(offset, TOKEN_CODE_FIELD_BITS)
    offset += TOKEN_CODE_FIELD_BITS
    if token_code_kind == TOKEN_CODE_FIXED_WIDTH:
        token_code = _fixed_width_token_code(vocab_size)
    else:
        token_code_lengths, offset = _read_code_lengths(reader, offset, vocab_size)
        token_code = _PrefixCode(token_code_lengths)
    gap_symbols, gap_extra_values, offset = _decode_items(
        reader, offset, n_entries, _PrefixCode(gap_code_lengths),
        _gap_extra_bits_of_symbol(mantissa_bits))
    tokens, _, offset = _decode_items(reader, offset, n_entries, token_code,
                                      np.zeros(vocab_size, dtype=np.int64))
    if reader.bit_count - offset >= 8:
        raise _MalformedBody("whole bytes follow its last entry")
    return _buckets_to_gaps(gap_symbols, gap_extra_values, mantissa_bits), tokens


# --- the seed's own file, read only ---------------------------------------------------------
# The seed's build_correction_table.py and eval_final.py (openai/parameter-golf PR 232) write b"CRDT",
# a little-endian uint32 entry count, then per entry the LEB128 varint gap from the previous
# position (the first from 0) and the token id as a little-endian uint16. A position there is the
# index of the target token in the validation stream, one past ours (ours is the position that
# predicts it). It carries no fingerprint, vocabulary or stream length: nothing ties it to the
# validation stream it is applied to, and the evaluation log says so.

SEED_TABLE_MAGIC = b"CRDT"
SEED_TABLE_HEADER = struct.Struct("<4sI")
SEED_ENTRY_MIN_BYTES = 3  # a one-byte gap and the two-byte token id
TABLE_FORMAT_SEED = 0  # read only: the `format` a CRDT table reports
SEED_TABLE_EXTRA_NAME = "__correction_table_v2__"  # the seed's checkpoint key for a table it carries


def decode_seed_table(blob: bytes, *, source: str = "<table>", expect_vocab_size=None,
                      expect_val_length=None) -> CorrectionTable:
    """The entries of a table in the seed's CRDT format, at our positions; checked for what can be
    checked (sizes, order, tokens within the vocabulary, positions within the stream), not for the
    stream itself. A table carries none of that, so vocab_size and val_length are the expected ones
    (else the smallest that hold it) and the fingerprint is empty."""
    blob = bytes(blob)
    fix = "point at a table the seed's build_correction_table.py wrote, or build one with ours"
    if len(blob) < SEED_TABLE_HEADER.size:
        raise CorrectionTableError(source, f"truncated: {len(blob)} bytes, shorter than the seed's "
                                   f"{SEED_TABLE_HEADER.size}-byte header", fix)
    _, count = SEED_TABLE_HEADER.unpack_from(blob)
    if count * SEED_ENTRY_MIN_BYTES > len(blob) - SEED_TABLE_HEADER.size:
        raise CorrectionTableError(source, f"truncated: {len(blob)} bytes cannot hold the {count} "
                                   "entries its header announces", fix)
    positions, tokens = np.zeros(count, dtype=np.int64), np.zeros(count, dtype=np.int64)
    offset, position = SEED_TABLE_HEADER.size, 0
    for i in range(count):
        gap, shift = 0, 0
        while offset < len(blob) and shift < 63:
            gap |= (blob[offset] & 0x7F) << shift
            offset, shift = offset + 1, shift + 7
            if blob[offset - 1] < 0x80:
                break
        else:
            raise CorrectionTableError(source, f"truncated or malformed inside entry {i} of {count}", fix)
        if offset + 2 > len(blob):
            raise CorrectionTableError(source, f"truncated inside entry {i} of {count}", fix)
        position += gap
        positions[i], tokens[i] = position, blob[offset] | blob[offset + 1] << 8
        offset += 2
    if offset != len(blob):
        raise CorrectionTableError(source, f"{len(blob) - offset} unexpected bytes follow its {count} "
                                   "entries", fix)
    positions -= 1
    if count and (positions[0] < 0 or np.any(np.diff(positions) <= 0)):
        raise CorrectionTableError(source, "malformed: its positions must rise from 1, one entry to a "
                                   "position", fix)
    if count and expect_val_length is not None and positions[-1] >= expect_val_length:
        raise CorrectionTableError(source, f"made for another validation stream: a position lies beyond "
                                   f"the {expect_val_length} validation targets", fix)
    if count and expect_vocab_size is not None and tokens.max() >= expect_vocab_size:
        raise CorrectionTableError(source, f"made for another vocabulary: a token id lies outside [0, "
                                   f"{expect_vocab_size})", fix)
    return CorrectionTable(positions=positions, tokens=tokens,
                           vocab_size=expect_vocab_size or MAX_VOCAB_SIZE,
                           val_length=expect_val_length or int(positions[-1] + 1 if count else 1),
                           fmt=TABLE_FORMAT_SEED, fingerprint=b"")


# --- public entry points ------------------------------------------------------------------

def _checked_entries(positions, tokens, vocab_size: int, val_length: int, source: str):
    """The entries as int64 arrays, or a CorrectionTableError saying what is wrong with them."""
    positions, tokens = np.asarray(positions), np.asarray(tokens)
    fix = "pass sorted unique positions in [0, val_length) with token ids in [0, vocab_size)"
    if not 1 <= vocab_size <= MAX_VOCAB_SIZE:
        raise CorrectionTableError(source, f"vocab size {vocab_size} is outside "
                                   f"[1, {MAX_VOCAB_SIZE}]", "pass the tokenizer's vocabulary size")
    if not 1 <= val_length <= MAX_VAL_LENGTH:
        raise CorrectionTableError(source, f"val_length {val_length} is outside [1, 2**40]",
                                   "pass the number of tokens in the validation stream")
    if positions.ndim != 1 or tokens.shape != positions.shape:
        raise CorrectionTableError(source, f"positions {positions.shape} and tokens "
                                   f"{tokens.shape} are not two 1-D arrays of one length", fix)
    if positions.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    if not (np.issubdtype(positions.dtype, np.integer) and np.issubdtype(tokens.dtype, np.integer)):
        raise CorrectionTableError(source, "positions and tokens must be integer arrays", fix)
    positions, tokens = positions.astype(np.int64), tokens.astype(np.int64)
    if positions[0] < 0 or positions[-1] >= val_length:
        raise CorrectionTableError(source, f"a position lies outside [0, {val_length})", fix)
    if np.any(np.diff(positions) <= 0):
        raise CorrectionTableError(source, "positions are not strictly increasing "
                                   "(unsorted or duplicated)", fix)
    if tokens.min() < 0 or tokens.max() >= vocab_size:
        raise CorrectionTableError(source, f"a token id lies outside [0, {vocab_size})", fix)
    return positions, tokens


def encode_table(positions, tokens, *, vocab_size: int, val_length: int, fingerprint: bytes,
                 fmt: int = TABLE_FORMAT_COMPACT, source: str = "correction table input") -> bytes:
    """Header + body for these entries; refuses input that would not decode to itself."""
    if fmt not in TABLE_FORMATS:
        raise CorrectionTableError(source, f"format {fmt} is unknown (known: {TABLE_FORMATS})",
                                   f"use {TABLE_FORMAT_COMPACT} or {TABLE_FORMAT_VARINT}")
    if not isinstance(fingerprint, bytes) or len(fingerprint) != FINGERPRINT_BYTES:
        raise CorrectionTableError(source, "the fingerprint is not 16 bytes",
                                   "pass val_fingerprint(val_tokens)")
    positions, tokens = _checked_entries(positions, tokens, vocab_size, val_length, source)
    gaps = np.diff(positions, prepend=-1)
    if positions.size == 0:
        body = b""
    elif fmt == TABLE_FORMAT_VARINT:
        body = _encode_varint_body(gaps, tokens)
    else:
        body = _encode_compact_body(_plan_compact_body(gaps, tokens, vocab_size))
    header_fields = TABLE_HEADER.pack(TABLE_MAGIC, fmt, vocab_size, val_length, fingerprint,
                                      positions.size, len(body), 0)[:HEADER_BYTES_BEFORE_CRC]
    checksum = zlib.crc32(body, zlib.crc32(header_fields))
    return header_fields + struct.pack("<I", checksum) + body


def decode_table(blob: bytes, *, source: str = "<table>", expect_vocab_size=None,
                 expect_val_length=None, expect_fingerprint=None) -> CorrectionTable:
    """Read a table written by encode_table, checking that it belongs to the expected stream; one in
    the seed's CRDT format is read by decode_seed_table (the fingerprint cannot be checked)."""
    blob = bytes(blob)
    rebuild = "rebuild it with build_correction_table.py"
    copy_again = f"copy the file again or {rebuild}"
    if blob[:len(SEED_TABLE_MAGIC)] == SEED_TABLE_MAGIC:
        return decode_seed_table(blob, source=source, expect_vocab_size=expect_vocab_size,
                                 expect_val_length=expect_val_length)
    if blob[:len(TABLE_MAGIC)] != TABLE_MAGIC:
        raise CorrectionTableError(source, f"not a correction table (it does not start with "
                                   f"{TABLE_MAGIC!r}, nor with the seed's {SEED_TABLE_MAGIC!r})",
                                   "point at a file that build_correction_table.py wrote")
    if len(blob) < TABLE_HEADER.size:
        raise CorrectionTableError(source, f"truncated: {len(blob)} bytes, shorter than the "
                                   f"{TABLE_HEADER.size}-byte header", copy_again)
    (_, fmt, vocab_size, val_length, fingerprint, n_entries, body_length,
     checksum) = TABLE_HEADER.unpack_from(blob)
    body = blob[TABLE_HEADER.size:]
    if len(body) < body_length:
        raise CorrectionTableError(source, f"truncated: the header announces {body_length} body "
                                   f"bytes but {len(body)} follow", copy_again)
    if len(body) > body_length:
        raise CorrectionTableError(source, f"{len(body) - body_length} unexpected bytes follow "
                                   "the table", copy_again)
    if zlib.crc32(body, zlib.crc32(blob[:HEADER_BYTES_BEFORE_CRC])) != checksum:
        raise CorrectionTableError(source, "corrupted: checksum mismatch", copy_again)
    if fmt not in TABLE_FORMATS:
        raise CorrectionTableError(source, f"format version {fmt} is unknown to this reader "
                                   f"(it reads {TABLE_FORMATS})", f"update the code or {rebuild}")
    if not (1 <= vocab_size <= MAX_VOCAB_SIZE and 1 <= val_length <= MAX_VAL_LENGTH
            and n_entries <= val_length):
        raise CorrectionTableError(source, "its header holds impossible sizes", rebuild)
    other_stream = "made for another validation stream"
    fix_stream = f"{rebuild} against this DATA_PATH and tokenizer"
    if expect_vocab_size is not None and vocab_size != expect_vocab_size:
        raise CorrectionTableError(source, f"{other_stream}: vocab size {vocab_size}, expected "
                                   f"{expect_vocab_size}", fix_stream)
    if expect_val_length is not None and val_length != expect_val_length:
        raise CorrectionTableError(source, f"{other_stream}: {val_length} validation tokens, "
                                   f"expected {expect_val_length}", fix_stream)
    if expect_fingerprint is not None and fingerprint != expect_fingerprint:
        raise CorrectionTableError(source, f"{other_stream}: its validation fingerprint differs",
                                   fix_stream)
    try:
        if fmt == TABLE_FORMAT_VARINT:
            gaps, tokens = _decode_varint_body(body, n_entries)
        else:
            gaps, tokens = _decode_compact_body(body, n_entries, vocab_size)
    except _MalformedBody as problem:
        raise CorrectionTableError(source, f"malformed body: {problem}", rebuild) from None
    if n_entries and (gaps.min() < 1 or gaps.max() > val_length):
        raise CorrectionTableError(source, "malformed body: a gap is out of range", rebuild)
    # Each gap is at most val_length <= 2**40, so a uint64 overflow would show as a decrease.
    positions_plus_one = np.cumsum(gaps, dtype=np.uint64)
    if n_entries and (positions_plus_one[-1] > val_length
                      or np.any(np.diff(positions_plus_one.astype(np.int64)) <= 0)):
        raise CorrectionTableError(source, f"a position lies beyond the {val_length} validation "
                                   "tokens", rebuild)
    tokens = tokens.astype(np.int64)
    if n_entries and tokens.max() >= vocab_size:
        raise CorrectionTableError(source, f"a token id lies outside [0, {vocab_size})", rebuild)
    return CorrectionTable(positions=positions_plus_one.astype(np.int64) - 1, tokens=tokens,
                           vocab_size=vocab_size, val_length=val_length, fmt=fmt,
                           fingerprint=fingerprint)


def entry_code_bits(positions, tokens, vocab_size: int) -> np.ndarray:
    """Bits that each entry's own gap and token take in a format-2 table of exactly these entries.

    The shared part (header and code lengths, a few hundred bytes) is left out. An entry's cost
    depends on the others (its gap; how common its token is among them), so use this to rank
    entries or to iterate a selection, and the encoded table's length for the final total.
    """
    positions = np.asarray(positions)
    val_length = int(positions.max()) + 1 if positions.size else 1
    positions, tokens = _checked_entries(positions, tokens, vocab_size, val_length,
                                         "entry_code_bits input")
    if positions.size == 0:
        return np.zeros(0, dtype=np.int64)
    plan = _plan_compact_body(np.diff(positions, prepend=-1), tokens, vocab_size)
    return plan.gap_items.bit_widths() + plan.token_items.bit_widths()


# ----- Selection -----
# Which positions the table lists. CORRECTION_SELECT=fill takes the costliest positions, as many
# as the byte budget holds; net takes only those whose saving (eval_final.saved_bits: the bits
# the boost saves where the table's token is the target) exceeds their own bits in the table.

SELECT_MODES = ("fill", "net")
TABLE_EXTRA_NAME = "correction_table"  # the table's name when an artifact carries it
CARRIED_TABLE_NAMES = (TABLE_EXTRA_NAME, SEED_TABLE_EXTRA_NAME)  # ours first: the names a carried table may have


def select_entries(losses: np.ndarray, saved: np.ndarray | None, targets: np.ndarray, *, mode: str,
                   vocab_size: int, budget_bytes: int, fmt: int = TABLE_FORMAT_COMPACT,
                   max_entries: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Positions (sorted) and their correct tokens, chosen by `mode` within the byte budget.

    losses: each position's loss; saved: the bits an entry there would save (net only: fill needs none);
    max_entries 0: no limit.
    """
    n_targets = losses.size
    if mode == "net":
        order = np.argsort(-saved, kind="stable")
        keep = order[saved[order] > 2 * math.log2(vocab_size)]  # a generous first guess: gap + token
        for _ in range(20):  # each entry's bits depend on the others: iterate to a fixed point
            if keep.size == 0:
                break
            positions = np.sort(keep)
            bits = entry_code_bits(positions, targets[positions], vocab_size)
            paying = positions[saved[positions] > bits]
            if paying.size == keep.size:
                break
            keep = paying
        order = keep[np.argsort(-saved[keep], kind="stable")]
    else:
        order = np.argsort(-losses, kind="stable")  # costliest first; ties by position

    limit = order.size if max_entries <= 0 else min(order.size, max_entries)

    def size_of(n: int) -> int:
        chosen = np.sort(order[:n])
        return len(encode_table(chosen, targets[chosen], vocab_size=vocab_size, val_length=n_targets,
                                fingerprint=bytes(FINGERPRINT_BYTES), fmt=fmt))

    if limit and size_of(limit) > budget_bytes:  # the largest n that fits: sizes grow with n
        lo, hi = 0, limit
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if size_of(mid) <= budget_bytes else (lo, mid - 1)
        limit = lo
    chosen = np.sort(order[:limit])
    return chosen, targets[chosen]


# ----- The boost -----
# At a table position the table's token gets CORRECTION_BOOST added to its logit; at a hinted
# position the hint gets its beta. The loss that follows is closed form in the position's loss and
# log p(boosted token), so applying either costs no second pass through the model, and the boosted
# distribution still sums to one over the whole vocabulary.

def log1mexp(x: np.ndarray) -> np.ndarray:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (-inf at 0)."""
    x = np.minimum(x, 0.0)
    with np.errstate(divide="ignore"):
        return np.where(x > -math.log(2), np.log(-np.expm1(x)), np.log1p(-np.exp(x)))


def boosted_losses(losses: np.ndarray, token_logprobs: np.ndarray, token_is_target: np.ndarray,
                   boost: float | np.ndarray) -> np.ndarray:
    """The loss after adding `boost` (one number, or one per position) to one token's logit, from the
    loss and that token's log p. With p that token's probability the log-sum-exp grows by
    log((1 - p) + p e^boost); the target's logit grows by `boost` only where the token is the target.
    A position whose boost is 0 keeps its loss, whatever its token_logprobs holds."""
    losses = np.asarray(losses, dtype=np.float64)
    boost = np.broadcast_to(np.asarray(boost, dtype=np.float64), losses.shape)
    active = boost != 0
    lp = np.where(active, np.asarray(token_logprobs, dtype=np.float64), -1.0)  # keep idle ones off -inf and 0
    growth = np.logaddexp(log1mexp(lp), lp + boost)
    return np.where(active, losses + growth - boost * np.asarray(token_is_target, dtype=bool), losses)
