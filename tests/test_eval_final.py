"""eval_final.py and build_correction_table.py on a tiny trained artifact."""

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import correction_table as ct
import eval_final
import train_gpt
from conftest import REPO, log_value, reference_position_losses, run_script, run_torchrun, tiny_env


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    env = tiny_env(tiny_data, out, ITERATIONS=20, AUTOCAST_BF16=0)  # scores compared to 1e-6: one precision
    run = run_script(["train_gpt.py"], env)
    assert run.returncode == 0, run.stderr[-3000:]
    env["CHECKPOINT"] = str(out / train_gpt.ARTIFACT_NAME)
    return {"env": env, "train_stdout": run.stdout, "out": out, "checkpoint": out / train_gpt.ARTIFACT_NAME}


def eval_run(trained, nproc=1, script="eval_final.py", **overrides):
    env = dict(trained["env"], **{k: str(v) for k, v in overrides.items()})
    run = run_torchrun(nproc, script, env) if nproc > 1 else run_script([script], env)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def test_base_score_equals_the_training_roundtrip_on_one_and_two_ranks(trained):
    logged = log_value(trained["train_stdout"], "final_int8_zlib_roundtrip_exact", "val_bpb")
    one = log_value(eval_run(trained), "eval_base", "val_bpb")
    two = log_value(eval_run(trained, nproc=2), "eval_base", "val_bpb")
    assert abs(one - logged) < 1e-6 and abs(two - one) < 1e-6


def in_forward_reference(trained, table: ct.CorrectionTable, boost: float) -> float:
    """The boost added inside the forward pass: the definition the closed form must match."""
    s = eval_final.EvalSettings.from_env(trained["env"])
    scored = eval_final.load_for_scoring(s)
    boost_tokens = torch.full((scored.tokens.numel() - 1,), -1)
    boost_tokens[torch.from_numpy(table.positions)] = torch.from_numpy(table.tokens)
    losses = reference_position_losses(scored.model, scored.tokens, scored.seq_len, s.eval_stride,
                                       boost_tokens, boost)
    byte_count = scored.byte_tables.target_bytes(scored.tokens[:-1], scored.tokens[1:]).sum().item()
    return losses.sum().item() / eval_final.LN2 / byte_count


def test_inline_and_standalone_tables_agree_and_match_the_in_forward_boost(trained, tmp_path):
    budget = dict(USE_CORRECTION=1, CORRECTION_MAX_BYTES=500)
    inline = eval_run(trained, CORRECTION_OUT=tmp_path / "inline.ctab", **budget)
    built = eval_run(trained, script="build_correction_table.py", CORRECTION_OUT=tmp_path / "built.ctab", **budget)
    assert "correction entries:" in built
    inline_bytes, built_bytes = (tmp_path / "inline.ctab").read_bytes(), (tmp_path / "built.ctab").read_bytes()
    assert inline_bytes == built_bytes and 0 < len(inline_bytes) <= 500
    applied = eval_run(trained, CORRECTION_TABLE=tmp_path / "built.ctab")
    corrected = log_value(inline, "eval_corrected_valderived", "val_bpb")
    assert abs(log_value(applied, "eval_corrected_valderived", "val_bpb") - corrected) < 1e-7
    base = log_value(inline, "eval_base", "val_bpb")
    assert corrected < base
    table = ct.decode_table(built_bytes)
    assert abs(in_forward_reference(trained, table, 20.0) - corrected) < 1e-6
    two_part = log_value(inline, "eval_two_part", "val_bpb")
    assert abs(two_part - (corrected + 8 * len(inline_bytes) / log_value(inline, "eval_base", "bytes"))) < 1e-6


def test_two_ranks_build_and_apply_the_same_table(trained, tmp_path):
    one = eval_run(trained, USE_CORRECTION=1, CORRECTION_MAX_BYTES=300, CORRECTION_OUT=tmp_path / "a.ctab")
    two = eval_run(trained, nproc=2, USE_CORRECTION=1, CORRECTION_MAX_BYTES=300, CORRECTION_OUT=tmp_path / "b.ctab")
    assert (tmp_path / "a.ctab").read_bytes() == (tmp_path / "b.ctab").read_bytes()
    for key in ("val_bpb",):
        assert abs(log_value(one, "eval_corrected_valderived", key) - log_value(two, "eval_corrected_valderived", key)) < 1e-6


def test_a_table_with_wrong_tokens_makes_the_score_worse(trained, tmp_path):
    eval_run(trained, USE_CORRECTION=1, CORRECTION_MAX_BYTES=500, CORRECTION_OUT=tmp_path / "good.ctab")
    good = ct.decode_table((tmp_path / "good.ctab").read_bytes())
    vocab = good.vocab_size
    shifted = ct.encode_table(good.positions, (good.tokens + 1) % vocab, vocab_size=vocab,
                               val_length=good.val_length, fingerprint=good.fingerprint, fmt=good.fmt)
    (tmp_path / "shifted.ctab").write_bytes(shifted)
    out = eval_run(trained, CORRECTION_TABLE=tmp_path / "shifted.ctab")
    base, worse = log_value(out, "eval_base", "val_bpb"), log_value(out, "eval_corrected_valderived", "val_bpb")
    assert worse > base
    # and the closed form still equals the boost applied inside the forward pass
    assert abs(in_forward_reference(trained, ct.decode_table(shifted), 20.0) - worse) < 1e-6


def test_foreign_or_damaged_tables_are_refused(trained, tmp_path):
    eval_run(trained, USE_CORRECTION=1, CORRECTION_MAX_BYTES=500, CORRECTION_OUT=tmp_path / "good.ctab")
    good = ct.decode_table((tmp_path / "good.ctab").read_bytes())
    foreign = ct.encode_table(good.positions, good.tokens, vocab_size=good.vocab_size, val_length=good.val_length,
                               fingerprint=bytes(16), fmt=good.fmt)
    (tmp_path / "foreign.ctab").write_bytes(foreign)
    flipped = bytearray((tmp_path / "good.ctab").read_bytes())
    flipped[-3] ^= 0x10
    (tmp_path / "flipped.ctab").write_bytes(bytes(flipped))
    for name, expect in (("foreign.ctab", "another validation stream"), ("flipped.ctab", "checksum")):
        env = dict(trained["env"], CORRECTION_TABLE=str(tmp_path / name))
        run = run_script(["eval_final.py"], env)
        assert run.returncode == 2 and "Traceback" not in run.stderr
        assert name in run.stderr and expect in run.stderr


def test_a_table_carried_inside_the_artifact_is_applied_without_asking(trained, tmp_path):
    checkpoint = tmp_path / "model.ptz"
    shutil.copy(trained["checkpoint"], checkpoint)
    built = eval_run(trained, script="build_correction_table.py", CHECKPOINT=checkpoint, CORRECTION_EMBED=1,
                     CORRECTION_MAX_BYTES=500)
    assert "artifact_with_table" in built
    carried = eval_run(trained, CHECKPOINT=tmp_path / "model.with_table.ptz")
    applied = eval_run(trained, CHECKPOINT=checkpoint, CORRECTION_TABLE=tmp_path / "model.ctab")
    assert log_value(carried, "correction", "carried") == 1
    assert log_value(carried, "eval_corrected_valderived", "val_bpb") == \
        log_value(applied, "eval_corrected_valderived", "val_bpb")
    assert log_value(carried, "eval_base", "val_bpb") == log_value(applied, "eval_base", "val_bpb")


def test_net_selection_never_makes_the_two_part_figure_worse(trained):
    out = eval_run(trained, USE_CORRECTION=1, CORRECTION_SELECT="net")
    base = log_value(out, "eval_base", "val_bpb")
    if "eval_two_part" in out:
        assert log_value(out, "eval_two_part", "val_bpb") <= base
    else:
        assert "no table written" in out


def test_net_selection_keeps_exactly_the_entries_that_pay():
    rng = np.random.default_rng(0)
    n, vocab = 200_000, 1024
    losses = rng.exponential(2.0, n)
    losses[rng.choice(n, 3000, replace=False)] = rng.uniform(8, 25, 3000)  # some hopeless positions
    targets = rng.integers(0, vocab, n)
    positions, tokens = ct.select_entries(losses, eval_final.saved_bits(losses, 20.0), targets, mode="net",
                                          vocab_size=vocab, budget_bytes=10**9)
    assert positions.size > 0
    bits = ct.entry_code_bits(positions, tokens, vocab)
    saved_bits = (losses[positions] - eval_final.boosted_losses(losses[positions], -losses[positions],
                                                          np.ones(positions.size, bool), 20.0)) / np.log(2)
    assert (saved_bits > bits).all()
    blob = ct.encode_table(positions, tokens, vocab_size=vocab, val_length=n, fingerprint=bytes(16))
    assert saved_bits.sum() > 8 * len(blob)  # so the two-part figure improves on the base


def test_fill_selection_takes_the_costliest_positions_within_the_budget():
    rng = np.random.default_rng(1)
    losses = rng.exponential(2.0, 50_000)
    targets = rng.integers(0, 1024, losses.size)
    positions, tokens = ct.select_entries(losses, eval_final.saved_bits(losses, 20.0), targets, mode="fill",
                                          vocab_size=1024, budget_bytes=2000)
    size = len(ct.encode_table(positions, tokens, vocab_size=1024, val_length=losses.size, fingerprint=bytes(16)))
    assert size <= 2000 and positions.size > 500
    assert losses[positions].min() >= np.delete(losses, positions).max()
    assert (tokens == targets[positions]).all()


@pytest.mark.parametrize("case", ["missing", "truncated", "corrupted", "vocab_mismatch"])
def test_bad_checkpoints_give_one_clear_line(trained, tmp_path, case, tiny_data):
    checkpoint = tmp_path / "bad.ptz"
    blob = trained["checkpoint"].read_bytes()
    env = dict(trained["env"], CHECKPOINT=str(checkpoint))
    if case == "truncated":
        checkpoint.write_bytes(blob[: len(blob) // 3])
    elif case == "corrupted":
        damaged = bytearray(blob)
        damaged[len(blob) // 2] ^= 0xFF
        checkpoint.write_bytes(bytes(damaged))
    elif case == "vocab_mismatch":
        artifact = train_gpt.read_artifact(trained["checkpoint"])
        cfg = dict(artifact.meta["model_config"], vocab_size=tiny_data["vocab_size"] * 2)
        model = train_gpt.GPT(train_gpt.ModelConfig(**cfg))
        checkpoint.write_bytes(train_gpt.pack_artifact(model.state_dict(), dict(artifact.meta, model_config=cfg),
                                                       zstd_level=3))
    run = run_script(["eval_final.py"], env)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "bad.ptz" in lines[0], run.stderr


def test_a_second_inline_table_never_replaces_the_first(trained, tmp_path):
    checkpoint = tmp_path / trained["checkpoint"].name
    shutil.copy(trained["checkpoint"], checkpoint)
    first_table = checkpoint.with_suffix(".ctab")
    eval_run(trained, CHECKPOINT=checkpoint, USE_CORRECTION=1, CORRECTION_MAX_BYTES=300)
    first = first_table.read_bytes()
    second_log = eval_run(trained, CHECKPOINT=checkpoint, USE_CORRECTION=1, CORRECTION_MAX_BYTES=500)
    assert first_table.read_bytes() == first
    second_table = checkpoint.with_name(checkpoint.stem + ".1.ctab")
    assert second_table.is_file() and second_table.read_bytes() != first
    assert f"kept_existing:{first_table}" in second_log


def test_a_table_path_that_cannot_be_written_is_refused_before_scoring(trained, tmp_path):
    env = dict(trained["env"], USE_CORRECTION="1", CORRECTION_OUT=str(tmp_path))  # a folder
    run = run_script(["eval_final.py"], env)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"CORRECTION_OUT={tmp_path} is a folder; name a file" in lines[0], run.stderr
    assert "eval_base" not in run.stdout  # refused before any scoring


def test_eval_final_writes_its_log_elsewhere_when_the_checkpoints_folder_cannot_take_it(trained, tmp_path):
    folder = tmp_path / "readonly"
    folder.mkdir()
    checkpoint = folder / trained["checkpoint"].name
    shutil.copy(trained["checkpoint"], checkpoint)
    (folder / "logs").write_text("a file where the log folder would go")  # no logs/ can be made here
    workdir = tmp_path / "work"
    workdir.mkdir()
    env = dict(trained["env"], CHECKPOINT=str(checkpoint))
    run = subprocess.run([sys.executable, str(REPO / "eval_final.py")], env=env, cwd=workdir, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    log = workdir / "logs" / f"eval_{checkpoint.stem}.txt"
    assert "eval_base" in log.read_text() and f"note log:{log} " in run.stdout
