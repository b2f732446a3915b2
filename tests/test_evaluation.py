"""Evaluation: sliding windows cover every target once, and bits per byte count real bytes."""

import numpy as np
import pytest
import torch

import train_gpt
from conftest import reference_position_losses, tiny_gpt


@pytest.mark.parametrize("num_targets", [1, 5, 63, 64, 65, 127, 128, 1000, 4097])
@pytest.mark.parametrize("seq_len,stride", [(64, 64), (64, 1), (64, 7), (64, 32), (16, 5), (128, 100)])
def test_sliding_windows_score_every_target_exactly_once(num_targets, seq_len, stride):
    starts, scored_from, width = train_gpt.sliding_windows(num_targets, seq_len, stride)
    coverage = np.zeros(num_targets, dtype=np.int64)
    for start, first in zip(starts, scored_from):
        assert 0 <= start and start + width <= num_targets
        coverage[start + first : start + width] += 1
    assert (coverage == 1).all()
    if num_targets >= seq_len:  # every scored position after the first window has at least seq_len - stride of context
        context = np.concatenate([np.arange(first, width) for first in scored_from[1:]]) if len(starts) > 1 else []
        assert all(c >= seq_len - stride for c in context)


class BigramCounts(torch.nn.Module):
    """A stand-in model: logits from a fixed random table of the current token."""

    def __init__(self, vocab: int):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0)))

    def forward(self, idx, targets=None):
        return self.table[idx]


def test_sliding_evaluation_with_stride_equal_to_seq_len_is_standard_evaluation(tiny_data):
    tokens = train_gpt.load_validation_tokens(tiny_data["data_path"], tiny_data["vocab_size"], 64)
    sp = train_gpt.load_tokenizer(tiny_data["tokenizer_path"], tiny_data["vocab_size"])
    tables = train_gpt.build_byte_tables(sp)
    model = BigramCounts(tiny_data["vocab_size"])
    cpu = torch.device("cpu")
    standard = train_gpt.evaluate(model, tokens, tables, 64, 0, 16, cpu, False)
    sliding = train_gpt.evaluate(model, tokens, tables, 64, 64, 16, cpu, False, keep_positions=True)
    assert standard.token_count == sliding.token_count == tokens.numel() - 1
    assert standard.byte_count == sliding.byte_count
    assert abs(standard.val_bpb - sliding.val_bpb) < 1e-9
    # with a context-free model, overlapping windows change nothing either, and every position is kept
    overlapping = train_gpt.evaluate(model, tokens, tables, 64, 16, 16, cpu, False, keep_positions=True)
    assert abs(overlapping.val_bpb - standard.val_bpb) < 1e-9
    torch.testing.assert_close(overlapping.position_losses, sliding.position_losses)


def test_counted_bytes_equal_the_utf8_length_of_the_decoded_text(tiny_data):
    sp = train_gpt.load_tokenizer(tiny_data["tokenizer_path"], tiny_data["vocab_size"])
    tables = train_gpt.build_byte_tables(sp)
    docs = tiny_data["docs"][:60] + ["Ünïcödé — “quotes”, emoji 🙂 and 12345 digits.", "  leading spaces"]
    stream, expected_bytes = [], 0
    for doc in docs:
        ids = sp.encode(doc)
        stream += [1] + ids
        expected_bytes += len(sp.decode(ids).encode("utf-8"))
    tokens = torch.tensor(stream)
    counted = int(tables.target_bytes(tokens[:-1], tokens[1:]).sum())
    assert counted == expected_bytes


@pytest.fixture(scope="module")
def val_setup(tiny_data):
    tokens = train_gpt.load_validation_tokens(tiny_data["data_path"], tiny_data["vocab_size"], 32)[: 32 * 23 + 1]
    sp = train_gpt.load_tokenizer(tiny_data["tokenizer_path"], tiny_data["vocab_size"])
    return tokens, train_gpt.build_byte_tables(sp), tiny_gpt(tiny_data["vocab_size"])


def test_standard_evaluation_equals_the_models_own_loss_over_the_same_windows(val_setup):
    tokens, tables, model = val_setup
    result = train_gpt.evaluate(model, tokens, tables, 32, 0, 5, torch.device("cpu"), False)
    windows = tokens[:-1].view(-1, 32), tokens[1:].view(-1, 32)  # 23 windows: 4 full batches of 5 and 3 padded
    with torch.no_grad():
        own = torch.stack([model(x[None], y[None]) for x, y in zip(*windows)]).double().mean().item()
    assert result.token_count == tokens.numel() - 1
    assert abs(result.val_loss - own) < 1e-5


@pytest.mark.parametrize("stride,batch_seqs", [(8, 4), (8, 7), (5, 64), (32, 3)])
def test_every_sliding_position_loss_equals_a_separate_forward_over_its_window(val_setup, stride, batch_seqs):
    tokens, tables, model = val_setup
    result = train_gpt.evaluate(model, tokens, tables, 32, stride, batch_seqs, torch.device("cpu"), False,
                                keep_positions=True)
    reference = reference_position_losses(model, tokens, 32, stride)
    torch.testing.assert_close(result.position_losses.double(), reference, atol=2e-5, rtol=0)
    assert abs(result.loss_sum - reference.sum().item()) < 1e-3
    assert result.byte_count == int(tables.target_bytes(tokens[:-1], tokens[1:]).sum())


def test_evaluation_calls_the_model_with_one_batch_shape_whatever_the_remainder(val_setup):
    tokens, tables, model = val_setup
    shapes = []
    handle = model.register_forward_hook(lambda module, args, out: shapes.append(tuple(args[0].shape)))
    try:
        for stride in (0, 7):
            shapes.clear()
            train_gpt.evaluate(model, tokens, tables, 32, stride, 6, torch.device("cpu"), False)
            assert len(shapes) > 1 and set(shapes) == {(6, 32)}  # the short last batch is padded
    finally:
        handle.remove()
