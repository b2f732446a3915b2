"""The one log grammar (records/log_format.py): the reader, and every line our scripts print."""

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import log_format
import train_gpt
from conftest import REPO, run_script, tiny_env

sys.path.insert(0, str(REPO / "scripts"))
import demo  # noqa: E402
import demo_references  # noqa: E402


def test_a_line_is_a_tag_then_fields_then_a_comment():
    line = log_format.parse_line("eval_base val_loss:3.26 val_bpb:1.85 eval_time:59173ms path:a:b empty: # note: x y")
    assert line.tag == "eval_base"
    assert line.fields == {"val_loss": "3.26", "val_bpb": "1.85", "eval_time": "59173ms", "path": "a:b", "empty": ""}
    assert line.comment == "note: x y"


def test_a_value_needing_a_space_is_escaped_and_read_back():
    import train_gpt
    written = f"hardware name:{train_gpt.log_value('AMD EPYC 7763 64-Core')} world_size:1"
    assert log_format.parse_line(written).fields["name"] == "AMD EPYC 7763 64-Core"


@pytest.mark.parametrize("text", ["hardware device:cpu name:AMD EPYC world_size:1",  # a value with a space
                                  "stopping_early: wallclock_cap train_time:1ms",  # a colon after the tag
                                  "Settings seed:1"])  # not a tag
def test_a_line_with_fields_that_breaks_the_grammar_is_refused(text):
    with pytest.raises(log_format.LogFormatError):
        log_format.parse_line(text)


@pytest.mark.parametrize("text", ["", "| coder | val BPB |", "- Validation: the first 80 documents", "correction table done",
                                  "next: DATA_PATH=x python train_gpt.py"])
def test_prose_is_no_log_line(text):
    assert log_format.parse_line(text) is None


def test_code_blocks_are_skipped_by_the_reader_and_checked_by_hash():
    source = 'log(f"artifact model_bytes:{n}")\nx = 1\n'
    digest = hashlib.sha256(source.encode()).hexdigest()
    text = f"run run_id:a code_sha256:{digest}\ncode file:t.py bytes:{len(source)} sha256:{digest} lines:2\n" + source \
        + "train_done steps:3\n"
    assert [line.tag for line in log_format.read_lines(text)] == ["run", "code", "train_done"]
    assert log_format.code_blocks(text) == {"t.py": source}
    with pytest.raises(log_format.LogFormatError, match="does not hash"):
        log_format.code_blocks(text.replace("x = 1", "x = 2"))


@pytest.mark.parametrize("source", [b"x = 1\n", b"x = 1", b"x = 1\r\ny = 2\r\n", b"a\x0cb\n\n", b""])
def test_the_logger_writes_code_that_the_reader_gives_back_byte_for_byte(tmp_path, source):
    import train_gpt
    script = tmp_path / "s.py"
    script.write_bytes(source)
    log = train_gpt.Logger(tmp_path / "log.txt")
    log("run run_id:x")
    log.code(script)
    log("train_done steps:1")
    with open(tmp_path / "log.txt", encoding="utf-8", newline="") as f:
        text = f.read()
    assert log_format.code_blocks(text) == {"s.py": source.decode()}
    assert [line.tag for line in log_format.read_lines(text)] == ["run", "code", "train_done"]


def all_lines_parse(text: str, where: str, prose_allowed=()) -> list:
    """Every line of `text` is a log line (prose only where allowed); code blocks are skipped."""
    lines = log_format.read_lines(text)
    numbered = {line.line_number for line in lines}
    skipped = set()
    for line in lines:
        if line.tag == "code":
            skipped |= set(range(line.line_number + 1, line.line_number + 1 + int(line.fields["lines"])))
    for number, raw in enumerate(text.splitlines(), start=1):
        if number in numbered or number in skipped or not raw.strip():
            continue
        assert raw.lstrip().startswith(prose_allowed) and prose_allowed, f"{where}: line {number} is prose: {raw!r}"
    return lines


def test_every_line_the_scripts_and_make_record_print_is_a_log_line(tiny_data, tmp_path):
    # paths and a RUN_ID with spaces, a wall-clock stop, an artifact over its cap, tables kept and net
    out = tmp_path / "out dir"
    env = tiny_env(tiny_data, out, ITERATIONS=500, MAX_WALLCLOCK_SECONDS=3, VAL_LOSS_EVERY=2, WARMUP_STEPS=2,
                   SWA_EVERY=1, QAT_START_FRAC=0.5, RUN_ID="r 1", ARTIFACT_CAP_BYTES=1000)
    train = run_script(["train_gpt.py"], env)
    assert train.returncode == 0, train.stderr[-3000:]
    tags = {line.tag for line in all_lines_parse(train.stdout, "train_gpt.py stdout")}
    assert {"run", "settings", "hardware", "warning", "train_step", "val_step", "warmup", "stopping_early", "swa",
            "over_cap", "artifact", RECORD_TAG} <= tags
    log_path = out / "logs" / "r 1.txt"
    log_text = log_path.read_text()
    all_lines_parse(log_text, "the training log")
    assert log_format.code_blocks(log_text)["train_gpt.py"] == (REPO / "train_gpt.py").read_text()

    checkpoint = out / "final_model.int6.ptz"
    eval_env = dict(env, CHECKPOINT=str(checkpoint), USE_CORRECTION="1", CORRECTION_MAX_BYTES="400")
    eval_log = out / "logs" / f"eval_{checkpoint.stem}.txt"
    one_evaluation = out / "logs" / "eval one.txt"  # eval_final.py appends; make_record takes one evaluation's log
    for extra in ({}, {}, {"CORRECTION_SELECT": "net"}):  # the second keeps the first table: a kept_existing note
        evaluation = run_script(["eval_final.py"], dict(eval_env, **extra))
        assert evaluation.returncode == 0, evaluation.stderr[-3000:]
        all_lines_parse(evaluation.stdout, "eval_final.py stdout")
        if not one_evaluation.exists():
            shutil.copy(eval_log, one_evaluation)
    assert set(log_format.code_blocks(eval_log.read_text())) == set(train_gpt.EVALUATION_CODE["base"])
    built = run_script(["build_correction_table.py"], dict(eval_env, CORRECTION_OUT=str(out / "b c.ctab"),
                                                            CORRECTION_EMBED="1"))
    assert built.returncode == 0, built.stderr[-3000:]
    all_lines_parse(built.stdout, "build_correction_table.py stdout")

    record = subprocess.run([sys.executable, str(REPO / "records" / "make_record.py"), "--logs", str(log_path),
                             "--eval-logs", str(one_evaluation), "--out", str(tmp_path / "rec ord")],
                            capture_output=True, text=True, timeout=120)
    assert record.returncode == 0, record.stderr
    assert {line.tag for line in all_lines_parse(record.stderr, "make_record.py stderr")} == {"record_script"}
    for name in train_gpt.EVALUATION_CODE["base"]:
        assert (tmp_path / "rec ord" / name).read_bytes() == (REPO / name).read_bytes()
    bundle = train_gpt.code_bundle({n: (REPO / n).read_bytes() for n in train_gpt.EVALUATION_CODE["base"]})
    assert (tmp_path / "rec ord" / train_gpt.BUNDLE_NAME).read_bytes() == bundle  # what the cap counts


RECORD_TAG = "final_int8_zlib_roundtrip_exact"


def test_every_line_the_demo_prints_is_a_log_line(tiny_data, capsys):
    settings = demo.parse_args(["--quick"])
    clock = demo.Clock()
    print(demo.start_line(settings))
    demo.banner(clock, 1, 5, "prepare the built-in corpus (data/prepare.py)")
    demo.run_child("child", ["-c", "print('eval_base val_bpb:1.5 eval_time:3ms')"], {"A": "b c"})
    demo_references.compute_references(tiny_data["data_path"], tiny_data["tokenizer_path"], tiny_data["vocab_size"],
                                       64, say=lambda msg: print(f"  {msg}"))
    print(demo.done_line(clock, {"prepare": 1.0, "train": 2.0, "total": 3.0}))
    out = capsys.readouterr().out
    tags = {line.tag for line in all_lines_parse(out, "the demo")}
    assert {"demo", "demo_stage", "demo_child", "eval_base", "reference_text", "reference", "demo_done"} <= tags


def test_every_line_data_prepare_prints_is_a_log_line(tmp_path):
    """The demo runs data/prepare.py as its first stage: its lines are the demo's lines too."""
    from conftest import natural_text_documents
    corpus = tmp_path / "my docs"
    corpus.mkdir()
    for i, doc in enumerate(natural_text_documents()[:60]):
        (corpus / f"doc {i}.txt").write_text(doc)
    run = subprocess.run([sys.executable, str(REPO / "data" / "prepare.py"), "--input", str(corpus), "--vocab-size",
                          "512", "--val-docs", "10", "--out-dir", str(tmp_path / "out dir")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    tags = {line.tag for line in all_lines_parse(run.stdout, "data/prepare.py", prose_allowed=("next:",))}
    assert {"input", "tokenizer_trained", "done"} <= tags
