"""Shared fixtures: a tiny real dataset (SentencePiece tokenizer + shards) and tiny-model settings."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "records"))

import log_format  # noqa: E402
import train_gpt  # noqa: E402

TINY_VOCAB = 512


def natural_text_documents() -> list[str]:
    """Real English prose that every CPython carries: the help topics of pydoc."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def train_tiny_tokenizer(docs: list[str], out_prefix: Path, vocab_size: int = TINY_VOCAB) -> Path:
    import sentencepiece as spm

    text_file = out_prefix.with_suffix(".txt")
    text_file.write_text("\n".join(docs))  # one line per paragraph: SentencePiece skips very long lines
    spm.SentencePieceTrainer.train(
        input=str(text_file), model_prefix=str(out_prefix), model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, split_digits=True, normalization_rule_name="nmt_nfkc", add_dummy_prefix=False,
        character_coverage=0.999, pad_id=0, bos_id=1, eos_id=2, unk_id=3, num_threads=1,
        input_sentence_size=200000, shuffle_input_sentence=False, minloglevel=2)
    return out_prefix.with_suffix(".model")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict:
    """A tokenizer and shards: the first 40 help topics are validation, the rest training."""
    import sentencepiece as spm

    root = tmp_path_factory.mktemp("tiny_data")
    docs = natural_text_documents()
    model = train_tiny_tokenizer(docs, root / "tok")
    sp = spm.SentencePieceProcessor(model_file=str(model))
    def stream(ds):
        return np.concatenate([np.array([1] + sp.encode(d), dtype=np.uint16) for d in ds])
    data_dir = root / "shards"
    train_gpt.write_data_shard(data_dir / "fineweb_val_000000.bin", stream(docs[:40]))
    train_tokens = stream(docs[40:])
    half = train_tokens.size // 2
    train_gpt.write_data_shard(data_dir / "fineweb_train_000000.bin", train_tokens[:half])
    train_gpt.write_data_shard(data_dir / "fineweb_train_000001.bin", train_tokens[half:])
    return {"data_path": str(data_dir), "tokenizer_path": str(model), "vocab_size": TINY_VOCAB, "docs": docs}


BUILTIN_VAL_DOCS = 60  # the built-in corpus's validation split in the tests that prepare it
BUILTIN_VOCABS = (1024, 4096, 8192)


@pytest.fixture(scope="session")
def builtin_tokenizers():
    """The built-in corpus and plain tokenizers (data/prepare.py's settings) trained on all but its first
    BUILTIN_VAL_DOCS documents, at each of BUILTIN_VOCABS."""
    from test_data_prepare import builtin_corpus, prepare

    docs, _ = builtin_corpus.builtin_documents()
    return docs, {v: prepare.tokenizer_from_bytes(prepare.train_tokenizer(iter(docs[BUILTIN_VAL_DOCS:]), v)[0])
                  for v in BUILTIN_VOCABS}


@pytest.fixture(scope="session")
def case_ops_tokenizers(builtin_tokenizers):
    """Case-operator tokenizers (data/prepare.py --case-ops: the transformed text, markers declared, identity
    normaliser) on the same training documents, at 1024 and 8192: {vocab: the model's bytes}."""
    from test_data_prepare import prepare

    docs, _ = builtin_tokenizers
    return {v: prepare.train_tokenizer(map(prepare.case_ops.encode, docs[BUILTIN_VAL_DOCS:]), v,
                                       prepare.CASE_OPS_TOKENIZER_SETTINGS)[0] for v in (1024, 8192)}


def tiny_env(tiny_data: dict, out_dir: Path, **overrides) -> dict:
    """Environment for a tiny, fast CPU run of train_gpt.py."""
    settings = dict(
        DATA_PATH=tiny_data["data_path"], TOKENIZER_PATH=tiny_data["tokenizer_path"],
        VOCAB_SIZE=tiny_data["vocab_size"], OUTPUT_DIR=out_dir, RUN_ID="test", DEVICE="cpu",
        NUM_LAYERS=2, MODEL_DIM=64, NUM_HEADS=4, NUM_KV_HEADS=2, MLP_MULT=3,
        BIGRAM_VOCAB_SIZE=256, BIGRAM_DIM=16, TRAIN_SEQ_LEN=64, TRAIN_BATCH_TOKENS=1024,
        ITERATIONS=6, WARMDOWN_ITERS=3, WARMUP_STEPS=2, MAX_WALLCLOCK_SECONDS=0, VAL_LOSS_EVERY=0,
        VAL_BATCH_SIZE=4096, VAL_MAX_TOKENS=4097, TRAIN_LOG_EVERY=1, EVAL_STRIDE=32, EVAL_BATCH_SEQS=16,
        SWA_EVERY=2, ZSTD_LEVEL=3, COMPILE=0, GPTQ_RESERVE_SECONDS=0)  # caps of seconds: nothing reserved for GPTQ
    settings.update(overrides)
    env = {k: v for k, v in os.environ.items() if k not in settings}
    env.update({k: str(v) for k, v in settings.items()})
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(REPO)
    return env


def run_script(args: list[str], env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def run_torchrun(nproc: int, script: str, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    args = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script]
    return run_script(args, env, timeout)


def results_on_ranks(tmp_path: Path, worker: str, inputs: Path, counts=(1, 2)) -> dict:
    """Runs the script `worker` (source text) under torchrun with each number of processes in counts, as
    `worker INPUTS OUT`; returns {count: the JSON it wrote to OUT}. For the 1 rank == N ranks tests."""
    script = tmp_path / "worker.py"
    script.write_text(worker)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    results = {}
    for nproc in counts:
        out = tmp_path / f"out{nproc}.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(script), str(inputs), str(out)]
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        results[nproc] = json.loads(out.read_text())
    return results


def log_value(text: str, tag: str, key: str, **match: str) -> float:
    """The number `key:` holds on the last `tag` line (records/log_format.py reads it) whose fields
    include `match`, e.g. log_value(out, "train_step", "train_loss", step="3/3")."""
    lines = [l for l in log_format.read_lines(text) if l.tag == tag and key in l.fields
             and all(l.fields.get(k) == v for k, v in match.items())]
    assert lines, f"no {tag} line with {key}: {match or ''} in output:\n{text[-3000:]}"
    return float(lines[-1].fields[key].removesuffix("ms"))


def tiny_gpt(vocab: int, seed: int = 0) -> "train_gpt.GPT":
    """The real model at a tiny size, every weight random (no zero projections), so that
    context and position matter to every loss."""
    cfg = train_gpt.ModelConfig(vocab_size=vocab, num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2,
                                mlp_mult=2, rope_base=10000.0, logit_softcap=30.0, qk_gain_init=1.5,
                                tied_embed_init_std=0.02, bigram_vocab_size=64, bigram_dim=8, bigram_scale_init=0.05)
    import torch

    torch.manual_seed(seed)
    model = train_gpt.GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def reference_position_losses(model, tokens, seq_len: int, stride: int, boost_tokens=None,
                              boost: float = 0.0):
    """Every target's loss from its own forward pass, one window at a time, with no batching,
    padding or masking: the definition train_gpt.evaluate must reproduce. boost_tokens (N,) with
    -1 for none adds `boost` to that token's logit at that position inside the forward pass."""
    import torch
    import torch.nn.functional as F

    num_targets = tokens.numel() - 1
    starts, scored_from, width = train_gpt.window_plan(num_targets, seq_len, stride)
    losses = torch.full((num_targets,), float("nan"), dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        for start, first in zip(starts.tolist(), scored_from.tolist()):
            window = tokens[start : start + width + 1]
            logits = model(window[None, :-1])[0].double()  # (width, vocab)
            if boost_tokens is not None:
                wanted = boost_tokens[start : start + width]
                rows = (wanted >= 0).nonzero().squeeze(-1)
                logits[rows, wanted[rows]] += boost
            nll = F.cross_entropy(logits, window[1:], reduction="none")
            assert torch.isnan(losses[start + first : start + width]).all(), "a position scored twice"
            losses[start + first : start + width] = nll[first:]
    return losses


# ----- the quick tier ------------------------------------------------------------------------------
# `bash scripts/test.sh --quick` (pytest -m "not slow") runs the fast tests only, for iterating on one
# file; CI and the README's test command run every test. A test is slow when it needs a fixture below
# (a model trained by train_gpt.py, data made by prepare.py) or is named here (by name, all its cases, or
# name[case]): those run scripts as processes, or were the costliest in-process (the default 11-layer
# model's exports, the knob searches, compilation: 5 to 87 CPU-seconds each). Measured 2026-12-07 on the
# 2-core AMD EPYC VM: the quick tier, 554 tests, in 151 CPU-seconds (user + system); the 12 tests named
# for their cost alone took 259 more. tests/test_docs.py checks that every name exists.
SLOW_FIXTURES = {"trained", "legal_run", "prepared", "sp8192_data", "case_ops_tokenizers"}
# a parametrized fixture's costlier variant: every case that runs with it (the split checks repeat on case operators)
SLOW_PARAMS = {"test_official_split.py": "case_ops"}
SLOW_TESTS = {
    "test_bad_input.py": {"test_a_bad_setting_is_refused_before_anything_runs",
                          "test_an_output_that_cannot_be_written_is_refused_before_training",
                          "test_a_diverging_run_stops_at_the_step_and_keeps_the_earlier_artifact",
                          "test_under_torchrun_a_bad_setting_is_reported_once",
                          "test_a_shard_with_no_tokens_is_refused_instead_of_hanging"},
    "test_causal_hints.py": {"test_search_result_beats_a_fixed_beta_on_unseen_text",
                             "test_the_exports_reserve_holds_what_the_largest_knobs_add_to_the_file"},
    "test_bad_input_surfaces.py": "all",
    "test_case_ops.py": {"test_a_case_operator_run_goes_from_training_to_the_legal_evaluation"},
    "test_compile_variants.py": "all",
    "test_data_prepare.py": {"test_builtin_corpus_is_big_enough_and_deterministic"},
    "test_depth_recurrence.py": {"test_the_order_is_the_records_and_the_plain_stack_when_off",
                                 "test_a_looped_model_is_the_unrolled_model_with_shared_weights[recipe_all_on]"},
    "test_eval_budget.py": {"test_two_ranks_with_a_skewed_clock_follow_one_clock", "test_setup_keeps_an_installed_torch"},
    "test_export_rd.py": {"test_the_frontier_shape_fits_under_the_cap_with_no_more_error_than_1855s_rule_at_its_bytes",
                          "test_a_version_4_artifact_reads_back_every_group_whatever_its_codec_and_orientation"},
    "test_frontier_recipe.py": {"test_the_preset_at_a_cpu_size_runs_the_legal_pipeline_and_eval_final_reproduces_it",
                                "test_the_preset_at_a_cpu_size_is_not_worse_than_todays_defaults_beyond_the_noise_of_two_seeds"},
    "test_gpu_check.py": "all",
    "test_log_format.py": {"test_every_line_the_scripts_and_make_record_print_is_a_log_line"},
    "test_model_and_quant.py": {"test_trained_like_default_model_exports_under_the_cap_with_the_code",
                                "test_optimizer_groups_follow_the_records_for_the_default_model",
                                "test_muon_orthogonalized_update_has_singular_values_near_one[shape3]",
                                "test_a_small_cap_walks_down_every_rung_of_the_ladder_and_each_reads_back",
                                "test_compiled_fullgraph_forward_matches_eager_on_cpu"},
    "test_phased_ttt.py": {"test_one_rank_and_two_ranks_give_the_same_bpb",
                           "test_a_compiled_pass_runs_a_few_graphs_all_compiled_on_random_tokens_first[inductor]"},
    "test_quantize.py": {"test_a_training_run_exports_with_gptq_and_lqer_and_logs_them"},
    "test_run_integrity.py": {"test_a_looped_model_runs_the_whole_legal_pipeline_and_its_figure_is_reproduced",
                              "test_a_second_training_into_the_same_folder_is_refused_and_the_first_keeps_its_own",
                              "test_a_full_disk_keeps_the_weights_and_leaves_no_half_log_in_the_way",
                              "test_a_real_full_disk_through_the_command"},
    "test_score_first_ttt.py": {"test_one_rank_and_two_ranks_give_the_same_bpb"},
    "test_seed_interface.py": {"test_eval_seq_len_equal_to_training_reproduces_the_base_score_bit_for_bit",
                               "test_other_windows_score_every_target_exactly_once",
                               "test_standard_windows_that_leave_targets_unscored_are_refused",
                               "test_the_seeds_table_applies_like_ours_and_is_logged_unverified"},
    "test_train_runs.py": "all",
    "test_vocab_sizes.py": {"test_the_whole_pipeline_runs_at_vocabulary_8192",
                            "test_trained_like_default_model_at_vocabulary_8192_exports_under_the_cap_with_the_code"},
}


def is_slow(file_name: str, test_name: str, case_name: str, fixtures, params: dict | None = None) -> bool:
    """test_name: the function's name; case_name: with its parametrization, as pytest names the item;
    params: the parameter values of its case."""
    named = SLOW_TESTS.get(file_name, ())
    return named == "all" or test_name in named or case_name in named or bool(SLOW_FIXTURES & set(fixtures)) or (
        SLOW_PARAMS.get(file_name) in (params or {}).values())


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: left out of the quick tier (bash scripts/test.sh --quick)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if is_slow(item.path.name, getattr(item, "originalname", item.name), item.name,
                   getattr(item, "fixturenames", ()), getattr(getattr(item, "callspec", None), "params", None)):
            item.add_marker(pytest.mark.slow)
