"""The legal eval-time methods through eval_final.py and the builder, on a tiny trained artifact:
score-first TTT (USE_TTT=1) and the causal hint cache (USE_CORRECTION=1 CORRECTION_MODE=causal).
The methods' own properties (causality with teeth, exactly-once scoring, normalisation) are tested
in test_score_first_ttt.py and test_causal_hints.py; here: the wiring, the log, ranks and refusals."""

import shutil

import pytest

import artifact
import code_size
import eval_final
import train_gpt
from conftest import REPO, log_format, log_value, run_script, run_torchrun, tiny_env

LEGAL = dict(USE_CORRECTION=1, CORRECTION_MODE="causal", USE_TTT=1, TTT_CHUNK_TOKENS=1024, TTT_LR=0.05)


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained_legal")
    env = tiny_env(tiny_data, out, ITERATIONS=20, AUTOCAST_BF16=0)
    run = run_script(["train_gpt.py"], env)
    assert run.returncode == 0, run.stderr[-3000:]
    env["CHECKPOINT"] = str(out / train_gpt.ARTIFACT_NAME)
    built = run_script(["build_correction_table.py"], dict(env, CORRECTION_MODE="causal", HINT_TRAIN_TOKENS="3000"))
    assert built.returncode == 0, built.stderr[-3000:]
    with_hints = out / "final_model.int6.with_hints.ptz"
    return {"env": env, "out": out, "with_hints": with_hints, "builder_stdout": built.stdout}


def run(trained, nproc=1, script="eval_final.py", checkpoint=None, **overrides):
    env = dict(trained["env"], CHECKPOINT=str(checkpoint or trained["with_hints"]),
               **{k: str(v) for k, v in overrides.items()})
    return run_torchrun(nproc, script, env) if nproc > 1 else run_script([script], env)


def ok(proc) -> str:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def tags(stdout: str) -> list[str]:
    return [line.tag for line in log_format.read_lines(stdout)]


@pytest.fixture(scope="module")
def legal_run(trained) -> str:
    """eval_final.py with TTT and the causal hints, on one rank: its stdout."""
    return ok(run(trained, **LEGAL))


def test_base_then_each_legal_figure_labelled_and_one_rank_equals_two(trained, legal_run):
    one, two = legal_run, ok(run(trained, nproc=2, **LEGAL))
    order = [t for t in tags(one) if t.startswith("eval_")]
    assert order == ["eval_base", "eval_causal", "eval_ttt", "eval_ttt_causal"]
    for tag in ("eval_causal", "eval_ttt", "eval_ttt_causal"):
        line = [l for l in log_format.read_lines(one) if l.tag == tag][0]
        assert line.comment.startswith("legal")
        assert float(line.fields["base_val_bpb"]) == log_value(one, "eval_base", "val_bpb")
    assert log_value(one, "ttt", "chunks") == 4 and log_value(one, "ttt", "chunks_adapted") == 3
    assert log_value(one, "ttt", "steps") > 0
    base = log_value(one, "eval_base", "val_bpb")
    assert log_value(one, "eval_ttt", "val_bpb") != base  # adaptation happened
    assert log_value(one, "eval_causal", "val_bpb") != base
    for tag, tolerance in (("eval_base", 1e-6), ("eval_causal", 1e-6), ("eval_ttt", 1e-5), ("eval_ttt_causal", 1e-5)):
        assert abs(log_value(one, tag, "val_bpb") - log_value(two, tag, "val_bpb")) < tolerance, tag


def test_the_hint_knobs_and_the_modules_used_are_counted(trained, legal_run):
    out = legal_run
    knob_bytes = log_value(trained["builder_stdout"], "hint_search", "knob_bytes")
    assert log_value(out, "artifact_total", "hint_bytes") == knob_bytes == log_value(out, "hints", "knob_bytes")
    names = list(code_size.EVALUATION_CODE["legal"])
    assert log_value(out, "artifact_total", "raw_code_bytes") == train_gpt.code_bytes(*(REPO / n for n in names))
    bundle = train_gpt.code_bundle({n: (REPO / n).read_bytes() for n in names})  # SHIP_CODE=bundle, the default
    assert log_value(out, "artifact_total", "eval_code_bytes") == len(bundle)
    # what the export budgeted for this evaluation (EXPORT_FOR_EVAL=legal, the default) is what it counts
    train_log = (trained["out"] / "logs" / "test.txt").read_text()
    assert log_value(train_log, "artifact", "counted_code_bytes", counted_for="legal") == \
        log_value(out, "artifact_total", "eval_code_bytes")
    assert log_value(out, "artifact_total", "hint_bytes") <= log_value(train_log, "artifact", "reserve_bytes")
    file_bytes = trained["with_hints"].stat().st_size
    assert log_value(out, "artifact_total", "model_bytes") + knob_bytes == file_bytes
    plain = ok(run(trained))  # no method asked: their modules are not counted, the carried knobs are
    assert log_value(plain, "artifact_total", "raw_code_bytes") == train_gpt.code_bytes(
        *(REPO / n for n in code_size.EVALUATION_BASE))
    assert log_value(plain, "artifact_total", "hint_bytes") == knob_bytes
    assert "note" in tags(plain) and "eval_causal" not in tags(plain)


def test_a_budget_that_runs_out_scores_everything_without_adapting(trained):
    out = ok(run(trained, USE_TTT=1, TTT_CHUNK_TOKENS=1024, TTT_MAX_SECONDS=1e-9))
    line = [l for l in log_format.read_lines(out) if l.tag == "ttt"][0]
    assert line.fields["budget"] == "ran_out" and line.fields["adaptation_stopped_before_chunk"] == "0/4"
    assert line.fields["chunks_adapted"] == "0"
    assert abs(log_value(out, "eval_ttt", "val_bpb") - log_value(out, "eval_base", "val_bpb")) < 1e-6


def test_the_knob_search_never_reads_validation_tokens(trained, tmp_path):
    data = tmp_path / "no_val"
    shutil.copytree(trained["env"]["DATA_PATH"], data)
    for shard in data.glob("fineweb_val_*.bin"):
        shard.unlink()  # unreadable: gone
    (data / train_gpt.MANIFEST_NAME).unlink(missing_ok=True)
    checkpoint = tmp_path / "model.ptz"
    shutil.copy(trained["env"]["CHECKPOINT"], checkpoint)
    out = ok(run(trained, script="build_correction_table.py", checkpoint=checkpoint, DATA_PATH=data,
                 CORRECTION_MODE="causal", HINT_TRAIN_TOKENS=3000))
    assert (tmp_path / "model.with_hints.ptz").is_file()
    assert log_value(out, "hint_search", "tokens") == 3000 // 64 * 64  # whole 64-token windows
    # the same knobs as with the validation shard present: nothing of it went in
    assert (tmp_path / "model.with_hints.ptz").read_bytes() == trained["with_hints"].read_bytes()


BAD_SETTINGS = [
    (dict(USE_TTT=1, TTT_LR=0), "TTT_LR=0.0 must be a positive number"),
    (dict(USE_TTT=1, TTT_RANK=4), "TTT_RANK=4 has no effect without TTT_MODE=lora"),
    (dict(USE_TTT=1, TTT_MODE="lora", TTT_PARAMS="blocks"), "TTT_PARAMS=blocks has no effect without TTT_MODE=full"),
    (dict(TTT_LR=0.01), "TTT_LR=0.01 has no effect without USE_TTT=1"),
    (dict(CORRECTION_MODE="causal"), "CORRECTION_MODE=causal applies the hints only with USE_CORRECTION=1"),
    (dict(USE_TTT=1, TTT_MODE="lora", TTT_RANK=0), "TTT_RANK=0 must be a whole number"),
    (dict(USE_TTT=1, TTT_CHUNK_TOKENS=32), "TTT_CHUNK_TOKENS=32 is smaller than the sequence length 64"),
    (dict(USE_TTT=1, TTT_EPOCHS=0), "TTT_EPOCHS=0 must be"),
    (dict(USE_TTT=1, TTT_MODE="both"), "TTT_MODE=both is not one of"),
    (dict(USE_CORRECTION=1, CORRECTION_MODE="hints"), "CORRECTION_MODE=hints is not one of"),
]


@pytest.mark.parametrize("overrides,first_words", BAD_SETTINGS)
def test_bad_settings_are_refused_with_the_setting_and_the_fix(overrides, first_words):
    """The checks eval_final.main runs before the base pass, in the order it runs them."""
    import score_first_ttt

    with pytest.raises(train_gpt.InputError) as info:
        s = eval_final.EvalSettings.from_env({k: str(v) for k, v in overrides.items()})
        s.check()
        s.check_evaluation()
        if s.use_ttt:
            score_first_ttt.check_ttt_settings(seq_len=64, stride=s.eval_stride, **s.ttt_kwargs())
    message = str(info.value)
    assert first_words in message and "\n" not in message and "set " in message
    # an InputError: run_main prints it as one line and exits 2 (the next test runs three through eval_final.py)


@pytest.mark.parametrize("overrides,first_words", [BAD_SETTINGS[6]])
def test_bad_settings_stop_eval_final_before_the_base_pass_with_one_line(trained, overrides, first_words):
    proc = run(trained, **overrides)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    message = proc.stderr.strip().splitlines()
    assert len(message) == 1 and first_words in message[0] and "set " in message[0]
    assert "eval_base" not in proc.stdout


def test_causal_mode_needs_the_knobs_in_the_artifact(trained):
    proc = run(trained, checkpoint=trained["env"]["CHECKPOINT"], USE_CORRECTION=1, CORRECTION_MODE="causal")
    assert proc.returncode == 2 and "carries no hint knobs" in proc.stderr
    assert "CORRECTION_MODE=causal python build_correction_table.py" in proc.stderr


def test_a_val_derived_table_beside_the_legal_methods_keeps_its_own_figures_and_label(trained, legal_run, tmp_path):
    """One pass gathers log p(table token) and log p(hint) as two rows: each figure must be the one
    its method gives alone, the val-derived lines after the legal ones."""
    table = tmp_path / "t.ctab"
    ok(run(trained, USE_CORRECTION=1, CORRECTION_MAX_BYTES=400, CORRECTION_OUT=table))
    alone = ok(run(trained, CORRECTION_TABLE=table))
    causal_alone = legal_run  # its eval_causal line is the hints on the base pass, no table beside them
    both = ok(run(trained, CORRECTION_TABLE=table, **LEGAL))
    order = [t for t in tags(both) if t.startswith("eval_")]
    assert order == ["eval_base", "eval_causal", "eval_ttt", "eval_ttt_causal", "eval_corrected_valderived",
                     "eval_two_part"]
    assert log_value(both, "eval_corrected_valderived", "val_bpb") == log_value(alone, "eval_corrected_valderived",
                                                                                 "val_bpb")
    assert log_value(both, "eval_causal", "val_bpb") == log_value(causal_alone, "eval_causal", "val_bpb")
    line = [l for l in log_format.read_lines(both) if l.tag == "eval_corrected_valderived"][0]
    assert line.comment.startswith("val-derived")
    assert log_value(both, "artifact_total", "table_bytes") == table.stat().st_size


def test_ttt_settings_chosen_on_training_text_are_carried_and_used_and_a_hand_setting_wins(trained):
    built = ok(run(trained, script="build_ttt_settings.py", CALIBRATE_TTT_TOKENS=3000, TTT_DOC_CHUNK_TOKENS=32))
    assert "fineweb_val" not in built and "fineweb_train" in log_format.last_line(built, "ttt_slice").fields["train_slice"]
    chosen = log_format.last_line(built, "ttt_chosen").fields
    assert chosen["ttt_mode"] == "phased" and len([t for t in tags(built) if t == "ttt_candidate"]) >= 4
    copy = trained["out"] / "final_model.int6.with_hints.with_ttt.ptz"
    carried = eval_final.decode_ttt_settings(train_gpt.read_artifact(copy).extras[eval_final.TTT_EXTRA_NAME], "copy")
    assert carried["TTT_LR"] == float(chosen["ttt_lr"]) and len(eval_final.encode_ttt_settings(carried)) == int(
        chosen["settings_bytes"])
    used = ok(run(trained, checkpoint=copy, USE_TTT=1))
    line = log_format.last_line(used, "ttt_settings").fields
    assert line["by_hand"] == "none" and float(line["ttt_lr"]) == carried["TTT_LR"]
    assert log_format.last_line(used, "ttt").fields["mode"] == "phased"
    assert float(log_format.last_line(used, "ttt").fields["lr"]) == carried["TTT_LR"]
    # the settings' bytes are inside the file (an extra of their raw length in its header) and so counted:
    # model_bytes is the file on disk less the hint knobs only. (Never "the copy is larger than the artifact
    # it came from": zstd-22's size is not monotone in its input, and that ordering flips between machines.)
    header, _ = artifact.artifact_parts(copy.read_bytes(), str(copy))
    extra = [e for e in header["tensors"] if e["name"] == eval_final.TTT_EXTRA_NAME]
    assert len(extra) == 1 and extra[0]["role"] == "extra" and extra[0]["nbytes"] == int(chosen["settings_bytes"])
    assert log_value(used, "artifact_total", "model_bytes") + log_value(used, "artifact_total", "hint_bytes") == \
        copy.stat().st_size
    hand = ok(run(trained, checkpoint=copy, USE_TTT=1, TTT_LR=0.0123))
    assert log_format.last_line(hand, "ttt_settings").fields["by_hand"] == "TTT_LR=0.0123"
    assert float(log_format.last_line(hand, "ttt").fields["lr"]) == 0.0123
    other_mode = ok(run(trained, checkpoint=copy, USE_TTT=1, TTT_MODE="full", TTT_CHUNK_TOKENS=1024))
    assert log_format.last_line(other_mode, "ttt_settings").fields["by_hand"] == "TTT_MODE=full"
    assert log_format.last_line(other_mode, "ttt").fields["mode"] == "full"
