"""Tests for records/make_record.py: log parsing, the Student t helpers, and the command line."""

import importlib.util
import json
import math
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "records" / "make_record.py"
_spec = importlib.util.spec_from_file_location("make_record", SCRIPT)
make_record = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_record)

# The public 9L SmearGate record's three seeds (SPEC §10): val_bpb from its final lines. The
# val_loss figures beside them are made up at the record's own nats-per-BPB ratio.
PUBLIC_SEEDS = [
    (1337, 1.93492097, 1.14597222),
    (42, 1.93591486, 1.14656085),
    (2025, 1.93314043, 1.14491770),
]


def train_log_text(seed, val_loss, val_bpb, *, final_line=True, stopped_early=True):
    lines = [
        "logs/abc.txt",
        f"settings seed:{seed} num_layers:11 model_dim:512 train_seq_len:2048 "
        "train_batch_tokens:786432",
        "hardware device:cuda:0 name:NVIDIA%20H100%2080GB%20HBM3 world_size:8",
        "train_step step:120/20000 train_loss:3.1234 train_time:9734ms step_avg:81.12ms tokens_per_s:9700000",
        "val_step step:200/20000 val_loss:2.1 val_bpb:1.2 train_time:16224ms step_avg:81.12ms",
        "train_step step:7379/20000 train_loss:1.9876 train_time:600123ms step_avg:81.33ms",
    ]
    if stopped_early:
        lines.append("stopping_early reason:wallclock_cap train_time:600123ms step:7379/20000")
    lines += [
        f"prequant_exact val_loss:{val_loss + 0.005:.8f} val_bpb:{val_bpb + 0.003:.8f}",
        "artifact model_bytes:15812345 train_code_bytes:61234 total_bytes:15873579 cap_bytes:16000000 "
        "headroom_bytes:126421",
        f"final_int6_zstd_roundtrip_exact val_loss:{val_loss:.8f} val_bpb:{val_bpb:.8f} "
        "eval_time:155123ms",
    ]
    if final_line:
        lines.append(f"final_int8_zlib_roundtrip_exact val_loss:{val_loss:.8f} "
                     f"val_bpb:{val_bpb:.8f}")
    return "\n".join(lines) + "\n"


def eval_log_text(seed=None, corrected_bpb=1.06, table_bytes=2867053):
    lines = [f"settings seed:{seed} checkpoint:final_model.int6.ptz"] if seed is not None else []
    lines += [
        "eval_base val_loss:1.93492097 val_bpb:1.14597222 eval_time:155123ms stride:64",
        f"correction entries:907927 table_bytes:{table_bytes} bytes_per_entry:3.158 format:2 "
        "select:fill boost:20.0",
        f"eval_corrected_valderived val_loss:1.79000000 val_bpb:{corrected_bpb:.8f}",
        "eval_two_part val_bpb:1.29780000",
        f"artifact_total eval_code_bytes:61234 model_bytes:12636796 table_bytes:{table_bytes} "
        "total_bytes:15565083 cap_bytes:16000000",
    ]
    return "\n".join(lines) + "\n"


def write_public_logs(directory):
    paths = []
    for seed, val_loss, val_bpb in PUBLIC_SEEDS:
        path = directory / f"train_seed{seed}.log"
        path.write_text(train_log_text(seed, val_loss, val_bpb))
        paths.append(path)
    return paths


def run_cli(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)],
                          capture_output=True, text=True, timeout=60)


# --- the public three-seed figures --------------------------------------------------------------

def test_public_three_seeds_mean_and_sample_std(tmp_path):
    runs = [make_record.parse_train_log(path) for path in write_public_logs(tmp_path)]
    summary = make_record.summarize(runs)
    assert round(summary["val_bpb"], 5) == 1.14582
    # Sample standard deviation (ddof=1) of 1.14597222, 1.14656085, 1.14491770 is 0.00083251.
    assert round(summary["val_bpb_std"], 5) == 0.00083
    assert summary["val_bpb_std"] == pytest.approx(0.00083251, abs=1e-8)
    assert summary["seeds"] == [1337, 42, 2025]


def test_cli_writes_submission_and_results(tmp_path):
    logs = write_public_logs(tmp_path)
    out = tmp_path / "record"
    result = run_cli("--logs", *logs, "--out", out, "--author", "Ada", "--date", "2026-03-21",
                     "--corpus", "fineweb10B_sp1024")
    assert result.returncode == 0, result.stderr
    submission = json.loads((out / "submission.json").read_text())
    assert submission["author"] == "Ada"
    assert submission["date"] == "2026-03-21"
    assert submission["corpus"] == "fineweb10B_sp1024"
    assert round(submission["val_bpb"], 5) == 1.14582
    assert submission["hardware"] == {"device": "cuda:0", "name": "NVIDIA H100 80GB HBM3",
                                      "world_size": 8}
    assert submission["bytes_total"] == 15873579
    assert submission["bytes_model_int6_zstd"] == 15812345
    assert submission["bytes_code"] == 61234
    assert submission["step_stop"] == 7379
    assert submission["wallclock_seconds"] == pytest.approx(600.123)
    assert submission["eval_time_seconds"] == pytest.approx(155.123)
    assert submission["seed_results"][0] == {
        "seed": 1337, "val_loss": 1.93492097, "val_bpb": 1.14597222, "step_stop": 7379,
        "wallclock_seconds": pytest.approx(600.123), "log_file": "train_seed1337.log"}
    assert "correction" not in submission and "significance" not in submission
    results = (out / "results.md").read_text()
    assert results == result.stdout
    assert "1.14581692 ± 0.00083251" in results
    assert sorted(p.name for p in out.iterdir()) == ["curves.svg", "results.md", "submission.json"]


def curve_log_text(seed, losses, val_bpbs, final_bpb, step_ms):
    """A training log with a train_step line a loss, a val_step line a BPB, train_done, and the final lines."""
    lines = [f"settings seed:{seed}"]
    for number, loss in enumerate(losses, 1):
        lines.append(f"train_step step:{10 * number}/100 train_loss:{loss} train_time:{10 * number * step_ms}ms")
        if number <= len(val_bpbs):
            lines.append(f"val_step step:{10 * number}/100 val_loss:3.0 val_bpb:{val_bpbs[number - 1]} "
                         f"train_time:{10 * number * step_ms}ms")
    end = 10 * len(losses)
    lines += [f"train_done steps:{end} reason:iterations train_time:{end * step_ms}ms",
              f"prequant_exact val_loss:3.0 val_bpb:{final_bpb + 0.01}",
              f"final_int8_zlib_roundtrip_exact val_loss:3.0 val_bpb:{final_bpb}"]
    return "\n".join(lines) + "\n"


def test_the_picture_holds_every_point_of_both_runs(tmp_path):
    """curves.svg, drawn from two logs, carries each run's every logged point in each of its four panels
    (figure against step and against training time), placed so that a later step or time is further right
    and a larger figure higher up, inside its panel."""
    import xml.etree.ElementTree as ElementTree
    runs = {1: ([6.5, 4.25, 3.5, 3.125], [2.5, 2.25], 2.0625, 100),
            2: ([6.75, 4.5, 3.75], [2.75], 2.1875, 130)}
    logs = []
    for seed, figures in runs.items():
        logs.append(tmp_path / f"seed{seed}.txt")
        logs[-1].write_text(curve_log_text(seed, *figures))
    result = run_cli("--logs", *logs, "--out", tmp_path / "record")
    assert result.returncode == 0, result.stderr
    assert "[curves.svg](curves.svg)" in (tmp_path / "record" / "results.md").read_text()
    svg = ElementTree.parse(tmp_path / "record" / "curves.svg").getroot()
    drawn = [c.attrib for c in svg.iter("{http://www.w3.org/2000/svg}circle") if "data-kind" in c.attrib]
    expected = set()
    for seed, (losses, val_bpbs, final_bpb, step_ms) in runs.items():
        end = (10 * len(losses), 10 * len(losses) * step_ms / 1000)
        points = [("train_loss", "train", 10 * n, 10 * n * step_ms / 1000, v) for n, v in enumerate(losses, 1)]
        points += [("val_bpb", "val", 10 * n, 10 * n * step_ms / 1000, v) for n, v in enumerate(val_bpbs, 1)]
        points += [("val_bpb", "prequant", *end, final_bpb + 0.01), ("val_bpb", "roundtrip", *end, final_bpb)]
        expected |= {(str(seed), *point) for point in points}
    read = [(a["data-seed"], a["data-figure"], a["data-kind"], int(a["data-step"]), float(a["data-seconds"]),
             float(a["data-value"])) for a in drawn]
    assert len(read) == 2 * len(expected)  # each point twice: against step and against time
    assert set(read) == expected
    m = make_record
    for row, figure in enumerate(("val_bpb", "train_loss")):  # rows: the figures; columns: step, then time
        top = m.MARGIN_TOP + row * (m.PANEL_HEIGHT + m.GAP_Y)
        for column, axis in enumerate(("data-step", "data-seconds")):
            left = m.MARGIN_LEFT + column * (m.PANEL_WIDTH + m.GAP_X)
            panel = [a for a in drawn if left <= float(a["cx"]) <= left + m.PANEL_WIDTH
                     and top <= float(a["cy"]) <= top + m.PANEL_HEIGHT]
            assert {a["data-figure"] for a in panel} == {figure}
            assert len(panel) == sum(point[1] == figure for point in expected)  # all of them, inside the panel
            by_x = sorted(panel, key=lambda a: float(a[axis]))
            assert [float(a["cx"]) for a in by_x] == sorted(float(a["cx"]) for a in panel), (figure, axis)
            by_value = sorted(panel, key=lambda a: float(a["data-value"]))
            assert [float(a["cy"]) for a in by_value] == sorted((float(a["cy"]) for a in panel), reverse=True)


# --- parsing details ----------------------------------------------------------------------------

def test_stopping_early_line_gives_step_and_time(tmp_path):
    path = tmp_path / "run.log"
    path.write_text(train_log_text(7, 1.95, 1.155).replace(
        "stopping_early reason:wallclock_cap train_time:600123ms step:7379/20000",
        "stopping_early reason:wallclock_cap train_time:600456ms step:7380/20000"))
    run = make_record.parse_train_log(path)
    assert run["stopped_early"] == "wallclock_cap"
    assert run["step_stop"] == 7380
    assert run["wallclock_seconds"] == pytest.approx(600.456)


def test_train_done_line_gives_the_final_step_and_time(tmp_path):
    path = tmp_path / "run.log"
    text = train_log_text(7, 1.95, 1.155, stopped_early=False)
    text = text.replace("prequant_exact", "train_done steps:1250 reason:iterations train_time:412345ms\nprequant_exact")
    path.write_text(text)
    run = make_record.parse_train_log(path)
    assert run["step_stop"] == 1250  # not the last step line logged before it
    assert run["wallclock_seconds"] == pytest.approx(412.345)


def test_step_and_time_fall_back_to_last_step_line(tmp_path):
    path = tmp_path / "run.log"
    path.write_text(train_log_text(7, 1.95, 1.155, stopped_early=False))
    run = make_record.parse_train_log(path)
    assert run["stopped_early"] is None
    assert run["step_stop"] == 7379
    assert run["wallclock_seconds"] == pytest.approx(600.123)


def test_tags_are_found_inside_prefixed_lines(tmp_path):
    path = tmp_path / "run.log"
    path.write_text("[rank0] 12:00:01 settings seed:5 model_dim:512\n"
                    "[rank0] 12:10:02 final_int8_zlib_roundtrip_exact val_loss:1.9 val_bpb:1.12 "
                    "# done\n")
    run = make_record.parse_train_log(path)
    assert (run["seed"], run["val_loss"], run["val_bpb"]) == (5, 1.9, 1.12)
    assert run["hardware"] is None and run["bytes_total"] is None


def test_eval_logs_fill_the_correction_block(tmp_path):
    logs = write_public_logs(tmp_path)
    eval_logs = []
    for (seed, _, _), corrected in zip(PUBLIC_SEEDS, (1.06, 1.07, 1.08)):
        path = tmp_path / f"eval_seed{seed}.log"
        path.write_text(eval_log_text(corrected_bpb=corrected))
        eval_logs.append(path)
    out = tmp_path / "record"
    result = run_cli("--logs", *logs, "--eval-logs", *eval_logs, "--out", out)
    assert result.returncode == 0, result.stderr
    correction = json.loads((out / "submission.json").read_text())["correction"]
    first = correction["per_seed"][0]
    assert first["seed"] == 1337
    assert (first["entries"], first["table_bytes"], first["bytes_per_entry"]) == (907927, 2867053,
                                                                                 3.158)
    assert (first["format"], first["select"], first["boost"]) == (2, "fill", 20.0)
    assert first["base_val_bpb"] == 1.14597222 and first["stride"] == 64
    assert first["corrected_val_bpb_valderived"] == 1.06
    assert first["two_part_val_bpb"] == 1.2978
    assert first["artifact_total_bytes"] == 15565083
    assert correction["mean"]["corrected_val_bpb_valderived"] == pytest.approx(1.07)
    assert correction["artifact_total_bytes_max"] == 15565083
    assert "val-derived" in correction["note"]
    assert "val-derived" in (out / "results.md").read_text()


LEGAL_LINES = (
    "eval_causal val_loss:1.80000000 val_bpb:{causal:.8f} eval_time:160000ms base_val_bpb:1.14597222 "
    "gain_bpb:0.1 # legal: score-first causal hints",
    "eval_ttt val_loss:1.90000000 val_bpb:{ttt:.8f} eval_time:410000ms base_val_bpb:1.14597222 gain_bpb:0.002 "
    "# legal: score-first test-time training",
    "ttt mode:full chunks:1893 chunk_tokens:32768 chunks_adapted:1892 epochs:3 steps:5676 lr:0.002 momentum:0.9 "
    "params:all adapted_parameters:26800000 time:410000ms budget:not_reached",
    "eval_ttt_causal val_loss:1.78000000 val_bpb:{both:.8f} eval_time:411000ms base_val_bpb:1.14597222 gain_bpb:0.1",
    "hints knob_bytes:84 orders:1,2,3,4 table_bits:24 hinted:0.9 right:0.5",
)


def test_eval_logs_with_the_legal_methods_fill_their_own_block(tmp_path):
    logs = write_public_logs(tmp_path)
    eval_logs = []
    for (seed, _, _), ttt in zip(PUBLIC_SEEDS, (1.143, 1.144, 1.145)):
        path = tmp_path / f"eval_seed{seed}.log"
        legal = "\n".join(LEGAL_LINES).format(causal=ttt - 0.05, ttt=ttt, both=ttt - 0.06)
        path.write_text(eval_log_text().replace("eval_corrected_valderived", legal + "\neval_corrected_valderived"))
        eval_logs.append(path)
    out = tmp_path / "record"
    result = run_cli("--logs", *logs, "--eval-logs", *eval_logs, "--out", out)
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "submission.json").read_text())
    legal = summary["legal_eval"]
    first = legal["per_seed"][0]
    assert (first["ttt_val_bpb"], first["causal_val_bpb"], first["ttt_causal_val_bpb"]) == (1.143, 1.093, 1.083)
    assert (first["ttt_mode"], first["ttt_chunks"], first["ttt_epochs"], first["ttt_lr"]) == ("full", 1893, 3, 0.002)
    assert first["ttt_eval_time_seconds"] == 410.0 and first["hint_orders"] == "1,2,3,4"
    assert legal["mean"]["ttt_val_bpb"] == pytest.approx(1.144)
    assert summary["correction"]["per_seed"][0]["corrected_val_bpb_valderived"] == 1.06  # still apart, labelled
    results = (out / "results.md").read_text()
    assert "Legal eval-time methods" in results and "1.14400000" in results
    # without those lines there is no legal block
    plain = tmp_path / "plain"
    for path in eval_logs:
        path.write_text(eval_log_text())
    assert run_cli("--logs", *logs, "--eval-logs", *eval_logs, "--out", plain).returncode == 0
    assert "legal_eval" not in json.loads((plain / "submission.json").read_text())


def test_an_eval_whose_budget_skipped_the_base_pass_still_makes_a_record(tmp_path):
    """EVAL_MAX_SECONDS may drop the separate base pass (eval_final.py logs `eval_base skipped:budget`): the
    legal figures stand, the base figure is left empty (the training log's final line is the model's own)."""
    logs = write_public_logs(tmp_path)
    eval_logs = []
    for seed, _, _ in PUBLIC_SEEDS:
        path = tmp_path / f"eval_seed{seed}.log"
        legal = "\n".join(LEGAL_LINES).format(causal=1.09, ttt=1.14, both=1.08)
        text = eval_log_text().replace("eval_corrected_valderived", legal + "\neval_corrected_valderived")
        path.write_text(text.replace("eval_base val_loss:1.93492097 val_bpb:1.14597222 eval_time:155123ms stride:64",
                                     "eval_base skipped:budget projected_s:189.0 # the TTT pass scores every position"))
        eval_logs.append(path)
    assert make_record.parse_eval_log(eval_logs[0])["base_val_bpb"] is None
    out = tmp_path / "record"
    result = run_cli("--logs", *logs, "--eval-logs", *eval_logs, "--out", out)
    assert result.returncode == 0, result.stderr
    legal = json.loads((out / "submission.json").read_text())["legal_eval"]
    assert legal["per_seed"][0]["ttt_val_bpb"] == 1.14 and legal["mean"]["base_val_bpb"] is None


def test_prose_mentioning_a_tag_is_not_a_tagged_line(tmp_path):
    path = tmp_path / "eval.log"
    path.write_text("building correction table from the validation stream\n" + eval_log_text()
                    + "correction table done\n")
    assert make_record.parse_eval_log(path)["entries"] == 907927


def test_eval_logs_are_matched_by_seed_when_they_name_one(tmp_path):
    runs = [make_record.parse_train_log(path) for path in write_public_logs(tmp_path)]
    evaluations = []
    for seed in (2025, 1337, 42):  # deliberately out of order
        path = tmp_path / f"eval_{seed}.log"
        path.write_text(eval_log_text(seed=seed, table_bytes=seed))
        evaluations.append(make_record.parse_eval_log(path))
    matched = make_record.match_eval_logs(runs, evaluations)
    assert [evaluation["table_bytes"] for evaluation in matched] == [1337, 42, 2025]


# --- errors: one line, exit status 2, no traceback ----------------------------------------------

def assert_clean_failure(result, *fragments):
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("make_record: ")
    assert result.stderr.count("\n") == 1
    for fragment in fragments:
        assert fragment in result.stderr


def test_incomplete_log_names_the_file(tmp_path):
    path = tmp_path / "run1.txt"
    path.write_text(train_log_text(1, 1.95, 1.155, final_line=False))
    out = tmp_path / "record"
    result = run_cli("--logs", path, "--out", out)
    assert_clean_failure(result, f"{path}: incomplete: no final_int8_zlib_roundtrip_exact line",
                         "(the run stopped before its final line)")
    assert not out.exists()


def test_malformed_number_names_file_line_and_value(tmp_path):
    path = tmp_path / "run.log"
    path.write_text(train_log_text(1, 1.95, 1.155).replace("val_bpb:1.15500000\n",
                                                           "val_bpb:1.15x00000\n"))
    result = run_cli("--logs", path, "--out", tmp_path / "record")
    assert_clean_failure(result, str(path), "malformed", "line 11", "val_bpb:1.15x00000")


def test_missing_key_is_malformed(tmp_path):
    path = tmp_path / "run.log"
    path.write_text("settings seed:3\nfinal_int8_zlib_roundtrip_exact val_loss:1.93\n")
    with pytest.raises(make_record.RecordError, match="line 2 has no 'val_bpb:' value"):
        make_record.parse_train_log(path)


def test_non_finite_figure_is_malformed(tmp_path):
    path = tmp_path / "run.log"
    path.write_text("settings seed:3\nfinal_int8_zlib_roundtrip_exact val_loss:nan val_bpb:nan\n")
    with pytest.raises(make_record.RecordError, match="val_loss:nan is not a number"):
        make_record.parse_train_log(path)


def test_missing_seed_is_malformed(tmp_path):
    path = tmp_path / "run.log"
    path.write_text("final_int8_zlib_roundtrip_exact val_loss:1.9 val_bpb:1.1\n")
    with pytest.raises(make_record.RecordError, match="no seed"):
        make_record.parse_train_log(path)


def test_missing_file(tmp_path):
    result = run_cli("--logs", tmp_path / "absent.log", "--out", tmp_path / "record")
    assert_clean_failure(result, "absent.log: no such file")


def test_eval_log_count_must_match(tmp_path):
    logs = write_public_logs(tmp_path)
    eval_path = tmp_path / "eval.log"
    eval_path.write_text(eval_log_text())
    result = run_cli("--logs", *logs, "--eval-logs", eval_path, "--out", tmp_path / "record")
    assert_clean_failure(result, "1 eval logs for 3 training logs")


def test_eval_log_without_base_score_is_incomplete(tmp_path):
    path = tmp_path / "eval.log"
    path.write_text("correction entries:10 table_bytes:30 bytes_per_entry:3.0\n")
    with pytest.raises(make_record.RecordError, match="incomplete: no eval_base line"):
        make_record.parse_eval_log(path)


def test_duplicate_seed_is_refused(tmp_path):
    logs = write_public_logs(tmp_path)
    runs = [make_record.parse_train_log(path) for path in (logs[0], logs[0])]
    with pytest.raises(make_record.RecordError, match="seed 1337 appears in both"):
        make_record.summarize(runs)


# --- Student t and the record test --------------------------------------------------------------

@pytest.mark.parametrize("t, df, one_sided_p, tolerance", [
    (2.0, 2, 0.0917, 1e-4),
    (6.965, 2, 0.01, 1e-4),
    (2.262, 9, 0.025, 1e-4),   # the two-sided 5% point of t(9)
    (2.776, 4, 0.025, 1e-4),   # the two-sided 5% point of t(4)
    (3.747, 4, 0.01, 1e-4),    # the one-sided 1% point of t(4)
    (0.0, 5, 0.5, 1e-15),
])
def test_student_t_known_values(t, df, one_sided_p, tolerance):
    assert make_record.student_t_sf(t, df) == pytest.approx(one_sided_p, abs=tolerance)


@pytest.mark.parametrize("t", [-30.0, -2.5, -0.3, 0.7, 1.0, 4.0, 100.0])
def test_student_t_matches_closed_forms(t):
    # df = 1 is the Cauchy distribution; df = 2 has CDF 1/2 + t / (2 sqrt(2 + t^2)); CDF(t) = SF(-t).
    assert make_record.student_t_sf(-t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi,
                                                            rel=1e-12, abs=1e-15)
    assert make_record.student_t_sf(-t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)),
                                                            rel=1e-12, abs=1e-15)
    assert make_record.student_t_sf(-t, 7) + make_record.student_t_sf(t, 7) == pytest.approx(1)


@pytest.mark.parametrize("t", [-3.0, -1.0, 0.5, 1.5, 2.326])
def test_student_t_tends_to_normal(t):
    normal_cdf = 0.5 * math.erfc(-t / math.sqrt(2))
    assert make_record.student_t_sf(-t, 1e6) == pytest.approx(normal_cdf, abs=1e-5)


def test_incomplete_beta_closed_forms():
    for x in (0.01, 0.3, 0.5, 0.9, 0.999):
        assert make_record.regularized_incomplete_beta(x, 3.5, 1.0) == pytest.approx(x ** 3.5)
        assert make_record.regularized_incomplete_beta(x, 1.0, 2.5) == pytest.approx(
            1 - (1 - x) ** 2.5)
    assert make_record.regularized_incomplete_beta(0.0, 2, 3) == 0.0
    assert make_record.regularized_incomplete_beta(1.0, 2, 3) == 1.0


def test_t_test_against_a_loss_baseline():
    losses = [seed_loss for _, seed_loss, _ in PUBLIC_SEEDS]
    mean = sum(losses) / 3
    spread = math.sqrt(sum((x - mean) ** 2 for x in losses) / 2)
    threshold = 1.96 - 0.005
    t, df, p_value = make_record.one_sided_t_test_below(losses, threshold)
    assert df == 2
    assert t == pytest.approx((threshold - mean) / (spread / math.sqrt(3)))
    assert p_value == pytest.approx(0.5 - t / (2 * math.sqrt(2 + t * t)))


def test_significance_from_a_bpb_baseline_is_converted_and_said(tmp_path):
    runs = [make_record.parse_train_log(path) for path in write_public_logs(tmp_path)]
    summary = make_record.summarize(runs, baseline_bpb=1.1748)
    significance = summary["significance"]
    ratio = summary["val_loss"] / summary["val_bpb"]
    assert significance["baseline_loss"] == pytest.approx(1.1748 * ratio)
    assert significance["threshold_loss"] == pytest.approx(1.1748 * ratio - 0.005)
    assert "converted from --baseline-bpb" in significance["baseline_loss_source"]
    assert significance["df"] == 2
    assert significance["significant_at_0_01"] is True
    assert 0 < significance["p_value"] < 0.01
    # Against itself the runs cannot beat the margin.
    itself = make_record.summarize(runs, baseline_loss=summary["val_loss"])["significance"]
    assert itself["p_value"] > 0.5 and itself["significant_at_0_01"] is False


def test_single_seed_has_no_spread_and_no_test(tmp_path):
    run = make_record.parse_train_log(write_public_logs(tmp_path)[0])
    summary = make_record.summarize([run], baseline_loss=2.0)
    assert summary["val_bpb_std"] is None and summary["val_loss_std"] is None
    assert summary["significance"] == {"skipped": "a t-test needs at least 2 seeds"}
    assert "not tested" in make_record.render_results_markdown(summary)


def test_a_log_cut_mid_line_is_refused_not_read_as_a_shorter_number(tmp_path):
    whole = train_log_text(1, 1.95, 1.155)
    for cut_at in ("val_bpb:1.", "val_bpb:1.15"):  # the first is no number; the second a wrong one
        path = tmp_path / "run.log"
        path.write_text(whole[: whole.rindex(cut_at) + len(cut_at)])
        result = run_cli("--logs", path, "--out", tmp_path / "record")
        assert_clean_failure(result, str(path), "incomplete: the log ends mid-line")
        assert not (tmp_path / "record").exists()


def test_a_number_without_digits_after_its_point_is_malformed(tmp_path):
    path = tmp_path / "run.log"
    path.write_text(train_log_text(1, 1.95, 1.155).replace("val_bpb:1.15500000\n", "val_bpb:1.\n"))
    result = run_cli("--logs", path, "--out", tmp_path / "record")
    assert_clean_failure(result, str(path), "malformed", "val_bpb:1. is not a number")


def test_an_eval_log_holding_two_evaluations_is_refused(tmp_path):
    """A second evaluation appended to the same log would mix its figures with the first's."""
    logs = write_public_logs(tmp_path)[:1]
    path = tmp_path / "eval.log"
    path.write_text(eval_log_text() + eval_log_text(corrected_bpb=1.2))
    result = run_cli("--logs", *logs, "--eval-logs", path, "--out", tmp_path / "record")
    assert_clean_failure(result, str(path), "holds 2 evaluations")


def test_a_log_holding_two_runs_is_refused(tmp_path):
    path = tmp_path / "run.log"
    one_run = "run run_id:test python:3.11.7\n" + train_log_text(1, 1.95, 1.155)
    path.write_text(one_run + one_run.replace("1.15500000", "1.25000000"))
    result = run_cli("--logs", path, "--out", tmp_path / "record")
    assert_clean_failure(result, str(path), "holds 2 runs")
