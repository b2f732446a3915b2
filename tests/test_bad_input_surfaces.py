"""Issue 35: the settings and files added by the export (GPTQ, LQER), phased TTT, build_ttt_settings.py, the TTT
settings an artifact carries and the record's code bundle refuse bad input in one line before the first training
step or scored token, say in a note what they do instead, keep what a builder chose before, and every refusal's
suggested fix gets the run past its check (each fix below is applied, and the check then passes)."""

import dataclasses
import json
import re

import pytest

import build_ttt_settings
import code_size
import eval_final
import train_gpt
from conftest import REPO, log_format, natural_text_documents, run_script, tiny_env, train_tiny_tokenizer
from test_bad_input import assert_refused


def suggested(line: str) -> dict[str, str]:
    """The first `set NAME=VALUE` (or `e.g. NAME=VALUE`) of a refusal's fix: the setting it tells the user to give."""
    name, value = re.search(r"(?:set|e\.g\.) ([A-Z_]+)=([^\s,;)]+)", line.split("; ", 1)[1]).groups()
    return {name: value}


def settings(tiny_data, tmp_path, **overrides) -> train_gpt.Settings:
    return train_gpt.Settings.from_env(tiny_env(tiny_data, tmp_path, **overrides))


# ---- the trainer: refused before the run starts (no log written), each fix passes the same checks ----


@pytest.mark.parametrize("overrides,expected", [
    (dict(GPTQ_CALIBRATION_TOKENS=1e12), "GPTQ_CALIBRATION_TOKENS=1000000000000 asks for"),  # was: MemoryError after training
    (dict(MAX_WALLCLOCK_SECONDS=8, GPTQ_RESERVE_SECONDS=10), "GPTQ_RESERVE_SECONDS=10 keeps half or more"),  # 3 steps of 200
    (dict(LQER_RANK=0, LQER_TENSORS=3), "LQER_RANK=0 with LQER_TENSORS=3 corrects nothing"),
])
def test_an_export_setting_that_would_fail_or_do_nothing_is_refused_before_training(tiny_data, tmp_path, overrides,
                                                                                   expected):
    run = run_script(["train_gpt.py"], tiny_env(tiny_data, tmp_path, **overrides))
    line = assert_refused(run, expected)
    assert not (tmp_path / "logs" / "test.txt").exists()  # no run started
    fixed = settings(tiny_data, tmp_path, **{**overrides, **suggested(line)})
    train_gpt.validate_settings(fixed)  # the fix passes every check the refusal came from
    train_gpt.check_calibration_data(fixed)


def test_a_setting_that_acts_only_with_another_is_noted_and_the_reserve_is_said(tiny_data, tmp_path):
    run = run_script(["train_gpt.py"], tiny_env(tiny_data, tmp_path, ITERATIONS=2, LQER_RANK=8, QAT_ENABLED=0,
                                                QAT_START_FRAC=0.5, MAX_WALLCLOCK_SECONDS=100,
                                                GPTQ_RESERVE_SECONDS=5, GPTQ_CALIBRATION_TOKENS=100))
    assert run.returncode == 0, run.stderr[-3000:]
    notes = {(key, value) for line in log_format.read_lines(run.stdout) if line.tag == "note"
             for key, value in line.fields.items()}
    assert {("unused", "LQER_RANK=8"), ("unused", "QAT_START_FRAC=0.5"), ("max_wallclock_seconds", "100->95"),
            ("gptq_calibration_tokens", "100->64")} <= notes, run.stdout[-3000:]
    assert len([n for n in notes if n[0] == "unused"]) == 2  # a setting at its default, or one that acts: no note
    rtn = train_gpt.unused_setting_notes(dataclasses.replace(train_gpt.Settings(), export_quantizer="rtn",
                                                             export_allocation="ladder", gptq_calibration_tokens=4096))
    assert len(rtn) == 1 and "unused:GPTQ_CALIBRATION_TOKENS=4096" in rtn[0]


# ---- what an artifact carries goes through the environment's checks ----


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained_surfaces")
    env = tiny_env(tiny_data, out, ITERATIONS=2, AUTOCAST_BF16=0, VAL_MAX_TOKENS=2049)
    run = run_script(["train_gpt.py"], env)
    assert run.returncode == 0, run.stderr[-3000:]
    return {"env": dict(env, CHECKPOINT=str(out / train_gpt.ARTIFACT_NAME)), "out": out,
            "artifact": out / train_gpt.ARTIFACT_NAME}


def tampered(trained, tmp_path, config=None, ttt=None):
    """A copy of the artifact with model_config entries changed, or TTT settings carried (past the checksum:
    re-compressed, as a deliberate edit would be)."""
    blob = trained["artifact"].read_bytes()
    header, body = train_gpt.artifact_parts(blob, "artifact")
    header["meta"]["model_config"].update(config or {})
    extras = {eval_final.TTT_EXTRA_NAME: json.dumps(ttt).encode()} if ttt is not None else {}
    path = tmp_path / "tampered.ptz"
    path.write_bytes(train_gpt.assemble_artifact(header, bytes(body), extras, 3))
    return path


def evaluate(trained, checkpoint=None, drop=(), **overrides):
    env = dict(trained["env"], CHECKPOINT=str(checkpoint or trained["artifact"]),
               **{k: str(v) for k, v in overrides.items()})
    return run_script(["eval_final.py"], {k: v for k, v in env.items() if k not in drop})


TTT_FULL = dict(USE_TTT=1, TTT_MODE="full", TTT_CHUNK_TOKENS=512)


@pytest.mark.parametrize("carried,expected,fix", [
    ({"TTT_MODE": "full", "TTT_EPOCHS": 2.7}, "carried TTT setting TTT_EPOCHS=2.7 is not a valid int", {"TTT_EPOCHS": 2}),
    ({"TTT_MODE": "full", "TTT_LR": True}, "carried TTT setting TTT_LR=true is not a valid float", {"TTT_LR": 0.01}),
    ({"TTT_MODE": "full", "TTT_LR": -1.0}, "carried TTT setting TTT_LR=-1.0 must be a positive", {"TTT_LR": 0.01}),
])
def test_carried_ttt_settings_are_checked_as_the_environments_and_name_the_artifact(trained, tmp_path, carried,
                                                                                    expected, fix):
    path = tampered(trained, tmp_path, ttt=carried)
    line = assert_refused(evaluate(trained, path, **TTT_FULL), f"CHECKPOINT={path}", expected)
    name = next(iter(fix))
    assert f"give {name} by hand" in line
    fixed = evaluate(trained, path, **TTT_FULL, **fix)  # the fix: the setting given by hand wins
    assert fixed.returncode == 0, fixed.stderr[-2000:]
    assert f"by_hand:{name}=" in fixed.stdout


@pytest.mark.parametrize("config,expected", [
    ({"mlp_leaky_slope": "0.5"}, "MLP_LEAKY_SLOPE='0.5' is not a valid float"),  # was: a traceback in the forward
    ({"value_residual_alpha": 5.0}, "VALUE_RESIDUAL_ALPHA=5.0 is out of range"),  # was: a different score, silently
    ({"num_layers": 2.5}, "NUM_LAYERS=2.5 is not a valid int"),
    ({"layer_norm_scale": 1}, "LAYER_NORM_SCALE=1 is not a valid bool"),
])
def test_a_model_config_train_gpt_never_writes_is_refused_naming_the_artifact(trained, tmp_path, config, expected):
    path = tampered(trained, tmp_path, config=config)
    line = assert_refused(evaluate(trained, path), f"CHECKPOINT={path}: its model_config", expected)
    assert "re-export it with train_gpt.py" in line
    assert evaluate(trained).returncode == 0  # the fix: the artifact as train_gpt.py wrote it


def test_a_tokenizer_of_another_vocabulary_gets_a_fix_eval_final_can_use(trained, tiny_data, tmp_path):
    bigger = train_tiny_tokenizer(natural_text_documents(), tmp_path / "tok1024", vocab_size=1024)
    line = assert_refused(evaluate(trained, TOKENIZER_PATH=bigger, VOCAB_SIZE=1024),
                          "trained with a 512-token vocabulary", "point TOKENIZER_PATH at the 512-token tokenizer")
    assert "set VOCAB_SIZE" not in line  # it changes nothing here: the artifact's vocabulary decides
    fixed = evaluate(trained, TOKENIZER_PATH=tiny_data["tokenizer_path"], VOCAB_SIZE=1024)
    assert fixed.returncode == 0, fixed.stderr[-2000:]
    assert "note unused:VOCAB_SIZE=1024 artifact:512" in fixed.stdout  # what the artifact decides is said, not dropped


def test_phases_with_no_documents_to_phase_are_refused_and_a_rate_without_phases_noted(trained):
    one_document = dict(USE_TTT=1, TTT_MODE="phased", VAL_MAX_TOKENS=65)  # 64 targets inside the first document
    line = assert_refused(evaluate(trained, **one_document, TTT_PHASES=5, TTT_GLOBAL_LR=0.05),
                          "TTT_PHASES=5 with TTT_GLOBAL_LR=0.05", "1 document")
    fixed = evaluate(trained, **one_document, **suggested(line))  # TTT_PHASES=0, TTT_GLOBAL_LR unset
    assert fixed.returncode == 0, fixed.stderr[-2000:]
    noted = evaluate(trained, **one_document, TTT_PHASES=0, TTT_GLOBAL_LR=0.05)
    assert noted.returncode == 0 and "note unused:TTT_GLOBAL_LR=0.05" in noted.stdout


def test_a_code_bundle_asked_for_an_evaluation_it_does_not_hold_says_which_bundle_to_make(trained, tmp_path):
    def bundle(evaluation):
        path = tmp_path / evaluation / code_size.BUNDLE_NAME
        path.parent.mkdir()
        path.write_bytes(code_size.code_bundle({n: (REPO / n).read_bytes() for n in code_size.EVALUATION_CODE[evaluation]}))
        return path

    env = dict(trained["env"], **{k: str(v) for k, v in TTT_FULL.items()})
    run = run_script([str(bundle("base")), "eval_final.py"], env)  # was: FileNotFoundError ... score_first_ttt.py
    line = assert_refused(run, "USE_TTT=1 runs the ttt evaluation", "made for the base evaluation",
                          "EXPORT_FOR_EVAL=ttt")
    fixed = run_script([str(bundle(suggested(line)["EXPORT_FOR_EVAL"])), "eval_final.py"], env)
    assert fixed.returncode == 0, fixed.stderr[-2000:]


# ---- build_ttt_settings.py ----


def build(trained, checkpoint=None, **overrides):
    env = dict(trained["env"], CHECKPOINT=str(checkpoint or trained["artifact"]),
               **{k: str(v) for k, v in overrides.items()})
    return run_script(["build_ttt_settings.py"], env)


@pytest.mark.parametrize("tokens", ["0", "1e8", "-5"])
def test_a_calibration_slice_out_of_range_is_refused_by_its_own_name(trained, tiny_data, tokens):
    value = int(float(tokens))
    line = assert_refused(build(trained, CALIBRATE_TTT_TOKENS=tokens), f"CALIBRATE_TTT_TOKENS={value}:")
    assert "HINT_TRAIN_TOKENS" not in line  # -5 once used the whole shard; 0 and 1e8 named the hint builder's setting
    lowest = re.search(r"between (\d+) and (\d+)", line).group(1)
    s = eval_final.EvalSettings.from_env(dict(trained["env"], CALIBRATE_TTT_TOKENS=lowest))
    shard, sliced, _ = build_ttt_settings.held_out_documents(s, tiny_data["vocab_size"], 64)
    assert sliced.numel() - 1 == int(lowest)  # the fix passes the check: the last whole document alone


def test_a_one_chunk_calibration_slice_is_refused_before_any_candidate(trained, tiny_data):
    run = build(trained, TTT_MODE="full", CALIBRATE_TTT_TOKENS=3000, TTT_CHUNK_TOKENS=32768)
    line = assert_refused(run, "TTT_CHUNK_TOKENS=32768 holds the whole", "CALIBRATE_TTT_TOKENS=3000 slice")
    assert "ttt_candidate" not in run.stdout  # was: every candidate scored alike, pays:0
    s = eval_final.EvalSettings.from_env(dict(trained["env"], TTT_MODE="full", **suggested(line)))
    tokens = build_ttt_settings.held_out_documents(dataclasses.replace(s, calibrate_ttt_tokens=3000),
                                                   tiny_data["vocab_size"], 64)[1]
    assert eval_final.check_ttt_stream(s, tokens, 64, "slice") == []  # the fix passes the check


def test_a_setting_the_mode_never_reads_is_refused_by_the_builder(trained):
    assert_refused(build(trained, TTT_MODE="full", TTT_RANK=4), "TTT_RANK=4 has no effect", "TTT_MODE=lora or phased")


def test_the_builder_honours_settings_given_by_hand_and_keeps_an_earlier_choice(trained):
    by_hand = dict(TTT_MODE="full", CALIBRATE_TTT_TOKENS=3000, TTT_CHUNK_TOKENS=512, TTT_LR=0.02, TTT_EPOCHS=1)
    first = build(trained, **by_hand)
    assert first.returncode == 0, first.stderr[-3000:]
    chosen = log_format.last_line(first.stdout, "ttt_chosen").fields
    assert chosen["by_hand"] == "TTT_CHUNK_TOKENS=512,TTT_EPOCHS=1,TTT_LR=0.02"
    assert float(chosen["ttt_lr"]) == 0.02 and int(chosen["ttt_epochs"]) == 1  # was: searched from 0.003, stored else
    candidates = [l for l in log_format.read_lines(first.stdout) if l.tag == "ttt_candidate"]
    assert len(candidates) == 1  # both searched settings fixed: the start is the only candidate
    copy = trained["out"] / "final_model.int6.with_ttt.ptz"
    carried = eval_final.decode_ttt_settings(train_gpt.read_artifact(copy).extras[eval_final.TTT_EXTRA_NAME], "copy")
    assert carried["TTT_LR"] == 0.02 and carried["TTT_EPOCHS"] == 1 and carried["TTT_CHUNK_TOKENS"] == 512
    assert log_format.last_line(first.stdout, "artifact_with_ttt").fields["written"] == "new"
    before = copy.read_bytes()
    second = build(trained, **dict(by_hand, TTT_LR=0.03))
    assert second.returncode == 0, second.stderr[-3000:]
    line = log_format.last_line(second.stdout, "artifact_with_ttt").fields
    assert line["written"] == f"kept_existing:{copy}" and line["path"].endswith("final_model.int6.with_ttt.1.ptz")
    assert copy.read_bytes() == before  # the earlier search's choice is kept byte for byte


def test_without_a_mode_the_builder_tries_both_and_stores_the_better_with_its_own_hand_settings(trained):
    run = build(trained, CALIBRATE_TTT_TOKENS=3000, TTT_CHUNK_TOKENS=512, TTT_DOC_CHUNK_TOKENS=32)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = log_format.read_lines(run.stdout)
    best = {l.fields["mode"]: float(l.fields["slice_bpb"]) for l in lines if l.tag == "ttt_mode_best"}
    assert set(best) == {"phased", "full"}
    notes = [l.fields["not_read"] for l in lines if l.tag == "note" and "not_read" in l.fields]
    assert sorted(notes) == ["TTT_CHUNK_TOKENS=512", "TTT_DOC_CHUNK_TOKENS=32"]  # each mode's search runs without
    chosen = log_format.last_line(run.stdout, "ttt_chosen").fields
    assert chosen["ttt_mode"] == min(best, key=best.get) and float(chosen["slice_bpb"]) == min(best.values())
    assert any("ttt_phases" in l.fields for l in lines if l.tag == "ttt_candidate")  # the phases searched too
    slice_line = log_format.last_line(run.stdout, "ttt_slice").fields
    assert slice_line["modes"] == "phased,full" and int(slice_line["documents"]) > 1
    copy = log_format.last_line(run.stdout, "artifact_with_ttt").fields["path"]
    carried = eval_final.decode_ttt_settings(train_gpt.read_artifact(copy).extras[eval_final.TTT_EXTRA_NAME], "copy")
    assert carried["TTT_MODE"] == chosen["ttt_mode"]
    assert ("TTT_CHUNK_TOKENS" in carried) == (chosen["ttt_mode"] == "full")  # a hand setting only where it is read


def test_make_record_bundles_the_legal_evaluation_the_record_reports(tmp_path):
    """The record's training logs counted the legal evaluation's code (counted_for:legal); given the legal
    evaluations' logs as --code-logs, make_record bundles those scripts, to the byte count the export used."""
    import subprocess
    import sys

    record = next((REPO / "records" / "track_10min_16mb").glob("*/logs")).parent
    logs = record / "logs"
    run = subprocess.run([sys.executable, str(REPO / "records" / "make_record.py"),
                          "--logs", *map(str, sorted(logs.glob("cpu_seed*_train.txt"))),
                          "--eval-logs", *map(str, sorted(logs.glob("cpu_seed*_eval.txt"))),
                          "--code-logs", *map(str, sorted(logs.glob("cpu_seed*_eval_legal.txt"))),
                          "--out", str(tmp_path)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    bundle = (tmp_path / code_size.BUNDLE_NAME).read_text()
    # its SIZES line: the legal evaluation's scripts as those runs had them (a room made since, absent from the
    # logs and imported by none of their code, was no part of it), the legal methods' three included
    ran = [name for name in code_size.EVALUATION_CODE["legal"] if (record / name).is_file()]
    assert {"score_first_ttt.py", "phased_ttt.py", "causal_hints.py", "train_gpt.py", "eval_final.py"} <= set(ran)
    assert all(name in bundle.split("\n")[4] for name in ran)
    counted = log_format.last_line((logs / "cpu_seed1337_train.txt").read_text(), "artifact").fields
    assert counted["counted_for"] == "legal" and len(bundle.encode()) == int(counted["counted_code_bytes"])
    assert (record / code_size.BUNDLE_NAME).read_text() == bundle  # the record folder ships that bundle


@pytest.mark.parametrize("args,expected", [(["--vocab-size", "0"], "--vocab-size must be between 2 and 65536"),
                                           (["--val-docs", "0"], "--val-docs must be at least 1")])
def test_prepare_refuses_a_bad_option_in_one_line_with_a_fix(tmp_path, args, expected):
    run = run_script(["data/prepare.py", "--builtin", "--out-dir", str(tmp_path / "out"), *args], {})
    line = assert_refused(run, expected)  # argparse's usage page no longer comes first
    assert "give e.g." in line and not (tmp_path / "out").exists()
