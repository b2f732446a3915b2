"""The correction table's codec: exact roundtrips, its size on real text, and its refusals."""

import struct
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from correction_table import (  # noqa: E402
    MAX_CODE_LENGTH,
    TABLE_FORMAT_COMPACT,
    TABLE_FORMAT_VARINT,
    TABLE_HEADER,
    TABLE_MAGIC,
    CorrectionTableError,
    decode_table,
    encode_table,
    entry_code_bits,
    _unlimited_huffman_code_lengths,
    val_fingerprint,
)

FORMATS = [TABLE_FORMAT_VARINT, TABLE_FORMAT_COMPACT]
FINGERPRINT = bytes(range(16))
HARD_FRACTION = 0.015  # the seed's density of table entries


def roundtrip(positions, tokens, vocab_size, val_length, fmt):
    blob = encode_table(positions, tokens, vocab_size=vocab_size, val_length=val_length,
                        fingerprint=FINGERPRINT, fmt=fmt)
    table = decode_table(blob, expect_vocab_size=vocab_size, expect_val_length=val_length,
                         expect_fingerprint=FINGERPRINT)
    np.testing.assert_array_equal(table.positions, np.asarray(positions, dtype=np.int64))
    np.testing.assert_array_equal(table.tokens, np.asarray(tokens, dtype=np.int64))
    assert table.positions.dtype == np.int64 and table.tokens.dtype == np.int64
    assert (table.vocab_size, table.val_length, table.fmt, table.fingerprint) == \
        (vocab_size, val_length, fmt, FINGERPRINT)
    return blob


def forge(fmt, vocab_size, val_length, n_entries, body):
    """A blob with a valid header and checksum around an arbitrary body."""
    fields = TABLE_HEADER.pack(TABLE_MAGIC, fmt, vocab_size, val_length, FINGERPRINT,
                               n_entries, len(body), 0)[:-4]
    return fields + struct.pack("<I", zlib.crc32(body, zlib.crc32(fields))) + body


# --- roundtrips ---------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("vocab_size", [1024, 65536])
@pytest.mark.parametrize("density", [0.0005, 0.015, 0.2, 0.9])
def test_random_tables_roundtrip(fmt, vocab_size, density):
    rng = np.random.default_rng(int(density * 1e4) + vocab_size + fmt)
    val_length = 200_000
    positions = np.flatnonzero(rng.random(val_length) < density)
    tokens = rng.integers(0, vocab_size, positions.size)
    roundtrip(positions, tokens, vocab_size, val_length, fmt)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("vocab_size", [1024, 65536])
@pytest.mark.parametrize("case", ["adjacent", "extremes", "single", "empty", "skewed", "bursty"])
def test_adversarial_tables_roundtrip(fmt, vocab_size, case):
    rng = np.random.default_rng(7)
    val_length = 5000
    if case == "adjacent":
        positions = np.arange(1000, 3000)
        tokens = np.where(positions % 2 == 0, 0, vocab_size - 1)
    elif case == "extremes":
        val_length = 2 ** 31 + 11
        positions = np.array([0, 1, 2 ** 20, 2 ** 31, val_length - 1])
        tokens = np.array([0, vocab_size - 1, 5, vocab_size - 1, 0])
    elif case == "single":
        positions, tokens = np.array([val_length - 1]), np.array([vocab_size - 1])
    elif case == "empty":
        positions, tokens = np.array([], dtype=np.int64), np.array([], dtype=np.int64)
    elif case == "skewed":  # one token almost everywhere: a 1-bit code word beside long ones
        positions = np.arange(0, val_length, 2)
        rare = rng.integers(0, vocab_size, positions.size)
        tokens = np.where(rng.random(positions.size) < 0.999, 3, rare)
    else:  # tight bursts separated by very long gaps
        val_length = 2 ** 33
        starts = np.sort(rng.choice(val_length // 100, 40, replace=False)) * 100
        positions = (starts[:, None] + np.arange(20)[None, :]).ravel()
        tokens = rng.integers(0, vocab_size, positions.size)
    roundtrip(positions, tokens, vocab_size, val_length, fmt)


def test_fibonacci_token_counts_force_the_code_length_limit():
    # Token counts 1, 1, 2, 3, 5, ... make the deepest possible Huffman tree: 26 levels for 27
    # tokens, beyond the format's 24-bit limit on code words.
    counts = [1, 1]
    while len(counts) < 27:
        counts.append(counts[-1] + counts[-2])
    tokens = np.random.default_rng(5).permutation(np.repeat(np.arange(27), counts))
    assert _unlimited_huffman_code_lengths(np.bincount(tokens)).max() > MAX_CODE_LENGTH
    positions = np.arange(tokens.size) * 3
    roundtrip(positions, tokens, 1024, int(positions[-1]) + 1, TABLE_FORMAT_COMPACT)


# --- size on a real validation stream -----------------------------------------------------

@pytest.fixture(scope="module")
def hard_positions_of_real_text(tmp_path_factory):
    """The 1.5% positions of a real token stream that a bigram model finds hardest."""
    import sentencepiece
    from pydoc_data.topics import topics

    text = "\n".join(topics[name] for name in sorted(topics))
    workdir = tmp_path_factory.mktemp("sp")
    corpus = workdir / "corpus.txt"
    corpus.write_text(text, encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(workdir / "sp"), model_type="bpe", vocab_size=1024,
        byte_fallback=True, split_digits=True, normalization_rule_name="nmt_nfkc",
        add_dummy_prefix=False, character_coverage=0.999, pad_id=0, bos_id=1, eos_id=2, unk_id=3,
        input_sentence_size=200_000, shuffle_input_sentence=False, num_threads=2, minloglevel=2)
    processor = sentencepiece.SentencePieceProcessor(model_file=str(workdir / "sp.model"))
    stream = np.asarray(processor.encode(text), dtype=np.int64)
    vocab_size = processor.get_piece_size()

    train, val = stream[: stream.size // 2], stream[stream.size // 2:]
    bigram_counts = np.zeros((vocab_size, vocab_size))
    np.add.at(bigram_counts, (train[:-1], train[1:]), 1)
    next_token_probs = (bigram_counts + 1) / (bigram_counts.sum(axis=1, keepdims=True) + vocab_size)
    previous = np.concatenate([train[-1:], val[:-1]])
    surprisal = -np.log2(next_token_probs[previous, val])
    n_hard = int(round(HARD_FRACTION * val.size))
    positions = np.sort(np.argsort(-surprisal, kind="stable")[:n_hard])
    return positions, val[positions], vocab_size, val


def test_size_on_real_text(hard_positions_of_real_text):
    positions, tokens, vocab_size, val = hard_positions_of_real_text
    fingerprint = val_fingerprint(val)
    bytes_per_entry = {}
    for fmt in FORMATS:
        blob = encode_table(positions, tokens, vocab_size=vocab_size, val_length=val.size,
                            fingerprint=fingerprint, fmt=fmt)
        table = decode_table(blob, source="real-text table", expect_vocab_size=vocab_size,
                             expect_val_length=val.size, expect_fingerprint=fingerprint)
        np.testing.assert_array_equal(table.positions, positions)
        np.testing.assert_array_equal(table.tokens, val[table.positions])
        bytes_per_entry[fmt] = len(blob) / positions.size
    per_entry_bits = entry_code_bits(positions, tokens, vocab_size)
    compact_bytes = bytes_per_entry[TABLE_FORMAT_COMPACT] * positions.size
    compact_body_bits = 8 * (compact_bytes - TABLE_HEADER.size)
    assert per_entry_bits.shape == positions.shape and per_entry_bits.min() > 0
    assert 0 < compact_body_bits - per_entry_bits.sum() < 8 * 400  # the shared code lengths
    print(f"\nreal text: {positions.size} entries over {val.size} validation tokens, mean gap "
          f"{np.diff(positions).mean():.1f}; bytes/entry: format 1 {bytes_per_entry[1]:.3f}, "
          f"format 2 {bytes_per_entry[2]:.3f}")
    assert bytes_per_entry[TABLE_FORMAT_VARINT] <= 3.2
    assert bytes_per_entry[TABLE_FORMAT_COMPACT] <= 2.2


def test_million_entries_fast_and_small(hard_positions_of_real_text):
    _, real_hard_tokens, vocab_size, _ = hard_positions_of_real_text
    rng = np.random.default_rng(0)
    n_entries = 1_000_000
    val_length = int(n_entries / HARD_FRACTION)
    positions = np.sort(rng.choice(val_length, n_entries, replace=False))
    tokens = rng.choice(real_hard_tokens, n_entries)
    for fmt in FORMATS:
        started = time.perf_counter()
        blob = encode_table(positions, tokens, vocab_size=vocab_size, val_length=val_length,
                            fingerprint=FINGERPRINT, fmt=fmt)
        encoded = time.perf_counter()
        table = decode_table(blob)
        decoded = time.perf_counter()
        np.testing.assert_array_equal(table.positions, positions)
        np.testing.assert_array_equal(table.tokens, tokens)
        print(f"\n1M synthetic entries, format {fmt}: {len(blob) / n_entries:.3f} bytes/entry, "
              f"encode {encoded - started:.2f} s, decode {decoded - encoded:.2f} s")
        assert decoded - started < 30
        if fmt == TABLE_FORMAT_COMPACT:
            assert len(blob) / n_entries <= 2.2


def test_fixed_width_tokens_when_the_code_lengths_would_cost_more():
    rng = np.random.default_rng(3)
    positions = np.sort(rng.choice(400_000, 5000, replace=False))
    tokens = rng.integers(0, 65536, positions.size)
    blob = roundtrip(positions, tokens, 65536, 400_000, TABLE_FORMAT_COMPACT)
    # Gaps average 80 (about 8 bits). Huffman-coded tokens would cost ~12.3 bits plus ~7.5 for
    # their code lengths; fixed-width ones cost 16.
    assert len(blob) * 8 / positions.size < 8.5 + 16 + 0.5


# --- refusals -----------------------------------------------------------------------------

@pytest.fixture(params=FORMATS)
def small_blob(request):
    rng = np.random.default_rng(11)
    positions = np.sort(rng.choice(100_000, 1500, replace=False))
    tokens = rng.integers(0, 1024, positions.size)
    return encode_table(positions, tokens, vocab_size=1024, val_length=100_000,
                        fingerprint=FINGERPRINT, fmt=request.param)


def refusal(blob, **expectations) -> str:
    with pytest.raises(CorrectionTableError) as caught:
        decode_table(blob, source="tables/val.pgct", **expectations)
    message = str(caught.value)
    assert message.startswith("tables/val.pgct: ")
    return message


def test_flipped_body_byte_is_refused(small_blob):
    for index in (TABLE_HEADER.size, len(small_blob) // 2, len(small_blob) - 1):
        corrupted = bytearray(small_blob)
        corrupted[index] ^= 0x10
        assert "corrupted: checksum mismatch" in refusal(bytes(corrupted))


def test_flipped_header_byte_is_refused(small_blob):
    for index in range(len(TABLE_MAGIC), TABLE_HEADER.size):
        corrupted = bytearray(small_blob)
        corrupted[index] ^= 0x01
        refusal(bytes(corrupted))


def test_truncation_is_refused(small_blob):
    for length in (0, 3, 10, TABLE_HEADER.size - 1):
        refusal(small_blob[:length])
    for length in (TABLE_HEADER.size, len(small_blob) - 1):
        assert "truncated" in refusal(small_blob[:length])
    assert "unexpected bytes" in refusal(small_blob + b"\0")


def test_wrong_magic_is_refused(small_blob):
    assert "not a correction table" in refusal(b"PGCX" + small_blob[4:])
    assert "not a correction table" in refusal(b"\x28\xb5\x2f\xfd" + bytes(100))


def test_unknown_format_is_refused():
    assert "format version 3 is unknown" in refusal(forge(3, 1024, 100, 0, b""))


def test_other_validation_stream_is_refused(small_blob):
    for expectations in ({"expect_fingerprint": bytes(16)}, {"expect_vocab_size": 8192},
                         {"expect_val_length": 99_999}):
        message = refusal(small_blob, **expectations)
        assert "made for another validation stream" in message
        assert "rebuild it with build_correction_table.py" in message
    decode_table(small_blob, expect_fingerprint=FINGERPRINT, expect_vocab_size=1024,
                 expect_val_length=100_000)


def test_positions_beyond_the_stream_are_refused():
    body = bytes([50, 7, 60, 7])  # varint gaps 50 and 60: positions 49 and 109
    too_short_stream = forge(TABLE_FORMAT_VARINT, 1024, 100, 2, body)
    assert "beyond the 100 validation tokens" in refusal(too_short_stream)
    decode_table(forge(TABLE_FORMAT_VARINT, 1024, 110, 2, body))


@pytest.mark.parametrize("fmt", FORMATS)
def test_garbage_with_a_valid_checksum_is_refused_cleanly(fmt):
    rng = np.random.default_rng(fmt)
    for trial in range(200):
        body = rng.integers(0, 256, int(rng.integers(0, 60)), dtype=np.uint8).tobytes()
        blob = forge(fmt, 1024, 100_000, int(rng.integers(0, 20)), body)
        try:
            table = decode_table(blob)
        except CorrectionTableError:
            continue
        assert np.all(np.diff(table.positions) > 0)
        assert table.positions.size == 0 or table.positions[-1] < 100_000
        assert table.tokens.size == 0 or table.tokens.max() < 1024


@pytest.mark.parametrize("positions, tokens, problem", [
    ([5, 3, 9], [1, 2, 3], "strictly increasing"),
    ([3, 3, 9], [1, 2, 3], "strictly increasing"),
    ([-1, 3, 9], [1, 2, 3], "outside [0, 1000)"),
    ([1, 3, 1000], [1, 2, 3], "outside [0, 1000)"),
    ([1, 3, 9], [1, 1024, 3], "outside [0, 1024)"),
    ([1, 3, 9], [1, -2, 3], "outside [0, 1024)"),
    ([1, 3, 9], [1, 2], "one length"),
    ([1.0, 3.0], [1, 2], "integer arrays"),
])
@pytest.mark.parametrize("fmt", FORMATS)
def test_bad_entries_are_refused_at_encode(positions, tokens, problem, fmt):
    with pytest.raises(CorrectionTableError, match=problem.replace("[", r"\[").replace(")", r"\)")):
        encode_table(positions, tokens, vocab_size=1024, val_length=1000,
                     fingerprint=FINGERPRINT, fmt=fmt)


def test_bad_settings_are_refused_at_encode():
    arguments = {"vocab_size": 1024, "val_length": 1000, "fingerprint": FINGERPRINT}
    for override in ({"fmt": 3}, {"vocab_size": 0}, {"vocab_size": 65537}, {"val_length": 0},
                     {"val_length": 2 ** 41}, {"fingerprint": b"short"}):
        with pytest.raises(CorrectionTableError):
            encode_table([1, 2], [3, 4], **{**arguments, **override})


def test_fingerprint_tells_streams_apart():
    stream = np.arange(5000) % 1024
    assert len(val_fingerprint(stream)) == 16
    assert val_fingerprint(stream) == val_fingerprint(stream.astype(np.uint16))
    assert val_fingerprint(stream) != val_fingerprint(stream[:-1])
    changed = stream.copy()
    changed[1234] += 1
    assert val_fingerprint(stream) != val_fingerprint(changed)
    with pytest.raises(CorrectionTableError):
        val_fingerprint(np.array([70000]))
