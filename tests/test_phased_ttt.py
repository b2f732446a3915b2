"""Phased score-first TTT (phased_ttt.py): documents scored alone, legal in every document and phase, complete,
the same on 1 and 2 ranks, never non-finite."""

import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import phased_ttt as ph
import train_gpt
from conftest import results_on_ranks, tiny_gpt

SEQ_LEN = 64
TARGETS = 2048
DOC_STARTS = (0, 150, 420, 500, 777, 1100, 1300, 1650, 1900)  # BOS here: nine documents, some longer than a window
CPU = torch.device("cpu")
# large enough steps that what is learned visibly moves later scores
SETTINGS = ph.PhasedSettings(doc_chunk_tokens=16, rank_r=4, lora_lr=0.05, phases=3, global_lr=0.05, batch_seqs=3,
                             doc_batch=3)


@pytest.fixture(scope="module")
def stream(tiny_data):
    """Real tokenized text cut into documents at DOC_STARTS, its byte tables and a tiny real GPT."""
    torch.set_num_threads(1)
    tokens = train_gpt.load_validation_tokens(tiny_data["data_path"], tiny_data["vocab_size"], SEQ_LEN)
    tokens = tokens[: TARGETS + 1].clone()
    tokens[tokens == ph.BOS_ID] = 5
    tokens[list(DOC_STARTS)] = ph.BOS_ID
    sp = train_gpt.load_tokenizer(tiny_data["tokenizer_path"], tiny_data["vocab_size"])
    return tokens, train_gpt.build_byte_tables(sp), tiny_gpt(tiny_data["vocab_size"])


def run(model, tokens, tables, s=SETTINGS, **kwargs):
    return ph.phased_evaluate(model, tokens, tables, SEQ_LEN, s, device=CPU, **kwargs)


def changed_at(tokens: torch.Tensor, p: int, vocab: int) -> torch.Tensor:
    other = tokens.clone()
    other[p + 1] = (int(tokens[p + 1]) + 1 + vocab // 2) % vocab
    if other[p + 1] == ph.BOS_ID:
        other[p + 1] += 1
    return other


def test_documents_phases_and_ranks_are_planned_as_said():
    tokens = np.array([1, 5, 6, 1, 7, 1, 8, 9, 9])
    docs = ph.document_bounds(tokens, tokens.size - 1)
    assert docs.tolist() == [0, 3, 5, 8]  # target 2 predicts the BOS at 3: the first document's last target
    assert ph.phase_bounds(docs, 2, 0).tolist() == [0, 1, 2]  # two thirds of the three documents: the last after
    assert ph.phase_bounds(docs, 3, 2).tolist() == [0, 1, 2]
    assert ph.phase_bounds(docs, 0, 0).tolist() == [0]
    assert ph.phase_bounds(np.arange(13), 3, 0).tolist() == [0, 3, 6, 9]  # 12 documents: 3 phases, 3 after
    shares = [ph.documents_of_rank(0, 3, docs, r, 2) for r in range(2)]
    assert [x.tolist() for x in shares] == [[0, 1], [2]]  # lengths 3, 2, 3: longest first (0, 2, 1), dealt in turn


def test_with_nothing_adapted_each_document_is_scored_alone(stream):
    """No LoRA step and no phase: every target's loss is the model's on its own document's tokens only (up to
    SEQ_LEN of them, the window ending at the chunk's end), one window at a time."""
    tokens, tables, model = stream
    s = ph.PhasedSettings(doc_chunk_tokens=16, lora_lr=0.0, phases=0, doc_batch=4)
    result = run(model, tokens, tables, s, count_positions=True)
    assert (result.scores.position_counts == 1).all() and result.phases_adapted == 0 and result.lora_steps == 0
    docs = ph.document_bounds(tokens.numpy(), TARGETS)
    model.eval()
    with torch.no_grad():
        for d in range(docs.size - 1):
            lo, hi = int(docs[d]), int(docs[d + 1])
            for c in range(lo, hi, 16):
                end = min(c + 16, hi)
                first = max(lo, c + 16 - SEQ_LEN)
                window = tokens[first : end + 1]
                nll = F.cross_entropy(model(window[None, :-1])[0], window[1:], reduction="none")
                torch.testing.assert_close(result.scores.position_losses[c:end], nll[c - first :], rtol=0, atol=2e-5)
    base = train_gpt.evaluate(model, tokens, tables, SEQ_LEN, 32, 8, CPU, False)
    assert (result.scores.token_count, result.scores.byte_count) == (base.token_count, base.byte_count)


def test_the_batching_of_documents_changes_nothing(stream):
    tokens, tables, model = stream
    one = run(model, tokens, tables, ph.PhasedSettings(**{**SETTINGS.__dict__, "doc_batch": 1}))
    four = run(model, tokens, tables, ph.PhasedSettings(**{**SETTINGS.__dict__, "doc_batch": 4}))
    assert one.phases_adapted == 3 and one.lora_steps > 0
    torch.testing.assert_close(one.scores.position_losses, four.scores.position_losses, rtol=0, atol=1e-5)


@pytest.mark.parametrize("p", [5, 160, 430, 800, 1400, 1950])  # documents in every phase and after
def test_changing_a_token_never_changes_an_earlier_score(stream, p):
    tokens, tables, model = stream
    reference = run(model, tokens, tables)
    base = run(model, tokens, tables, ph.PhasedSettings(doc_chunk_tokens=16, lora_lr=0.0, phases=0))
    assert reference.phases_adapted == 3
    assert (reference.scores.position_losses - base.scores.position_losses).abs().mean() > 1e-2  # it adapts
    after = run(model, changed_at(tokens, p, model.cfg.vocab_size), tables).scores.position_losses
    before = reference.scores.position_losses
    torch.testing.assert_close(after[:p], before[:p], rtol=0, atol=1e-6,
                               msg=lambda m: f"a change at position {p} moved an earlier score: {m}")
    assert after[p] != before[p]
    docs = ph.document_bounds(tokens.numpy(), TARGETS)
    doc_end = int(docs[np.searchsorted(docs, p, side="right")])
    if (doc_end - p) > 16:  # the LoRA step on the changed chunk moves this document's later chunks
        assert (after[(p // 16 + 1) * 16 : doc_end] - before[(p // 16 + 1) * 16 : doc_end]).abs().max() > 1e-4


def test_the_causality_check_has_teeth(stream):
    """A global step on a phase's documents before they are scored fails the same check."""
    tokens, tables, model = stream
    p = 430  # in the second phase's first document... any position of a phase moves its earlier documents
    before = run(model, tokens, tables, train_first=True).scores.position_losses
    after = run(model, changed_at(tokens, p, model.cfg.vocab_size), tables, train_first=True).scores.position_losses
    assert (after[:p] - before[:p]).abs().max() > 1e-4


def test_the_callers_model_is_left_as_it_was(stream):
    tokens, tables, model = stream
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    run(model, tokens, tables)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}


def test_a_diverging_step_stops_adapting_and_every_score_stays_finite(stream):
    tokens, tables, model = stream
    s = ph.PhasedSettings(**{**SETTINGS.__dict__, "global_lr": 1e38, "clip": 0.0, "lora_lr": 1e38})
    result = run(model, tokens, tables, s)
    assert np.isfinite(result.val_bpb) and torch.isfinite(result.scores.position_losses).all()
    assert any("nonfinite" in note for note in result.stopped), result.stopped
    assert "TTT_GLOBAL_LR" in result.stop_note() or "TTT_LR" in result.stop_note()


def test_a_budget_that_runs_out_still_scores_everything_once(stream):
    tokens, tables, model = stream
    clock = {"t": 0.0}

    def tick():
        clock["t"] += 0.5
        return clock["t"]

    s = ph.PhasedSettings(**{**SETTINGS.__dict__, "max_seconds": 6.0})
    result = run(model, tokens, tables, s, clock=tick, count_positions=True, pace=ph.Pace(1e-3, 1e-4, 0.5))
    assert (result.scores.position_counts == 1).all() and np.isfinite(result.val_bpb)
    assert result.stopped and result.phases_adapted < 3


def test_the_window_lengths_are_a_few_and_each_chunk_fits_its_own():
    assert ph.window_buckets(16, 64) == (16, 64) and ph.window_buckets(48, 2048) == (48, 192, 768, 2048)
    assert ph.window_buckets(64, 64) == (64,)
    for chunk, seq_len in ((16, 64), (48, 2048), (40, 100)):
        buckets = ph.window_buckets(chunk, seq_len)
        for j in range(ph.chunks_of(3 * seq_len, chunk)):
            width = ph.bucket_of(j, chunk, seq_len, buckets)
            assert min((j + 1) * chunk, seq_len) <= width <= seq_len  # the chunk's window fits, never past the window
    # the forwards a rank runs: one per chunk of each batch's longest document, by window length
    assert ph.bucket_steps(np.array([70, 20, 16, 5]), 16, 64, 2) == {16: 2, 64: 4}


def test_the_padding_changes_no_score(stream, monkeypatch):
    """Every window padded to the full length, or the padding made of other tokens: the same scores, LoRA steps and
    global steps included (the model is causal, and padding is out of every score and loss)."""
    tokens, tables, model = stream
    reference = run(model, tokens, tables)  # eager: the rows still running, windows just long enough
    assert reference.lora_steps > 0 and reference.phases_adapted == 3
    fixed = run(model, tokens, tables, fixed_shapes=True)  # a compiled pass's shapes, run eager
    torch.testing.assert_close(fixed.scores.position_losses, reference.scores.position_losses, rtol=0, atol=1e-5)
    monkeypatch.setattr(ph, "window_buckets", lambda chunk, seq_len: (seq_len,))
    widest = run(model, tokens, tables, fixed_shapes=True)
    torch.testing.assert_close(widest.scores.position_losses, reference.scores.position_losses, rtol=0, atol=1e-5)
    monkeypatch.undo()
    original = ph._Documents.window

    def noise_from(reach: int):
        """The windows with every token from `reach` before a document's end on replaced by random tokens: reach 0
        touches the padding only; reach 3 (the rule broken) reaches into the document."""
        def window(self, j, lo_t, len_t, longest=None):
            w, rel, off = original(self, j, lo_t, len_t, longest)
            noise = torch.randint(2, model.cfg.vocab_size, w.shape, generator=torch.Generator().manual_seed(j))
            return torch.where(rel[None, :] <= len_t[:, None] - reach, w, noise), rel, off
        return window

    monkeypatch.setattr(ph._Documents, "window", noise_from(0))
    noisy = run(model, tokens, tables, fixed_shapes=True)
    torch.testing.assert_close(noisy.scores.position_losses, reference.scores.position_losses, rtol=0, atol=1e-5)
    monkeypatch.setattr(ph._Documents, "window", noise_from(3))
    broken = run(model, tokens, tables, fixed_shapes=True)
    assert (broken.scores.position_losses - reference.scores.position_losses).abs().max() > 1e-3


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])  # inductor: the slow tier (minutes on 2 cores)
def test_a_compiled_pass_runs_a_few_graphs_all_compiled_on_random_tokens_first(stream, backend):
    """COMPILE=1 (inductor on the CPU; aot_eager: the same graphs without code generation): warm_up compiles every
    graph the pass needs on random tokens; the pass over documents of many lengths then compiles nothing, and its
    LoRA steps are the eager pass's (a compiled graph that missed the hooks would score as the model itself)."""
    tokens, tables, model = stream
    s = ph.PhasedSettings(**{**SETTINGS.__dict__, "doc_batch": 3})
    eager = run(model, tokens, tables, s)
    plain = run(model, tokens, tables, ph.PhasedSettings(**{**s.__dict__, "lora_lr": 0.0, "phases": 0}))
    compiled = train_gpt.compile_model(model, backend)
    graphs = lambda: int(torch._dynamo.utils.counters["stats"]["unique_graphs"])  # noqa: E731
    before = graphs()
    pace = ph.warm_up(compiled, SEQ_LEN, s, compile_backend=backend)
    warmed = graphs() - before
    buckets = ph.window_buckets(s.doc_chunk_tokens, SEQ_LEN)
    # per window length a forward with LoRA steps and one without, and the global step: 5 here
    assert 0 < warmed <= 2 * len(buckets) + 1, warmed
    assert [w for w, _, _ in pace.bucket_s] == list(buckets) and pace.global_step_s > 0
    lengths = np.diff(ph.document_bounds(tokens.numpy(), TARGETS))
    assert len(set(lengths.tolist())) == lengths.size > 5  # every document a length of its own
    result = ph.phased_evaluate(compiled, tokens, tables, SEQ_LEN, s, pace=pace, compile_backend=backend)
    assert graphs() - before == warmed  # quiet after the warm-up
    assert result.phases_adapted == 3 and result.lora_steps == eager.lora_steps
    # inductor's kernels round otherwise, and the LoRA's Adam steps carry that on: close to the eager pass, far
    # closer than the adaptation moved it
    moved = (eager.scores.position_losses - plain.scores.position_losses).abs().mean()
    apart = (result.scores.position_losses - eager.scores.position_losses).abs().mean()
    assert apart < 0.1 * moved and abs(result.val_bpb - eager.val_bpb) < 1e-3, (apart, moved)


@pytest.mark.parametrize("field,value,setting", [
    ("doc_chunk_tokens", SEQ_LEN + 1, "TTT_DOC_CHUNK_TOKENS"), ("rank_r", 0, "TTT_RANK"), ("lora_lr", -1.0, "TTT_LR"),
    ("global_lr", float("nan"), "TTT_GLOBAL_LR"), ("phases", -1, "TTT_PHASES"), ("doc_batch", 0, "TTT_DOC_BATCH"),
])
def test_bad_settings_are_refused_with_the_setting_and_the_fix(stream, field, value, setting):
    tokens, tables, model = stream
    with pytest.raises(ph.TTTSettingError, match=f"^{setting}=.* set"):
        run(model, tokens, tables, ph.PhasedSettings(**{**SETTINGS.__dict__, field: value}))


WORKER = textwrap.dedent("""
    import json, sys, torch, torch.distributed as dist
    import phased_ttt as ph, train_gpt
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    tokens, tables, state, cfg, settings = torch.load(sys.argv[1], weights_only=False)
    model = train_gpt.GPT(train_gpt.ModelConfig(**cfg))
    model.load_state_dict(state)
    r = ph.phased_evaluate(model, tokens, tables, 64, ph.PhasedSettings(**settings), rank=rank, world_size=world,
                           count_positions=True)
    if rank == 0:
        json.dump(dict(bpb=r.val_bpb, tokens=r.scores.token_count, bytes=r.scores.byte_count,
                       once=bool((r.scores.position_counts == 1).all()), phases=r.phases_adapted,
                       steps=r.global_steps, lora=r.lora_steps, losses=r.scores.position_losses.tolist()),
                  open(sys.argv[2], "w"))
    dist.destroy_process_group()
""")


# the demo's calibrated rates (Adam 0.01, SGD 0.03): at the test's far larger LoRA rate the adaptation is chaotic, and
# the global step's float rounding (the all-reduce sums in another order) grows to 5e-5 BPB by the last document
RANKS_SETTINGS = ph.PhasedSettings(**{**SETTINGS.__dict__, "lora_lr": 0.01, "global_lr": 0.03})


def test_one_rank_and_two_ranks_give_the_same_bpb(stream, tmp_path):
    tokens, tables, model = stream
    import dataclasses
    inputs = tmp_path / "inputs.pt"
    torch.save((tokens, tables, model.state_dict(), dataclasses.asdict(model.cfg), RANKS_SETTINGS.__dict__), inputs)
    results = results_on_ranks(tmp_path, WORKER, inputs)
    one, two = results[1], results[2]
    assert one["once"] and two["once"] and one["phases"] == two["phases"] == 3
    assert (one["tokens"], one["bytes"], one["steps"], one["lora"]) == (two["tokens"], two["bytes"], two["steps"],
                                                                         two["lora"])
    assert abs(one["bpb"] - two["bpb"]) < 1e-5, (one["bpb"], two["bpb"])
    # position by position: the global step's all-reduce sums in another order (1e-6 apart with no LoRA step), and
    # Adam's first steps move by the sign of a gradient, so a few later positions differ by up to ~3e-3 nats
    assert np.abs(np.array(one["losses"]) - np.array(two["losses"])).max() < 1e-2
