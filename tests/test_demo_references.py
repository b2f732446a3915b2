"""The demo's reference coders and its summary, on inputs small enough to check by hand."""

import math
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import demo  # noqa: E402
import demo_references  # noqa: E402
import train_gpt  # noqa: E402


class FakeTokenizer:
    """Decodes id i as the letter chr(ord('a') + i)."""

    def decode(self, ids):
        return "".join(chr(ord("a") + i) for i in ids)


def byte_tables(base, space, boundary) -> train_gpt.ByteTables:
    return train_gpt.ByteTables(torch.tensor(base, dtype=torch.int64), torch.tensor(space, dtype=torch.bool),
                                torch.tensor(boundary, dtype=torch.bool))


# ----- documents and text -----

def test_split_documents_takes_the_runs_between_bos():
    docs = demo_references.split_documents(np.array([1, 5, 6, 1, 7]))
    assert [d.tolist() for d in docs] == [[5, 6], [7]]
    docs = demo_references.split_documents(np.array([5, 1, 6, 1, 1, 8]))  # a partial first document, an empty one
    assert [d.tolist() for d in docs] == [[5], [6], [], [8]]


def test_documents_text_decodes_each_document_and_joins_with_newlines():
    assert demo_references.documents_text(FakeTokenizer(), np.array([1, 0, 2, 1, 3, 4])) == "ac\nde"


# ----- compressors -----

def test_xz_given_train_is_much_smaller_than_xz_alone_for_repeated_text():
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
    text = " ".join(rng.choice(words) for _ in range(4000)).encode()
    alone = demo_references.xz_size(text)
    given = demo_references.xz_size_given(text, text)
    assert given < alone / 10
    unrelated = bytes(rng.getrandbits(8) for _ in range(len(text)))
    assert demo_references.xz_size_given(unrelated, text) > alone * 0.9  # context that does not help, does not


def test_compressors_shrink_redundant_text_and_are_deterministic():
    text = b"the quick brown fox jumps over the lazy dog. " * 200
    assert demo_references.zstd_size(text) < len(text) / 20
    assert demo_references.xz_size(text) < len(text) / 20
    assert demo_references.zstd_size(text) == demo_references.zstd_size(text) and demo_references.xz_size(text) == demo_references.xz_size(text)


# ----- token models -----

def test_unigram_bits_by_hand():
    # counts 2, 1, 1, 0 over N = 4 tokens, V = 4, add 0.5: p = 2.5/6, 1.5/6, 1.5/6, 0.5/6
    bits = demo_references.unigram_bits(np.array([0, 0, 1, 2]), np.array([0, 3, 1]), vocab_size=4, add_k=0.5)
    expected = [-math.log2(2.5 / 6), -math.log2(0.5 / 6), -math.log2(1.5 / 6)]
    np.testing.assert_allclose(bits, expected)


def test_unigram_bpb_with_train_gpt_byte_accounting_by_hand():
    # ids: 0 boundary (BOS-like, 0 bytes), 1 "▁ab" (2 bytes + a space), 2 "c" (1 byte)
    tables = byte_tables([0, 2, 1], [False, True, False], [True, False, False])
    val = torch.tensor([0, 1, 2, 1])  # targets 1 (after a boundary: 2 bytes), 2 (1), 1 (2 + 1 space)
    byte_count = int(tables.target_bytes(val[:-1], val[1:]).sum())
    assert byte_count == 6
    train = np.array([0, 1, 1, 2])  # counts 1, 2, 1; add 0.5 over V = 3: p = 1.5/5.5, 2.5/5.5, 1.5/5.5
    bits = demo_references.unigram_bits(train, val[1:].numpy(), vocab_size=3, add_k=0.5)
    expected = (-2 * math.log2(2.5 / 5.5) - math.log2(1.5 / 5.5)) / 6
    assert demo_references.bits_per_byte(bits, byte_count) == pytest.approx(expected)


def test_bigram_kneser_ney_by_hand():
    # pairs (0,1) x2, (1,0) x2, (0,2) x1: n1 = 1, n2 = 2, so D = 1 / (1 + 4) = 0.2
    # every token is preceded by one distinct token: q = (1 + 0.5) / (3 + 1.5) = 1/3 each
    # p(1 | 0) = (2 - 0.2) / 3 + 0.2 * 2 / 3 * 1/3
    train = np.array([0, 1, 0, 1, 0, 2])
    bits, discount = demo_references.bigram_bits(train, np.array([0]), np.array([1]), vocab_size=3, base_add_k=0.5)
    assert discount == pytest.approx(0.2)
    assert bits[0] == pytest.approx(-math.log2(1.8 / 3 + 0.4 / 9))
    # token 2 never precedes anything: its successors get the continuation distribution
    bits, _ = demo_references.bigram_bits(train, np.array([2]), np.array([0]), vocab_size=3, base_add_k=0.5)
    assert bits[0] == pytest.approx(-math.log2(1 / 3))


def test_bigram_is_a_distribution_for_every_previous_token():
    rng = np.random.default_rng(0)
    vocab = 12
    train = rng.integers(0, vocab - 2, size=500)  # the last two ids never occur
    for prev in range(vocab):
        bits, _ = demo_references.bigram_bits(train, np.full(vocab, prev), np.arange(vocab), vocab_size=vocab)
        assert np.all(np.isfinite(bits))
        assert np.exp2(-bits).sum() == pytest.approx(1.0)


def test_bigram_beats_unigram_on_text_with_structure():
    rng = np.random.default_rng(1)
    vocab = 64
    successor = rng.permutation(vocab)  # each token is mostly followed by one fixed token

    def stream(n):
        out = [0]
        for _ in range(n - 1):
            out.append(successor[out[-1]] if rng.random() < 0.8 else int(rng.integers(vocab)))
        return np.array(out)

    train, val = stream(20_000), stream(2_000)
    unigram = demo_references.unigram_bits(train, val[1:], vocab).mean()
    bigram = demo_references.bigram_bits(train, val[:-1], val[1:], vocab)[0].mean()
    assert bigram < unigram - 2.0


# ----- logs and the summary -----

def test_log_fields_and_last_line():
    lines = ["eval_base val_loss:2.5 val_bpb:1.25000000 eval_time:123ms stride:64 tokens:100 bytes:300",
             "correction source:data/x.ctab entries:7 table_bytes:40 bytes_per_entry:5.714 format:2",
             "eval_base val_loss:2.0 val_bpb:1.00000000 eval_time:99ms stride:64 tokens:100 bytes:300"]
    fields = demo.last_line(lines, "eval_base", "eval")
    assert demo.number(fields, "val_bpb", "eval") == 1.0 and demo.number(fields, "eval_time", "eval") == 99
    assert demo.last_line(lines, "correction", "eval")["source"] == "data/x.ctab"
    with pytest.raises(demo.DemoError, match="eval_two_part"):
        demo.last_line(lines, "eval_two_part", "eval")
    with pytest.raises(demo.DemoError, match="nope"):
        demo.number(fields, "nope", "eval")


def test_run_child_streams_output_and_fails_loudly(capsys):
    lines = demo.run_child("ok", ["-c", "print('key:1'); print('done')"])
    assert lines == ["key:1", "done"]
    assert "  key:1" in capsys.readouterr().out  # shown as it comes, indented under the command
    with pytest.raises(demo.DemoError, match=r"broken failed \(exit status 3\)"):
        demo.run_child("broken", ["-c", "import sys; print('oops', file=sys.stderr); sys.exit(3)"])
    assert "oops" in capsys.readouterr().out  # the child's stderr is shown too


def fake_figures():
    fig = dict(base_bpb=1.9, corrected_bpb=1.7, two_part_bpb=1.95, prequant_bpb=1.88, val_token_bytes=435_401,
               artifact_total_bytes=3_000_000, model_bytes=2_940_000, counted_code_bytes=60_000, table_bytes=5_000,
               table_entries=2_500, eval_total_bytes=3_120_000, params=2_700_000, steps=200,
               stop_reason="iterations", train_ms=300_000.0, ttt_bpb=1.85, ttt_time_ratio=3.2, causal_bpb=1.3,
               ttt_causal_bpb=1.25, hint_bytes=84, legal_total_bytes=3_200_000, ttt_chunks=21, ttt_ms=200_000.0,
               legal_base_ms=60_000.0, hint_orders="1,2,3,4", hint_train_tokens=100_000,
               ttt_chosen="mode:phased lr:0.01 rank:8", ttt_slice_gain=0.05)
    refs = demo_references.References(val_targets=171_520, val_token_bytes=435_401, val_text_bytes=435_479, train_tokens=762_022,
                           train_text_bytes=1_963_928, zstd_bytes=89_146, xz_bytes=87_808, xz_given_train_bytes=77_852,
                           unigram_bpb=3.45, bigram_bpb=2.33, bigram_discount=0.52, seconds=2.0)
    return fig, refs


def test_table_has_every_row_and_is_aligned():
    fig, refs = fake_figures()
    table = demo.render_table(demo.summary_rows(fig, refs))
    for label in tuple(demo.ROWS.values()):
        assert label in table
    lines = table.splitlines()
    assert len(lines) == 2 + len(tuple(demo.ROWS.values()))
    assert len({len(line) for line in lines}) == 1  # every column padded to one width
    assert f"{8 * 89_146 / 435_479:.4f}" in table  # compressors divide by the raw text bytes
    assert "435,401" in table and "435,479" in table  # both byte totals shown


def test_notes_warn_when_the_model_loses_to_the_bigram():
    fig, refs = fake_figures()
    settings = demo.parse_args([])
    assert demo.summary_notes(fig, refs, settings)[-1].startswith("Check: the model beats the bigram by 0.4300")
    fig["base_bpb"] = 2.5
    assert demo.summary_notes(fig, refs, settings)[-1].startswith("WARNING")


def test_parse_args_scales_the_schedule_with_the_time():
    full = demo.parse_args([])
    assert (full.train_seconds, full.quick) == (demo.TRAIN_SECONDS, False)
    assert full.schedule == {k: demo.TRAIN_ENV[k] for k in demo.SCHEDULE_KEYS}
    quick = demo.parse_args(["--quick"])
    assert quick.quick and quick.train_seconds == demo.QUICK_TRAIN_SECONDS
    half = demo.parse_args(["--train-seconds", str(demo.TRAIN_SECONDS / 2)])
    assert half.schedule == {k: round(demo.TRAIN_ENV[k] / 2) for k in demo.SCHEDULE_KEYS}
    env = half.train_env()
    assert env["MAX_WALLCLOCK_SECONDS"] == str(demo.TRAIN_SECONDS / 2) and env["DEVICE"] == "cpu"
    assert env["ITERATIONS"] == str(half.schedule["ITERATIONS"])
    with pytest.raises(SystemExit):
        demo.parse_args(["--train-seconds", "0"])
