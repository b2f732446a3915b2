"""The submission folder: every BPB figure it states was printed by a run whose log is inside it."""

import json
import re
import statistics
from pathlib import Path

import log_format

RECORD = Path(__file__).resolve().parents[1] / "records" / "track_10min_16mb" / "2026-03-20_CorrectionTable_11L_MLP3x"
FIGURE = re.compile(r"(?<![\d.])\d\.\d{4,8}(?![\d])")
FIGURE_KEYS = ("val_loss", "val_bpb")


def figure_lines(log: Path):
    """(tag, key, value) of every val_loss and val_bpb a log's lines print (records/log_format.py reads them)."""
    for line in log_format.read_lines(log.read_text()):
        for key in FIGURE_KEYS:
            if key in line.fields:
                yield line.tag, key, float(line.fields[key])


def logged_figures() -> list[float]:
    """Every val_loss and val_bpb any log in the folder printed."""
    return [value for log in sorted((RECORD / "logs").glob("*.txt")) for _, _, value in figure_lines(log)]


def per_seed_statistics() -> list[float]:
    """Means and sample deviations over the seeds' logs of each figure they all print (train logs
    *_train.txt, evaluation logs *_eval.txt): the only figures a record may state that no single
    log printed."""
    stats = []
    for pattern in ("*_train.txt", "*_eval.txt"):
        groups: dict[tuple[str, str], list[float]] = {}
        for log in sorted((RECORD / "logs").glob(pattern)):
            last = {(tag, key): value for tag, key, value in figure_lines(log)}
            for k, v in last.items():
                groups.setdefault(k, []).append(v)
        for values in groups.values():
            stats.append(statistics.mean(values))
            if len(values) > 1:
                stats.append(statistics.stdev(values))
    return stats


def train_record_figures() -> list[float]:
    """Each training log's final roundtrip val_bpb: what the record's val_bpb is the mean of."""
    finals = []
    for log in sorted((RECORD / "logs").glob("*_train.txt")):
        finals.append(float(log_format.last_line(log.read_text(), "final_int8_zlib_roundtrip_exact").fields["val_bpb"]))
    return finals


def explained(value: str, logged: list[float], derived: list[float]) -> bool:
    decimals = len(value.split(".")[1])
    return any(abs(round(v, decimals) - float(value)) < 0.5 * 10**-decimals for v in logged + derived)


def bpb_values_in(obj, key_path=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from bpb_values_in(v, f"{key_path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from bpb_values_in(v, f"{key_path}[{i}]")
    elif isinstance(obj, float) and "bpb" in key_path:
        yield key_path, obj


def test_the_record_folder_has_its_logs():
    assert (RECORD / "README.md").is_file() and (RECORD / "submission.json").is_file()
    assert list((RECORD / "logs").glob("*train*.txt")) and list((RECORD / "logs").glob("*eval*.txt"))


def test_every_bpb_figure_in_the_readme_results_was_logged():
    readme = (RECORD / "README.md").read_text()
    results = readme.split("<!-- results:begin -->")[1].split("<!-- results:end -->")[0]
    logged, derived = logged_figures(), per_seed_statistics()
    figures = FIGURE.findall(results)
    assert figures, "the results section states no figure"
    unexplained = [f for f in figures if not explained(f, logged, derived)]
    assert not unexplained, f"figures in README.md that no log in {RECORD / 'logs'} printed: {unexplained}"


def test_every_bpb_figure_in_submission_json_was_logged():
    submission = json.loads((RECORD / "submission.json").read_text())
    logged, derived = logged_figures(), per_seed_statistics()
    values = list(bpb_values_in(submission))
    assert values
    for key, value in values:
        assert explained(f"{value:.8f}", logged, derived), f"submission.json{key} = {value} is in no log"
    assert abs(submission["val_bpb"] - statistics.mean(train_record_figures())) < 1e-8


def test_the_record_folder_carries_the_code_its_logs_ran():
    """make_record writes the scripts the logs carry; each hashes to what its logs say it ran."""
    import hashlib

    carried = {}
    for log in sorted((RECORD / "logs").glob("*.txt")):
        text = log.read_text()
        for name, source in log_format.code_blocks(text).items():  # each block checked against its sha256
            carried.setdefault(name, set()).add(hashlib.sha256(source.encode()).hexdigest())
        for line in log_format.read_lines(text):
            if line.tag == "run" and "code_sha256" in line.fields:
                carried.setdefault("train_gpt.py", set()).add(line.fields["code_sha256"])
    assert {"train_gpt.py", "eval_final.py", "correction_table.py"} <= set(carried)
    for name, digests in carried.items():
        assert len(digests) == 1, f"the logs ran {len(digests)} versions of {name}"
        assert hashlib.sha256((RECORD / name).read_bytes()).hexdigest() == digests.pop(), name


def test_the_picture_is_the_one_make_record_draws_from_the_folders_training_logs():
    """curves.svg is what records/make_record.py draws from this folder's training logs today (seed order, the
    submission's name as its title), and the folder's README shows it."""
    import make_record

    runs = [make_record.parse_train_log(log) for log in sorted((RECORD / "logs").glob("*_train.txt"))]
    name = json.loads((RECORD / "submission.json").read_text())["name"]
    assert (RECORD / make_record.PICTURE_NAME).read_text() == make_record.render_curves_svg(runs, name), \
        "regenerate the folder with records/make_record.py (its README's Commands)"
    assert f"]({make_record.PICTURE_NAME})" in (RECORD / "README.md").read_text()
