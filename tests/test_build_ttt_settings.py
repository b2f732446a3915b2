"""build_ttt_settings.py: the slice TTT's settings are chosen on is whole held-out training documents, and the search
covers the phases and both modes."""

import dataclasses

import numpy as np
import pytest

import build_ttt_settings as builder
import eval_final
import train_gpt


@pytest.fixture(scope="module")
def settings(tiny_data):
    return eval_final.EvalSettings.from_env(dict(DATA_PATH=tiny_data["data_path"],
                                                 TOKENIZER_PATH=tiny_data["tokenizer_path"],
                                                 CALIBRATE_TTT_TOKENS="3000", EVAL_STRIDE="32"))


def test_the_slice_is_the_last_shards_last_whole_documents(settings, tiny_data):
    shard, tokens, documents = builder.held_out_documents(settings, tiny_data["vocab_size"], 64)
    stream = train_gpt.load_data_shard(shard, tiny_data["vocab_size"]).astype(np.int64)
    assert shard.name == "fineweb_train_000001.bin"  # the last training shard, never a validation one
    n = tokens.numel() - 1
    assert 64 <= n <= 3000 and tokens[0] == builder.BOS_ID  # a document's start: no document cut at the front
    assert np.array_equal(tokens.numpy(), stream[-(n + 1):])  # to the shard's end, where the training text ends
    assert documents == int((tokens[:-1] == builder.BOS_ID).sum()) > 1
    start = stream.size - 1 - n
    earlier = np.flatnonzero(stream[:start] == builder.BOS_ID)
    assert stream.size - 1 - earlier[-1] > 3000  # as many whole documents as fit: one more would not


def test_with_standard_windows_the_slice_is_whole_windows(settings, tiny_data):
    s = dataclasses.replace(settings, eval_stride=0)
    _, tokens, _ = builder.held_out_documents(s, tiny_data["vocab_size"], 64)
    assert (tokens.numel() - 1) % 64 == 0


@pytest.mark.parametrize("count", [0, 10**8])
def test_a_slice_that_holds_no_whole_document_or_more_than_the_shard_is_refused_with_the_range(settings, tiny_data,
                                                                                              count):
    s = dataclasses.replace(settings, calibrate_ttt_tokens=count)
    with pytest.raises(train_gpt.InputError, match=f"^CALIBRATE_TTT_TOKENS={count}: .* set CALIBRATE_TTT_TOKENS "
                                                   r"between \d+ and \d+"):
        builder.held_out_documents(s, tiny_data["vocab_size"], 64)


def test_the_search_covers_the_phases_and_both_modes_and_a_hand_setting_stays_with_its_mode(settings):
    assert builder.MODES == ("phased", "full")
    start, stages = builder.SEARCH["phased"]
    assert start["TTT_LR"] == start["TTT_GLOBAL_LR"] == 0.0  # the phased start adapts nothing
    assert "TTT_PHASES" in [stage.name for stage in stages] and start["TTT_PHASES"] == 3
    fixed = {"TTT_CHUNK_TOKENS": 4096, "TTT_DOC_CHUNK_TOKENS": 64, "TTT_LR": 0.01}
    phased, hand, unread = builder.mode_settings(dataclasses.replace(settings, ttt_chunk_tokens=4096,
                                                                     ttt_doc_chunk_tokens=64), "phased", fixed)
    assert unread == ["TTT_CHUNK_TOKENS"] and hand == {"TTT_DOC_CHUNK_TOKENS": 64, "TTT_LR": 0.01}
    assert phased.ttt_mode == "phased" and phased.ttt_chunk_tokens == eval_final.EvalSettings.ttt_chunk_tokens
    dataclasses.replace(phased, use_ttt=True).check_evaluation()  # what the mode never reads is not carried into it


def test_the_search_keeps_its_start_unless_a_candidate_beats_it(settings):
    s = dataclasses.replace(settings, ttt_mode="phased")
    said = []
    # a slice on which a global step pays a little, and more with 6 phases
    score = lambda t: 1.0 - 0.01 * (t.ttt_global_lr > 0) - 0.1 * (t.ttt_global_lr > 0) * (t.ttt_phases == 6)  # noqa
    chosen, bpb = builder.search(s, score, said.append)
    assert chosen["TTT_PHASES"] == 6 and chosen["TTT_GLOBAL_LR"] > 0 and bpb == pytest.approx(0.89)
    assert chosen["TTT_LR"] == 0.0  # no LoRA rate beat the start
    assert any("ttt_phases:6" in line for line in said)


# The previous builder's phased search (commit 66fd1a6), as data: this search must score every candidate it scored
PREVIOUS_PHASED_SEARCH = ({"TTT_LR": 0.0, "TTT_RANK": 8, "TTT_GLOBAL_LR": 0.0, "TTT_PHASES": 3, "TTT_EPOCHS": 1},
                          [builder.Stage("TTT_LR", (0.003, 0.01, 0.03)),
                           builder.Stage("TTT_RANK", (16,), "TTT_LR"),
                           builder.Stage("TTT_GLOBAL_LR", (0.01, 0.03, 0.1)),
                           builder.Stage("TTT_EPOCHS", (2,), "TTT_GLOBAL_LR")])


@pytest.mark.parametrize("seed", range(20))
def test_on_one_slice_the_search_finds_at_least_what_the_previous_builders_found(settings, monkeypatch, seed):
    s = dataclasses.replace(settings, ttt_mode="phased")
    rng = np.random.default_rng(seed)
    slice_bpb, runs = {}, []  # a made-up slice: every candidate its own score, the same whichever search asks

    def score(trial):
        key = (trial.ttt_lr, trial.ttt_rank, trial.ttt_global_lr, trial.ttt_phases, trial.ttt_epochs)
        runs.append(key)
        return slice_bpb.setdefault(key, float(rng.uniform(1.0, 2.0)))

    _, bpb = builder.search(s, score, lambda line: None)
    ours = set(runs)
    assert len(runs) == len(ours)  # no candidate scored twice
    with monkeypatch.context() as m:
        m.setitem(builder.SEARCH, "phased", PREVIOUS_PHASED_SEARCH)
        runs.clear()
        _, previous_bpb = builder.search(s, score, lambda line: None)
    assert set(runs) <= ours and bpb <= previous_bpb


def test_a_global_step_that_does_not_pay_at_the_start_is_searched_as_a_whole_before_it_is_given_up(settings):
    s = dataclasses.replace(settings, ttt_mode="phased")
    said = []
    # a slice on which the LoRA pays, a global step costs a little at 3 phases and pays with 1 phase only
    score = lambda t: (1.0 - 0.05 * (t.ttt_lr > 0) + 0.001 * (t.ttt_global_lr > 0)  # noqa
                       - 0.01 * (t.ttt_global_lr > 0) * (t.ttt_phases == 1))
    chosen, bpb = builder.search(s, score, said.append)
    assert chosen["TTT_PHASES"] == 1 and chosen["TTT_GLOBAL_LR"] > 0 and bpb == pytest.approx(0.941)
    no_step = [line for line in said if "ttt_global_lr:0.0 " in line]
    assert all("ttt_phases:3" in line for line in no_step)  # the phases were searched with a global step only
