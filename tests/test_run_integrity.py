"""Issue 21: the same artifact gives the same score; two runs never share a fate; a full disk or a
diverging TTT never prints a result. Each case through the real command where one can show it, with the
figures the issue observed before the fix as the failing baseline in the docstring."""

import errno
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tempfile
import time

import pytest
import torch

import eval_final
import make_record
import run_files
import score_first_ttt
import train_gpt
from conftest import REPO, log_format, log_value, run_script, tiny_env


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """A tiny model trained with the defaults (AUTOCAST_BF16=auto: the probe decides on the CPU)."""
    out = tmp_path_factory.mktemp("trained_integrity")
    env = tiny_env(tiny_data, out, ITERATIONS=10)
    env.pop("AUTOCAST_BF16", None)
    run = run_script(["train_gpt.py"], env)
    assert run.returncode == 0, run.stderr[-3000:]
    return {"env": dict(env, CHECKPOINT=str(out / train_gpt.ARTIFACT_NAME)), "train_log": run.stdout}


def env(trained: dict, **settings) -> dict:
    """The trained model's environment with more settings, as strings."""
    return {**trained["env"], **{k: str(v) for k, v in settings.items()}}


def last(text: str, tag: str) -> dict:
    return [line for line in log_format.read_lines(text) if line.tag == tag][-1].fields


def assert_one_line(run, *expected: str) -> str:
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and all(text in lines[0] for text in expected), run.stderr
    return lines[0]


# ---- 1. precision belongs to the artifact ----


def test_the_evaluation_reproduces_the_training_logs_final_figure_digit_for_digit(trained, monkeypatch, capsys):
    """Before: training probed its own shape and chose fp32 (final 2.79200157); eval_final re-probed at
    512 x 1536, chose bf16 and printed 2.79213315. Now the artifact's precision is kept, on this machine
    and where the probe would flip (forced both ways in-process)."""
    final = last(trained["train_log"], "final_int6_zstd_roundtrip_exact")
    run = run_script(["eval_final.py"], env(trained))
    assert run.returncode == 0, run.stderr[-3000:]
    base = last(run.stdout, "eval_base")
    assert base["val_bpb"] == final["val_bpb"] and base["val_loss"] == final["val_loss"]
    assert base["precision"] == final["precision"] and "precision_from:artifact" in run.stdout
    for key, value in env(trained).items():
        monkeypatch.setenv(key, value)
    for flip in (True, False):  # the probe answers bf16, then fp32: the artifact's precision stands
        monkeypatch.setattr(train_gpt, "prefer_bf16", lambda fp32, bf16, flip=flip: flip)
        eval_final.main()
        assert last(capsys.readouterr().out, "eval_base")["val_bpb"] == final["val_bpb"]
    told = {"bf16": "0", "fp32": "1"}[final["precision"]]  # told otherwise: obeyed, and the line says so
    run = run_script(["eval_final.py"], env(trained, AUTOCAST_BF16=told))
    other = last(run.stdout, "eval_base")
    assert other["precision"] != final["precision"] and other["val_bpb"] != final["val_bpb"]
    assert "precision_from:setting" in run.stdout


def test_a_looped_model_runs_the_whole_legal_pipeline_and_its_figure_is_reproduced(tiny_data, tmp_path):
    """Depth recurrence (docs/depth_recurrence.md): train with the loop switched on a third of the way, export,
    the causal hints' builder, the TTT settings' builder, the legal evaluation; eval_final rebuilds the looped
    order from the artifact and prints the training log's final figure digit for digit."""
    loop = dict(NUM_LAYERS=3, NUM_LOOPS=2, LOOP_START=1, LOOP_END=1, ENABLE_LOOPING_AT=0.35)
    train = run_script(["train_gpt.py"], tiny_env(tiny_data, tmp_path, ITERATIONS=8, AUTOCAST_BF16=0, **loop))
    assert train.returncode == 0, train.stderr[-3000:]
    assert "loop_start step:3" in train.stdout and last(train.stdout, "model")["encoder"] == "0,1"
    final = last(train.stdout, "final_int6_zstd_roundtrip_exact")
    env = tiny_env(tiny_data, tmp_path, CHECKPOINT=tmp_path / train_gpt.ARTIFACT_NAME, AUTOCAST_BF16=0)
    scored = run_script(["eval_final.py"], env)
    assert scored.returncode == 0, scored.stderr[-3000:]
    assert last(scored.stdout, "eval_base")["val_bpb"] == final["val_bpb"]
    assert last(scored.stdout, "settings")["decoder"] == "1,1,2"  # the order 0,1,1,1,2 from the artifact
    hints = run_script(["build_correction_table.py"], dict(env, CORRECTION_MODE="causal", HINT_TRAIN_TOKENS="3000"))
    assert hints.returncode == 0, hints.stderr[-3000:]
    with_hints = tmp_path / "final_model.int6.with_hints.ptz"
    ttt = run_script(["build_ttt_settings.py"], dict(env, CHECKPOINT=str(with_hints), CALIBRATE_TTT_TOKENS="3000",
                                                      TTT_DOC_CHUNK_TOKENS="32"))
    assert ttt.returncode == 0, ttt.stderr[-3000:]
    legal = run_script(["eval_final.py"], dict(env, CHECKPOINT=str(tmp_path / "final_model.int6.with_hints.with_ttt.ptz"),
                                               USE_CORRECTION="1", CORRECTION_MODE="causal", USE_TTT="1"))
    assert legal.returncode == 0, legal.stderr[-3000:]
    assert last(legal.stdout, "eval_base")["val_bpb"] == final["val_bpb"]
    assert last(legal.stdout, "ttt")["mode"] == last(ttt.stdout, "ttt_chosen")["ttt_mode"]
    assert float(last(legal.stdout, "eval_ttt_causal")["val_bpb"]) != float(final["val_bpb"])  # it adapted
    other = "full" if last(legal.stdout, "ttt")["mode"] == "phased" else "phased"  # and the other TTT mode
    chunked = run_script(["eval_final.py"], dict(env, USE_TTT="1", TTT_MODE=other, TTT_CHUNK_TOKENS="1024"))
    assert chunked.returncode == 0 and last(chunked.stdout, "ttt")["mode"] == other, chunked.stderr[-3000:]


# ---- 2. a run owns its outputs ----


def test_a_second_training_into_the_same_folder_is_refused_and_the_first_keeps_its_own(tiny_data, tmp_path):
    """Before: dualA and dualB into one OUTPUT_DIR both exited 0, dualA's log showed dualB's figures and
    dualA's artifact was gone. Now the second is refused at start, naming the first; the first's log
    names the sha256 of the bytes it wrote, which its round trip read back; a later run says it replaces."""
    # the first trains for 25 s of wall clock: the second reaches its start (imports, the precision probe) well
    # within that, even on a loaded machine (11 s measured on a loaded 2-core VM)
    first_env = tiny_env(tiny_data, tmp_path, RUN_ID="dualA", SEED=1, ITERATIONS=10**6, MAX_WALLCLOCK_SECONDS=25,
                         TRAIN_LOG_EVERY=1000)
    first = subprocess.Popen([sys.executable, "train_gpt.py"], env=first_env, cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    log = tmp_path / "logs" / "dualA.txt"
    while not log.exists() and first.poll() is None:  # the lock is taken before the log is opened
        time.sleep(0.05)
    second = run_script(["train_gpt.py"], tiny_env(tiny_data, tmp_path, RUN_ID="dualB", SEED=2))
    assert first.poll() is None, "the first training ended before the second started: the test proves nothing"
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    assert_one_line(second, f"OUTPUT_DIR={tmp_path} is in use", "run_id:dualA")
    assert not (tmp_path / "logs" / "dualB.txt").exists()
    digest = last(log.read_text(), "artifact")["artifact_sha256"]
    assert hashlib.sha256((tmp_path / train_gpt.ARTIFACT_NAME).read_bytes()).hexdigest() == digest
    later = run_script(["train_gpt.py"], tiny_env(tiny_data, tmp_path, RUN_ID="later", SEED=3))
    assert later.returncode == 0 and f"note replacing:{tmp_path / train_gpt.ARTIFACT_NAME}" in later.stdout
    # make_record never publishes one artifact's figures for two seeds
    twin = tmp_path / "logs" / "twin.txt"
    twin.write_text(log.read_text().replace(" seed:1 ", " seed:7 "))
    runs = [make_record.parse_train_log(p) for p in (log, twin)]
    assert runs[0]["seed"] != runs[1]["seed"]
    with pytest.raises(make_record.RecordError, match="report the same artifact"):
        make_record.summarize(runs)


# ---- 3. and 4. TTT: a diverging run prints no nan; with nothing adapted its figure is the base's ----


def test_a_diverging_ttt_stops_adapting_and_prints_a_finite_honest_figure(trained):
    """Before: TTT_LR=1e6 TTT_GRAD_CLIP=0 printed val_bpb:nan and exited 0."""
    run = run_script(["eval_final.py"], env(trained, USE_TTT=1, TTT_LR=1e20, TTT_GRAD_CLIP=0, TTT_CHUNK_TOKENS=512))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "nan" not in run.stdout.replace("nan_", "")
    diverged = last(run.stdout, "ttt_diverged")
    assert diverged["chunk"] == "0/8" and diverged["ttt_lr"] == "1e+20" and "lower TTT_LR" in run.stdout
    ttt = last(run.stdout, "eval_ttt")
    assert float(ttt["val_bpb"]) < 20 and last(run.stdout, "ttt")["diverged"] == "1"


def test_a_score_that_is_not_a_number_ends_the_run_with_one_line(trained, monkeypatch, capsys, tmp_path):
    """The guard behind the guard: if TTT's pass still scored a non-finite loss, nothing is printed as a
    result, the run exits 2 and the evaluation's log ends with the error."""
    real = score_first_ttt.ttt_evaluate

    def poisoned(*args, **kwargs):
        result = real(*args, **kwargs)
        result.scores.loss_sum = float("nan")
        return result

    checkpoint = tmp_path / "model.ptz"
    shutil.copy(trained["env"]["CHECKPOINT"], checkpoint)
    for key, value in env(trained, CHECKPOINT=checkpoint, USE_TTT=1, TTT_CHUNK_TOKENS=1024).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(score_first_ttt, "ttt_evaluate", poisoned)
    with pytest.raises(SystemExit) as stop:
        train_gpt.run_main(eval_final.main, "eval_final.py")
    assert stop.value.code == 2
    out, err = capsys.readouterr()
    assert "eval_ttt" not in out and "eval_ttt: the score is nan, which is not a result; lower TTT_LR" in err
    log = (tmp_path / "logs" / "eval_model.txt").read_text()
    assert log.rstrip().splitlines()[-1].startswith("error script:eval_final.py # eval_ttt: the score is nan")


def test_ttt_with_nothing_adapted_scores_exactly_the_base_pass(trained):
    """Before: TTT_MAX_SECONDS=0.001 gave chunks_adapted:0 and gain_bpb:0.00001770 (windows split at
    chunk edges that are not on the stride). Chunks of 1,000 at stride 32 now keep the base windows."""
    run = run_script(["eval_final.py"], env(trained, USE_TTT=1, TTT_MAX_SECONDS=1e-9, TTT_CHUNK_TOKENS=1000))
    assert run.returncode == 0, run.stderr[-3000:]
    assert last(run.stdout, "ttt")["chunks_adapted"] == "0"
    ttt = last(run.stdout, "eval_ttt")
    assert ttt["val_bpb"] == last(run.stdout, "eval_base")["val_bpb"] and ttt["gain_bpb"] == "0.00000000"


# ---- 5. and 6. settings checked against their data; outputs probed before work ----


def test_an_eval_seq_len_beyond_the_stream_is_refused_by_the_evaluation_and_the_builder(trained):
    """Before: EVAL_SEQ_LEN=1000000 and 2000000 on a 74,880-token stream scored 2.80252854 and 2.80279012
    (31 s against 2.6 s), and the builder asked for HINT_TRAIN_TOKENS between 1000000 and 857540."""
    run = run_script(["eval_final.py"], env(trained, EVAL_SEQ_LEN=1000000))
    assert_one_line(run, "EVAL_SEQ_LEN=1000000 is longer than the", "set it to at most")
    build = run_script(["build_correction_table.py"], env(trained, EVAL_SEQ_LEN=1000000, CORRECTION_MODE="causal",
                                                           HINT_TRAIN_TOKENS=2000))
    assert "HINT_TRAIN_TOKENS between" not in assert_one_line(build, "EVAL_SEQ_LEN=1000000 is longer than")


def test_a_ttt_chunk_that_holds_the_whole_stream_is_refused(trained):
    """One chunk is scored and never trained on: TTT would change nothing and cost a pass."""
    run = run_script(["eval_final.py"], env(trained, USE_TTT=1, TTT_CHUNK_TOKENS=10**6))
    assert_one_line(run, "TTT_CHUNK_TOKENS=1000000 holds the whole", "set it below")


def test_the_causal_builder_probes_its_output_before_its_search(trained, tmp_path):
    """Before: a read-only checkpoint folder failed after the 15 s search with two tracebacks."""
    checkpoint = tmp_path / "model.ptz"
    shutil.copy(trained["env"]["CHECKPOINT"], checkpoint)
    (tmp_path / "model.with_hints.ptz").mkdir()  # where the copy goes: a folder
    build = run_script(["build_correction_table.py"], env(trained, CHECKPOINT=checkpoint, CORRECTION_MODE="causal",
                                                           HINT_TRAIN_TOKENS=2000))
    assert_one_line(build, "model.with_hints.ptz is a folder")
    assert "hint_search" not in build.stdout
    shutil.rmtree(tmp_path / "model.with_hints.ptz")
    readonly = tmp_path / "ro"
    readonly.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(readonly)], capture_output=True).returncode:
        pytest.skip("no tmpfs mount here for a read-only folder (the folder case above ran)")
    try:
        shutil.copy(checkpoint, readonly / "model.ptz")
        subprocess.run(["mount", "-o", "remount,ro", str(readonly)], check=True)
        build = run_script(["build_correction_table.py"], env(trained, CHECKPOINT=readonly / "model.ptz",
                                                               CORRECTION_MODE="causal", HINT_TRAIN_TOKENS=2000))
        assert_one_line(build, "cannot write in", "Read-only file system")
        assert "hint_search" not in build.stdout
    finally:
        subprocess.run(["umount", str(readonly)])


# ---- 7. a full disk loses nothing it can keep ----


class FullDisk:
    """open() for run_files: files under `folder` take `room` bytes in all, then every write fails with
    ENOSPC, as on a disk that fills during the run; elsewhere the real open."""

    def __init__(self, folder, room: int):
        self.folder, self.room = str(folder), room

    def __call__(self, path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        if not str(path).startswith(self.folder) or mode.startswith("r"):
            return f
        disk, write = self, f.write

        def limited(data):
            if len(data) > disk.room:
                raise OSError(errno.ENOSPC, "No space left on device")
            disk.room -= len(data)
            return write(data)

        f.write = limited
        return f


def test_a_full_disk_keeps_the_weights_and_leaves_no_half_log_in_the_way(tiny_data, tmp_path, monkeypatch, capsys):
    """Before: a traceback from Logger.__call__, a half log that made a rerun with the same RUN_ID refused,
    and at the export ten paid minutes of trained weights lost. Now the log so far is kept beside as
    .incomplete, the run goes on, and the artifact goes to the first folder with room, the line says where."""
    out, spare = tmp_path / "out", tmp_path / "spare"
    spare.mkdir()
    for key, value in tiny_env(tiny_data, out, RUN_ID="full").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(run_files, "open", FullDisk(out, room=60_000), raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(spare))
    result = train_gpt.train(train_gpt.Settings.from_env())
    console, err = capsys.readouterr()
    kept = out / "logs" / "full.txt.incomplete"
    assert not (out / "logs" / "full.txt").exists() and kept.is_file() and "run run_id:full" in kept.read_text()
    assert f"kept_as:{kept}" in err and "Traceback" not in err
    fallback = spare / "final_model.int6.full.ptz"
    assert result["artifact"] == str(fallback) and f"written_to:{fallback}" in console
    assert hashlib.sha256(fallback.read_bytes()).hexdigest() == last(console, "artifact")["artifact_sha256"]
    assert float(last(console, "final_int8_zlib_roundtrip_exact")["val_bpb"]) == pytest.approx(result["val_bpb"])
    assert not (out / train_gpt.ARTIFACT_NAME).exists()
    monkeypatch.setattr(run_files, "open", open, raising=False)  # room again: the same RUN_ID is not refused
    assert train_gpt.train(train_gpt.Settings.from_env())["artifact"] == str(out / train_gpt.ARTIFACT_NAME)


def test_a_real_full_disk_through_the_command(tiny_data, tmp_path):
    """The same on a real 64 KiB file system (tmpfs, where this machine lets root mount one): the log's
    code blocks fill it, then the artifact does not fit; the weights land in TMPDIR, the run exits 0."""
    out, spare = tmp_path / "small_disk", tmp_path / "spare"
    out.mkdir()
    spare.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(out)], capture_output=True).returncode:
        pytest.skip("no tmpfs mount here (the in-process full disk above ran)")
    try:
        run = run_script(["train_gpt.py"], dict(tiny_env(tiny_data, out, RUN_ID="disk"), TMPDIR=str(spare)))
        assert run.returncode == 0, run.stderr[-3000:]
        assert "Traceback" not in run.stderr and "write_failed:No%20space%20left%20on%20device" in run.stderr
        assert not (out / "logs" / "disk.txt").exists() and (out / "logs" / "disk.txt.incomplete").is_file()
        fallback = spare / "final_model.int6.disk.ptz"
        assert f"written_to:{fallback}" in run.stdout
        assert hashlib.sha256(fallback.read_bytes()).hexdigest() == last(run.stdout, "artifact")["artifact_sha256"]
    finally:
        subprocess.run(["umount", str(out)])


# ---- 8. the smaller items ----


def test_a_damaged_knob_blob_names_the_builder_command(tmp_path):
    import causal_hints

    with pytest.raises(ValueError, match="CORRECTION_MODE=causal python build_correction_table.py"):
        causal_hints.decode_knobs(b"\x00" * 9)


def test_a_checkpoint_that_is_a_folder_is_called_a_folder(trained, tmp_path):
    run = run_script(["eval_final.py"], env(trained, CHECKPOINT=tmp_path))
    assert_one_line(run, f"CHECKPOINT={tmp_path} is a folder; name the artifact file in it")
