"""Bigger vocabularies (SP4096, SP8192): the byte accounting of BPB at each size, and the whole pipeline at 8192
on the built-in corpus at a tiny size (prepare -> train -> export -> causal-hint builder -> eval_final with
score-first TTT and the hints, and with the val-derived table)."""

import dataclasses
import os

import numpy as np
import pytest
import torch

import train_gpt
from conftest import BUILTIN_VAL_DOCS, BUILTIN_VOCABS, log_format, log_value, run_script, tiny_env

VOCABS = BUILTIN_VOCABS
VAL_DOCS = BUILTIN_VAL_DOCS
# Text beyond the corpus's English: accents, a dash, Greek and CJK, which the tokenizers take through
# byte fallback (one counted byte a piece) or as multi-byte pieces.
EXTRA_TEXT = "Naïve café owners — and the Ω of 東京 — met in 1999 at the old gare du Nord."


def test_every_vocabulary_counts_exactly_the_texts_utf8_bytes(builtin_tokenizers):
    """BPB's denominator (SPEC section 5: piece bytes, a leading space counted after a non-boundary token,
    byte-fallback pieces one byte each) equals the UTF-8 bytes of the text, at 1024, 4096 and 8192, on
    text that SentencePiece's normalisation leaves as it is (single spaces)."""
    docs, tokenizers = builtin_tokenizers
    texts = [" ".join(d.split()) for d in docs[:VAL_DOCS]] + [EXTRA_TEXT]
    exact = [t for t in texts if all(sp.decode(sp.encode(t)) == t for sp in tokenizers.values())]
    assert len(exact) > VAL_DOCS // 2 and EXTRA_TEXT in exact
    expected = sum(len(t.encode("utf-8")) for t in exact)
    counts = {}
    for vocab, sp in tokenizers.items():
        assert sp.vocab_size() == vocab
        stream = torch.from_numpy(np.concatenate([np.array([1] + sp.encode(t), dtype=np.int64) for t in exact]))
        tables = train_gpt.build_byte_tables(sp)
        counts[vocab] = int(tables.target_bytes(stream[:-1], stream[1:]).sum())
        assert any(sp.is_byte(i) for i in sp.encode(EXTRA_TEXT))  # the byte-fallback path is exercised
    assert counts == {v: expected for v in VOCABS}


@pytest.fixture(scope="module")
def sp8192_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("sp8192") / "data"
    run = run_script(["data/prepare.py", "--builtin", "--vocab-size", "8192", "--val-docs", str(VAL_DOCS),
                      "--shard-tokens", "200000", "--out-dir", str(out)], dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stderr[-3000:]
    return {"data_path": str(out), "tokenizer_path": str(out / "sp8192_bpe.model"), "vocab_size": 8192}


def ok(run) -> str:
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    return run.stdout


def test_the_whole_pipeline_runs_at_vocabulary_8192(sp8192_data, tmp_path):
    env = tiny_env(sp8192_data, tmp_path, ITERATIONS=8, AUTOCAST_BF16=0)
    trained = ok(run_script(["train_gpt.py"], env))
    assert "split:first_documents split_val_docs:60 split_check:document_hash" in trained
    assert log_value(trained, "model", "params") > 8192 * 64  # the tied 8192 x 64 embedding
    rung = [line for line in log_format.read_lines(trained) if line.tag in ("export_rung", "export_rd")][-1]
    assert rung.fields["fits"] == "1"
    final = log_value(trained, "final_int6_zstd_roundtrip_exact", "val_bpb")
    assert 0 < final < 20

    env["CHECKPOINT"] = str(tmp_path / train_gpt.ARTIFACT_NAME)
    assert train_gpt.read_artifact(env["CHECKPOINT"]).model_config.vocab_size == 8192
    ok(run_script(["build_correction_table.py"], dict(env, CORRECTION_MODE="causal", HINT_TRAIN_TOKENS="3000")))
    legal = ok(run_script(["eval_final.py"], dict(env, CHECKPOINT=str(tmp_path / "final_model.int6.with_hints.ptz"),
                                                  USE_CORRECTION="1", CORRECTION_MODE="causal", USE_TTT="1",
                                                  TTT_CHUNK_TOKENS="1024", TTT_LR="0.05")))
    base = log_value(legal, "eval_base", "val_bpb")
    assert abs(base - final) < 1e-5  # the artifact scores in eval_final.py as the training run scored it
    assert log_value(legal, "ttt", "chunks_adapted") == 3 and log_value(legal, "eval_ttt", "val_bpb") != base
    assert log_value(legal, "eval_causal", "val_bpb") != base and np.isfinite(log_value(legal, "eval_ttt_causal",
                                                                                         "val_bpb"))
    table = ok(run_script(["eval_final.py"], dict(env, USE_CORRECTION="1")))
    assert log_value(table, "eval_corrected_valderived", "val_bpb") < log_value(table, "eval_base", "val_bpb")


def test_bigram_hash_buckets_stay_exact_at_vocabulary_8192():
    """(previous, current) pairs of the largest ids hash without overflow into buckets 1 .. n-1 (0: the first
    position and a document's BOS, which has no previous token), exactly as the formula says in Python's
    unbounded integers."""
    cfg = train_gpt.ModelConfig.from_settings(train_gpt.Settings(vocab_size=8192))
    bigram = train_gpt.BigramHash(cfg)
    ids = [8191, 8191, 0, 8191, 4097, 1, 8190]
    got = bigram.buckets(torch.tensor([ids]))[0].tolist()
    n = cfg.bigram_vocab_size
    expected = [0] + [0 if c == train_gpt.BOS_ID else ((p * 8192 + c) * 2654435761) % (1 << 32) % (n - 1) + 1
                      for p, c in zip(ids, ids[1:])]
    hashed = [b for b, c in zip(got[1:], ids[1:]) if c != train_gpt.BOS_ID]
    pairs = {(p, c) for p, c in zip(ids, ids[1:]) if c != train_gpt.BOS_ID}
    assert got == expected and len(set(hashed)) == len(pairs)


def test_trained_like_default_model_at_vocabulary_8192_exports_under_the_cap_with_the_code():
    """The default 11-layer model at 8192 tokens, trained-like weights, as the README's SP8192 run exports it
    (USE_MIXED_QUANT=1: the ladder starts at mlp_int5, the rung QAT trained): under the cap with every byte
    of the legal evaluation's code counted. The rungs above it do not fit (bench/quant_gap.py sizes, docs/vocabularies.md);
    starting where the run starts costs one zstd-22 pack instead of four."""
    from test_model_and_quant import trained_like_state

    s = train_gpt.Settings(vocab_size=8192, use_mixed_quant=True)
    cfg = train_gpt.ModelConfig.from_settings(s)
    state = trained_like_state(cfg)
    counted = train_gpt.counted_code(s.export_for_eval, s.ship_code)
    code = counted.code_bytes + counted.reserve_bytes
    lines = []
    blob, rung = train_gpt.export_artifact(state, {"model_config": dataclasses.asdict(cfg)}, code,
                                           train_gpt.ARTIFACT_CAP_BYTES, 22, train_gpt.MIXED_QUANT_RUNG, lines.append)
    print("\n".join(lines))
    assert rung.name == "mlp_int5" and rung.embedding_bits == 7 and "off_qat_grid:none" in lines[0]
    assert len(blob) + code <= train_gpt.ARTIFACT_CAP_BYTES
    loaded = train_gpt.unpack_artifact(blob, "<memory>")
    assert loaded.model_config.vocab_size == 8192 and loaded.state["tok_emb.weight"].shape == (8192, 512)
