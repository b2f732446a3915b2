"""Turn training (and evaluation) logs into a record's submission.json and results table.

    python records/make_record.py --logs LOG [LOG ...] --out DIR [--eval-logs LOG ...]
        [--author A] [--github-id G] [--name N] [--blurb B] [--date YYYY-MM-DD]
        [--corpus C] [--baseline-loss X] [--baseline-bpb X]

Every figure in the outputs is read from the logs, so the README table cannot disagree with what
ran. The record figure is the `final_int8_zlib_roundtrip_exact` line (the name is historical: the
artifact is int6 + zstd); the community's log readers look for exactly that line. Figures from an
error-correction table are built from validation text, which the challenge rules forbid in a
record, so they are kept apart and labelled val-derived. The scripts the logs carry (train_gpt.py
from the training logs; eval_final.py and correction_table.py from the evaluation logs) are written
into the folder, each checked against the hash its log states.

The folder also gets curves.svg: validation BPB and training loss against step and against
training time, one colour a seed, drawn from the same logs by this script (no plotting library).

Sections: log parsing, statistics (Student t without scipy), summary, Markdown table, curves,
command line.
"""

import argparse
import datetime
import hashlib
import json
import math
import os
import re
import statistics
import sys
from xml.sax.saxutils import escape, quoteattr

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # log_format beside this file; train_gpt at the repository root
import log_format  # noqa: E402  (records/log_format.py: the grammar of every log line)

RECORD_LINE = "final_int8_zlib_roundtrip_exact"
MARGIN_NATS = 0.005  # a record must beat the best by this much, at p < 0.01
SIGNIFICANCE_LEVEL = 0.01
DEFAULT_NAME = "11L MLP3x + SmearGate + Error Correction Table"
VAL_DERIVED_NOTE = (
    "val-derived: the correction table is built from validation text, which the challenge rules "
    "forbid in a record; val_bpb above is the record figure, these are reported beside it"
)


class RecordError(Exception):
    """A problem with the inputs, reported as one line without a traceback."""


# ---------------------------------------------------------------------------------------------
# Log parsing
# records/log_format.py reads the lines (tag key:value ... # comment); a tag may stand after a
# prefix (a timestamp, a rank). The tables below say which figure each line gives.
# ---------------------------------------------------------------------------------------------

NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?")  # "3." is a number cut short
TRAIN_TAGS = ("run", "settings", "hardware", "train_step", "val_step", "stopping_early", "train_done", "prequant_exact",
              "artifact", "final_int6_zstd_roundtrip_exact", RECORD_LINE)
EVAL_TAGS = ("settings", "eval_base", "correction", "eval_corrected_valderived", "eval_two_part",
             "artifact_total", "eval_ttt", "ttt", "eval_causal", "eval_ttt_causal", "hints")
# Which figure each line gives ({tag: {key: figure}}): the last such line of a log. Times are logged
# in ms and kept in seconds; counts and bytes are whole numbers; select is a word.
TRAIN_FIGURES = {
    "prequant_exact": {"val_loss": "pre_quant_val_loss", "val_bpb": "pre_quant_val_bpb"},
    "final_int6_zstd_roundtrip_exact": {"val_loss": "int6_val_loss", "val_bpb": "int6_val_bpb",
                                        "eval_time": "eval_time_seconds"},
    # counted_code_bytes: the code of the evaluation the export was sized for (train_gpt.counted_code);
    # logs from before it was counted give train_gpt.py's own bytes (train_code_bytes) instead
    "artifact": {"model_bytes": "bytes_model", "train_code_bytes": "bytes_train_code",
                 "counted_code_bytes": "bytes_code", "total_bytes": "bytes_total", "cap_bytes": "bytes_cap",
                 "artifact_sha256": "artifact_sha256"},
}
EVAL_FIGURES = {
    "eval_base": {"eval_time": "base_eval_time_seconds", "stride": "stride"},
    "correction": {"entries": "entries", "table_bytes": "table_bytes", "bytes_per_entry": "bytes_per_entry",
                   "format": "format", "select": "select", "boost": "boost"},
    "eval_corrected_valderived": {"val_loss": "corrected_val_loss_valderived",
                                  "val_bpb": "corrected_val_bpb_valderived"},
    "eval_two_part": {"val_bpb": "two_part_val_bpb"},
    "artifact_total": {"total_bytes": "artifact_total_bytes", "hint_bytes": "hint_bytes"},
    # the legal eval-time methods (score-first TTT, causal hints)
    "eval_ttt": {"val_loss": "ttt_val_loss", "val_bpb": "ttt_val_bpb", "eval_time": "ttt_eval_time_seconds"},
    "ttt": {"mode": "ttt_mode", "chunks": "ttt_chunks", "chunk_tokens": "ttt_chunk_tokens", "epochs": "ttt_epochs",
            "steps": "ttt_steps", "lr": "ttt_lr", "budget": "ttt_budget"},
    "eval_causal": {"val_loss": "causal_val_loss", "val_bpb": "causal_val_bpb"},
    "eval_ttt_causal": {"val_loss": "ttt_causal_val_loss", "val_bpb": "ttt_causal_val_bpb"},
    "hints": {"orders": "hint_orders"},
}
WHOLE_NUMBERS = ("stride", "entries", "format", "table_bytes", "artifact_total_bytes", "bytes_model", "bytes_code",
                 "bytes_train_code",
                 "bytes_total", "bytes_cap", "hint_bytes", "ttt_chunks", "ttt_chunk_tokens", "ttt_epochs", "ttt_steps")
WORDS = ("select", "ttt_mode", "ttt_budget", "hint_orders", "artifact_sha256")
LEGAL_FIGURES = ("ttt_val_bpb", "causal_val_bpb", "ttt_causal_val_bpb")  # a record may claim these


class _Line:
    """One tagged log line of a file: its fields, read as figures with errors that name the place."""

    def __init__(self, path, line):
        self.path, self.line_number, self.fields = path, line.line_number, line.fields
        self.text = " ".join(f"{k}:{v}" for k, v in line.fields.items())

    def number(self, key, unit=""):
        """The value of `key` as a finite float, with an optional unit suffix such as "ms"."""
        if key not in self.fields:
            raise RecordError(f"{self.path}: malformed: line {self.line_number} has no "
                              f"'{key}:' value ({self.text!r})")
        raw = self.fields[key]
        digits = raw[:-len(unit)] if unit and raw.endswith(unit) else raw
        if not NUMBER.fullmatch(digits) or not math.isfinite(float(digits)):
            expected = f"a number of {unit}" if unit else "a number"
            raise RecordError(f"{self.path}: malformed: line {self.line_number}: "
                              f"{key}:{raw} is not {expected}")
        return float(digits)

    def integer(self, key, unit=""):
        value = self.number(key, unit)
        if value != int(value):
            raise RecordError(f"{self.path}: malformed: line {self.line_number}: "
                              f"{key}:{self.fields[key]} is not a whole number")
        return int(value)

    def figure(self, key, name):
        if name in WORDS:
            return self.fields[key]
        if name.endswith("_seconds"):
            return self.number(key, "ms") / 1000.0
        return self.integer(key) if name in WHOLE_NUMBERS else self.number(key)


def _read_text(path):
    try:
        with open(path, encoding="utf-8", errors="replace", newline="") as handle:  # a \r in carried code survives
            text = handle.read()
    except FileNotFoundError:
        raise RecordError(f"{path}: no such file; check the path (a log written by train_gpt.py or eval_final.py)") from None
    except OSError as error:
        raise RecordError(f"{path}: cannot read: {error.strerror}") from None
    # Our scripts end every line with a newline: a log without one was cut mid-line, and its last
    # figure may be cut short too ("val_bpb:3.04" of "val_bpb:3.0495..."), so none of it is read.
    if text and not text.endswith("\n"):
        lines = text.splitlines()
        raise RecordError(f"{path}: incomplete: the log ends mid-line at line {len(lines)} "
                          f"({lines[-1][-40:]!r}); use the whole log of a finished run")
    return text


def _scan(path, tags):
    """A log's lines grouped by tag: {tag: [_Line, ...]}, and the log's text."""
    text = _read_text(path)
    try:
        lines = log_format.read_lines(text, tags)
    except log_format.LogFormatError as error:
        raise RecordError(f"{path}: malformed: {error}") from None
    tagged = {tag: [] for tag in tags}
    for line in lines:
        if line.tag in tagged:
            tagged[line.tag].append(_Line(path, line))
    return tagged, text


def _last(tagged, tag):
    return tagged[tag][-1] if tagged[tag] else None


def _required(path, tagged, tag, why_missing):
    line = _last(tagged, tag)
    if line is None:
        raise RecordError(f"{path}: incomplete: no {tag} line ({why_missing})")
    return line


def _identity(path, tagged, seed_required):
    return {"log_file": os.path.basename(path), "seed": _seed(path, tagged, required=seed_required)}


def _fill_figures(result, tagged, figures):
    for tag, names in figures.items():
        line = _last(tagged, tag)
        for key, name in names.items():
            result[name] = line.figure(key, name) if line is not None and key in line.fields else None


def _settings(tagged):
    merged = {}
    for line in tagged["settings"]:
        merged.update(line.fields)
    return merged


def _seed(path, tagged, required):
    carrier = next((line for line in reversed(tagged["settings"]) if "seed" in line.fields), None)
    if carrier is None:
        if required:
            raise RecordError(f"{path}: malformed: no seed: value on a settings line")
        return None
    return carrier.integer("seed")


def _hardware(line):
    if line is None:
        return None
    return {
        "device": line.fields.get("device"),
        "name": line.fields.get("name"),
        "world_size": line.integer("world_size") if "world_size" in line.fields else None,
    }


def _code(path, text):
    """{file name: source} that the log carries, each checked against its hash."""
    try:
        return log_format.code_blocks(text)
    except log_format.LogFormatError as error:
        raise RecordError(f"{path}: malformed: {error}") from None


def parse_train_log(path):
    """Read one training log (one seed) into a flat dict of its figures.

    Only the seed and the record line are required; figures a log lacks are None.
    step_stop and wallclock_seconds come from the train_done line train_gpt.py writes when
    training ends, else from the stopping_early line, else from the last step line logged.
    """
    path = str(path)
    tagged, text = _scan(path, TRAIN_TAGS)
    runs = len([line for line in tagged["run"] if "run_id" in line.fields])
    if runs > 1:
        raise RecordError(f"{path}: holds {runs} runs (a RUN_ID used twice appends to one log); "
                          "split it, one log per run")
    record = _required(path, tagged, RECORD_LINE, "the run stopped before its final line")
    run = {
        **_identity(path, tagged, seed_required=True),
        "settings": _settings(tagged),
        "hardware": _hardware(_last(tagged, "hardware")),
        "val_loss": record.number("val_loss"),
        "val_bpb": record.number("val_bpb"),
        "stopped_early": None, "step_stop": None, "wallclock_seconds": None,
    }
    _fill_figures(run, tagged, TRAIN_FIGURES)
    if run["bytes_code"] is None:
        run["bytes_code"] = run["bytes_train_code"]
    del run["bytes_train_code"]
    steps = [line for line in (_last(tagged, "train_step"), _last(tagged, "val_step")) if line is not None]
    last_step = max(steps, key=lambda line: line.line_number) if steps else None
    for line in (last_step, _last(tagged, "stopping_early"), _last(tagged, "train_done")):
        if line is None:  # each kind of line says it better than the one before: train_done best
            continue
        if "steps" in line.fields:
            run["step_stop"] = line.integer("steps")
        elif "step" in line.fields:
            run["step_stop"] = _step_reached(line)
        if "train_time" in line.fields:
            run["wallclock_seconds"] = line.number("train_time", "ms") / 1000.0
    stop = _last(tagged, "stopping_early")
    if stop is not None:
        run["stopped_early"] = stop.fields.get("reason", "unspecified")
    run["curve"] = _curve(tagged, run)
    run["code"] = _code(path, text)
    announced = _last(tagged, "run")
    if "train_gpt.py" in run["code"] and announced is not None and "code_sha256" in announced.fields:
        if _sha256(run["code"]["train_gpt.py"]) != announced.fields["code_sha256"]:
            raise RecordError(f"{path}: the train_gpt.py it carries does not hash to the code_sha256 of its run line")
    return run


def _curve(tagged, run):
    """The points a training log gives for its picture: (step, training seconds, figure) of every train_step
    line's train_loss and every val_step line's val_bpb, and at the run's end the pre-quantization and the
    int6 + zstd roundtrip val_bpb (at the final step and time, where the log says them)."""
    def points(tag, key):
        return [(_step_reached(line), line.number("train_time", "ms") / 1000.0, line.number(key))
                for line in tagged[tag] if key in line.fields and "train_time" in line.fields]
    end = (run["step_stop"], run["wallclock_seconds"])
    finals = {}
    if None not in end:
        for kind, tag in (("prequant", "prequant_exact"), ("roundtrip", RECORD_LINE)):
            line = _last(tagged, tag)
            if line is not None and "val_bpb" in line.fields:
                finals[kind] = (*end, line.number("val_bpb"))
    return {"train_loss": points("train_step", "train_loss"), "val_bpb": points("val_step", "val_bpb"),
            **finals}


def _step_reached(line):
    """step:120/20000 -> 120"""
    reached, _, _ = line.fields["step"].partition("/")
    if not reached.isdigit():
        raise RecordError(f"{line.path}: malformed: line {line.line_number}: step:{line.fields['step']} "
                          "is not a step count")
    return int(reached)


def _sha256(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def parse_eval_log(path):
    """Read one evaluation log (eval_final.py) into a flat dict; only eval_base is required."""
    path = str(path)
    tagged, text = _scan(path, EVAL_TAGS)
    if len(tagged["eval_base"]) > 1:  # eval_final.py appends to logs/eval_<checkpoint>.txt
        raise RecordError(f"{path}: holds {len(tagged['eval_base'])} evaluations (eval_final.py appends to one log "
                          "per checkpoint); give the log of one evaluation, or delete the log before evaluating")
    base = _required(path, tagged, "eval_base", "the evaluation stopped before scoring")
    skipped = "skipped" in base.fields  # EVAL_MAX_SECONDS dropped the base pass: TTT's pass scored every position
    evaluation = {
        **_identity(path, tagged, seed_required=False),
        "base_val_loss": None if skipped else base.number("val_loss"),
        "base_val_bpb": None if skipped else base.number("val_bpb"),
    }
    _fill_figures(evaluation, tagged, EVAL_FIGURES)
    evaluation["code"] = _code(path, text)
    return evaluation


def record_scripts(runs, evaluations):
    """{file name: source} of the code the logs ran; every log that carries a file must carry the same."""
    scripts, first_seen = {}, {}
    for item in list(runs) + list(evaluations or []):
        for name, source in item["code"].items():
            if name in scripts and scripts[name] != source:
                raise RecordError(f"{first_seen[name]} and {item['log_file']} ran different {name}: a record's "
                                  "runs must all use one version of the code")
            if os.path.basename(name) != name or not name.endswith(".py") or name.startswith("."):
                raise RecordError(f"{item['log_file']} carries code named {name!r}: only a script's own name "
                                  "(no folder) can be written into the record folder")
            scripts.setdefault(name, source)
            first_seen.setdefault(name, item["log_file"])
    return scripts


def match_eval_logs(runs, evaluations):
    """Pair evaluations with runs: by seed when every eval log names one, else in order."""
    if len(evaluations) != len(runs):
        raise RecordError(f"{len(evaluations)} eval logs for {len(runs)} training logs: "
                          f"give one eval log per training log, in the same order")
    if not all(evaluation["seed"] is not None for evaluation in evaluations):
        return list(evaluations)
    by_seed = {evaluation["seed"]: evaluation for evaluation in evaluations}
    missing = [run["seed"] for run in runs if run["seed"] not in by_seed]
    if missing:
        raise RecordError(f"no eval log for seed {missing[0]} (eval logs name seeds "
                          f"{sorted(by_seed)})")
    return [by_seed[run["seed"]] for run in runs]


# ---------------------------------------------------------------------------------------------
# Statistics
# The record rule is a one-sided test at p < 0.01. The Student t CDF comes from the regularized
# incomplete beta function, evaluated by its continued fraction (modified Lentz), as in
# Numerical Recipes §6.4; the project does not depend on scipy.
# ---------------------------------------------------------------------------------------------

def _beta_continued_fraction(x, a, b, max_iterations=100_000, tolerance=1e-15):
    tiny = 1e-300  # stands in for a zero denominator, as Lentz's method prescribes
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, max_iterations + 1):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            factor = c * d
            fraction *= factor
        if abs(factor - 1.0) < tolerance:
            return fraction
    raise ArithmeticError(f"incomplete beta did not converge for x={x}, a={a}, b={b}")


def regularized_incomplete_beta(x, a, b):
    """I_x(a, b) for 0 <= x <= 1 and a, b > 0."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x must lie in [0, 1], got {x}")
    if x == 0.0 or x == 1.0:
        return x
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    # The continued fraction converges fast only below this point; use the symmetry above it.
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(x, a, b) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(1.0 - x, b, a) / b


def student_t_sf(t, df):
    """P(T >= t) for Student's t with df degrees of freedom (the one-sided p-value)."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    two_tail_half = 0.5 * regularized_incomplete_beta(df / (df + t * t), df / 2.0, 0.5)
    return two_tail_half if t >= 0 else 1.0 - two_tail_half


def one_sided_t_test_below(samples, threshold):
    """Test that the mean of `samples` lies below `threshold`: returns (t, df, p_value).

    t = (threshold - mean) / (s / sqrt(n)); a large t (small p) supports mean < threshold.
    With zero spread t is infinite and reported as None, and p is 0 or 1.
    """
    if len(samples) < 2:
        raise ValueError("a t-test needs at least 2 samples")
    count = len(samples)
    spread = statistics.stdev(samples)
    distance = threshold - statistics.fmean(samples)
    if spread == 0.0:
        return None, count - 1, 0.0 if distance > 0 else 1.0
    t = distance / (spread / math.sqrt(count))
    return t, count - 1, student_t_sf(t, count - 1)


# ---------------------------------------------------------------------------------------------
# Summary
# Means over seeds for the scores; maxima for bytes and times, since every run must fit the caps.
# A figure some seed lacks is reported as None rather than as the mean of the others.
# ---------------------------------------------------------------------------------------------

def _rounded(value, places=8):
    return None if value is None else round(value, places)


def _mean_of(rows, key):
    values = [row[key] for row in rows]
    return None if any(v is None for v in values) else statistics.fmean(values)


def _stdev_of(rows, key):
    values = [row[key] for row in rows]
    return None if len(values) < 2 or any(v is None for v in values) else statistics.stdev(values)


def _max_of(rows, key):
    values = [row[key] for row in rows]
    return None if any(v is None for v in values) else max(values)


def _common_hardware(runs):
    distinct = []
    for run in runs:
        if run["hardware"] is not None and run["hardware"] not in distinct:
            distinct.append(run["hardware"])
    if not distinct:
        return None
    return distinct[0] if len(distinct) == 1 else distinct


def _significance(runs, mean_loss, mean_bpb, baseline_loss, baseline_bpb):
    if baseline_loss is None and baseline_bpb is None:
        return None
    if len(runs) < 2:
        return {"skipped": "a t-test needs at least 2 seeds"}
    if baseline_loss is not None:
        source = "given as --baseline-loss"
    else:
        loss_per_bpb = mean_loss / mean_bpb
        baseline_loss = baseline_bpb * loss_per_bpb
        source = (f"converted from --baseline-bpb {baseline_bpb} by the mean val_loss/val_bpb "
                  f"ratio of these runs ({loss_per_bpb:.8f} nats per bit-per-byte)")
    threshold = baseline_loss - MARGIN_NATS
    t, df, p_value = one_sided_t_test_below([run["val_loss"] for run in runs], threshold)
    return {
        "test": "one-sided one-sample t-test that mean val_loss < baseline_loss - margin_nats",
        "baseline_loss": _rounded(baseline_loss),
        "baseline_bpb": baseline_bpb,
        "baseline_loss_source": source,
        "margin_nats": MARGIN_NATS,
        "threshold_loss": _rounded(threshold),
        "t": t,
        "df": df,
        "p_value": p_value,
        "significant_at_0_01": p_value < SIGNIFICANCE_LEVEL,
    }


def _correction_block(runs, evaluations):
    per_seed = []
    for run, evaluation in zip(runs, evaluations):
        row = {key: evaluation[key] for key in (
            "base_val_loss", "base_val_bpb", "base_eval_time_seconds", "stride",
            "entries", "table_bytes", "bytes_per_entry", "format", "select", "boost",
            "corrected_val_loss_valderived", "corrected_val_bpb_valderived",
            "two_part_val_bpb", "artifact_total_bytes")}
        per_seed.append({"seed": run["seed"], "eval_log_file": evaluation["log_file"], **row})
    means = {key: _rounded(_mean_of(per_seed, key)) for key in (
        "base_val_bpb", "corrected_val_bpb_valderived", "two_part_val_bpb",
        "entries", "table_bytes", "bytes_per_entry")}
    return {
        "note": VAL_DERIVED_NOTE,
        "mean": means,
        "artifact_total_bytes_max": _max_of(per_seed, "artifact_total_bytes"),
        "per_seed": per_seed,
    }


def _legal_block(runs, evaluations):
    """The legal eval-time methods' scores: each position scored before anything learned from it."""
    per_seed = []
    for run, evaluation in zip(runs, evaluations):
        row = {key: evaluation[key] for key in (
            "base_val_bpb", "base_eval_time_seconds", "ttt_val_bpb", "ttt_eval_time_seconds", "ttt_mode",
            "ttt_chunks", "ttt_chunk_tokens", "ttt_epochs", "ttt_steps", "ttt_lr", "ttt_budget", "causal_val_bpb",
            "ttt_causal_val_bpb", "hint_orders", "hint_bytes", "artifact_total_bytes")}
        per_seed.append({"seed": run["seed"], "eval_log_file": evaluation["log_file"], **row})
    return {
        "note": "legal: score-first; TTT trains on each chunk only after scoring it, and each causal hint comes "
                "from text before its position, with knobs chosen on training text",
        "mean": {key: _rounded(_mean_of(per_seed, key)) for key in ("base_val_bpb", *LEGAL_FIGURES)},
        "artifact_total_bytes_max": _max_of(per_seed, "artifact_total_bytes"),
        "per_seed": per_seed,
    }


def summarize(runs, evaluations=None, *, author="unknown", github_id="", name=DEFAULT_NAME,
              blurb=None, date=None, corpus="unspecified", baseline_loss=None, baseline_bpb=None):
    """Build the submission.json dict from parsed training runs (and their evaluations).

    step_stop is the mean over seeds rounded to a whole step (each seed's own is in
    seed_results); wallclock_seconds, eval_time_seconds and the bytes are maxima over seeds.
    """
    if not runs:
        raise RecordError("no training logs given")
    seen = {}
    for run in runs:
        if run["seed"] in seen:
            raise RecordError(f"seed {run['seed']} appears in both {seen[run['seed']]} and "
                              f"{run['log_file']}: give one log per seed")
        seen[run["seed"]] = run["log_file"]
    artifacts = {}
    for run in runs:  # two seeds whose logs report one artifact: one run's figures under two names
        digest = run.get("artifact_sha256")
        if digest is not None and digest in artifacts:
            raise RecordError(f"{artifacts[digest]} and {run['log_file']} report the same artifact (sha256 "
                              f"{str(digest)[:16]}): one run's figures under two seeds; retrain one seed into an "
                              "OUTPUT_DIR of its own")
        artifacts[digest] = run["log_file"]

    mean_loss, mean_bpb = _mean_of(runs, "val_loss"), _mean_of(runs, "val_bpb")
    bpb_std = _stdev_of(runs, "val_bpb")
    mean_step = _mean_of(runs, "step_stop")
    if blurb is None:
        spread = f" ± {bpb_std:.5f}" if bpb_std is not None else ""
        blurb = (f"{len(runs)} seed{'s' if len(runs) > 1 else ''}: val_bpb {mean_bpb:.5f}{spread} "
                 f"after the int6 + zstd roundtrip.")
    summary = {
        "author": author,
        "github_id": github_id,
        "name": name,
        "blurb": blurb,
        "date": date or datetime.date.today().isoformat(),
        "val_loss": _rounded(mean_loss),
        "val_bpb": _rounded(mean_bpb),
        "val_loss_std": _rounded(_stdev_of(runs, "val_loss")),
        "val_bpb_std": _rounded(bpb_std),
        "seeds": [run["seed"] for run in runs],
        "seed_results": [
            {"seed": run["seed"], "val_loss": run["val_loss"], "val_bpb": run["val_bpb"],
             "step_stop": run["step_stop"], "wallclock_seconds": run["wallclock_seconds"],
             "log_file": run["log_file"]}
            for run in runs],
        "pre_quant_val_loss": _rounded(_mean_of(runs, "pre_quant_val_loss")),
        "pre_quant_val_bpb": _rounded(_mean_of(runs, "pre_quant_val_bpb")),
        "step_stop": None if mean_step is None else round(mean_step),
        "wallclock_seconds": _max_of(runs, "wallclock_seconds"),
        "eval_time_seconds": _max_of(runs, "eval_time_seconds"),
        "bytes_total": _max_of(runs, "bytes_total"),
        "bytes_model_int6_zstd": _max_of(runs, "bytes_model"),
        "bytes_code": _max_of(runs, "bytes_code"),
        "bytes_cap": _max_of(runs, "bytes_cap"),
        "hardware": _common_hardware(runs),
        "corpus": corpus,
    }
    significance = _significance(runs, mean_loss, mean_bpb, baseline_loss, baseline_bpb)
    if significance is not None:
        summary["significance"] = significance
    if evaluations:
        summary["correction"] = _correction_block(runs, evaluations)
        if any(evaluation[key] is not None for evaluation in evaluations for key in LEGAL_FIGURES):
            summary["legal_eval"] = _legal_block(runs, evaluations)
    return summary


# ---------------------------------------------------------------------------------------------
# Markdown table
# The README's results section, produced from the summary so it always matches submission.json.
# ---------------------------------------------------------------------------------------------

def _cell(value, form="{:.8f}"):
    if value is None:
        return "—"
    return form.format(value)


def _with_spread(mean, spread):
    return _cell(mean) + ("" if spread is None else f" ± {spread:.8f}")


def _hardware_text(hardware):
    if hardware is None:
        return "hardware not logged"
    if isinstance(hardware, list):
        return "mixed hardware: " + "; ".join(_hardware_text(h) for h in hardware)
    count = f"{hardware['world_size']}× " if hardware.get("world_size") else ""
    return f"{count}{hardware.get('name') or hardware.get('device') or 'unknown device'}"


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + " ---: |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def render_results_markdown(summary):
    runs = summary["seed_results"]
    count = len(runs)
    lines = [
        "## Results",
        "",
        f"{_hardware_text(summary['hardware'])} · corpus {summary['corpus']} · "
        f"{count} seed{'s' if count > 1 else ''}. val_loss in nats per token; val_bpb from "
        f"the `{RECORD_LINE}` line (int6 + zstd artifact).",
        "",
    ]
    rows = [[str(run["seed"]), _cell(run["step_stop"], "{:d}"),
             _cell(run["wallclock_seconds"], "{:.1f}"), _cell(run["val_loss"]),
             _cell(run["val_bpb"]), run["log_file"]] for run in runs]
    rows.append(["mean" + (" ± std" if count > 1 else ""), _cell(summary["step_stop"], "{:d}"),
                 _cell(summary["wallclock_seconds"], "max {:.1f}"),
                 _with_spread(summary["val_loss"], summary["val_loss_std"]),
                 _with_spread(summary["val_bpb"], summary["val_bpb_std"]), ""])
    lines += _table(["seed", "steps", "train time (s)", "val_loss", "val_bpb", "log"], rows)
    lines += [
        "",
        f"- pre-quantization val_bpb (mean): {_cell(summary['pre_quant_val_bpb'])}",
        f"- artifact (max over seeds): {_cell(summary['bytes_total'], '{:,}')} bytes = model "
        f"{_cell(summary['bytes_model_int6_zstd'], '{:,}')} + code "
        f"{_cell(summary['bytes_code'], '{:,}')}; cap {_cell(summary['bytes_cap'], '{:,}')}",
        f"- evaluation time (max over seeds): {_cell(summary['eval_time_seconds'], '{:.1f}')} s",
    ]
    significance = summary.get("significance")
    if significance is not None and "skipped" in significance:
        lines.append(f"- significance: not tested ({significance['skipped']})")
    elif significance is not None:
        verdict = "passes" if significance["significant_at_0_01"] else "does not pass"
        t_text = "∞" if significance["t"] is None else f"{significance['t']:.3f}"
        lines.append(
            f"- one-sided t-test of mean val_loss < {significance['baseline_loss']:.8f} − "
            f"{MARGIN_NATS} nats (baseline {significance['baseline_loss_source']}): "
            f"t = {t_text}, df = {significance['df']}, p = {significance['p_value']:.3g} — "
            f"{verdict} p < {SIGNIFICANCE_LEVEL}")
    correction = summary.get("correction")
    if correction is not None:
        lines += ["", "### Error-correction table (val-derived, not a record figure)", "",
                  f"{VAL_DERIVED_NOTE}.", ""]
        rows = [[str(row["seed"]), _cell(row["base_val_bpb"]),
                 _cell(row["corrected_val_bpb_valderived"]), _cell(row["two_part_val_bpb"]),
                 _cell(row["entries"], "{:,}"), _cell(row["table_bytes"], "{:,}"),
                 _cell(row["bytes_per_entry"], "{:.3f}"),
                 _cell(row["artifact_total_bytes"], "{:,}")]
                for row in correction["per_seed"]]
        mean = correction["mean"]
        rows.append(["mean", _cell(mean["base_val_bpb"]),
                     _cell(mean["corrected_val_bpb_valderived"]), _cell(mean["two_part_val_bpb"]),
                     _cell(mean["entries"], "{:,.0f}"), _cell(mean["table_bytes"], "{:,.0f}"),
                     _cell(mean["bytes_per_entry"], "{:.3f}"),
                     _cell(correction["artifact_total_bytes_max"], "max {:,}")])
        lines += _table(["seed", "base val_bpb", "corrected val_bpb (val-derived)",
                         "two-part val_bpb", "entries", "table bytes", "bytes/entry",
                         "total bytes with table"], rows)
    legal = summary.get("legal_eval")
    if legal is not None:
        lines += ["", "### Legal eval-time methods", "", f"Each figure is {legal['note']}.", ""]
        rows = [[str(row["seed"]), _cell(row["base_val_bpb"]), _cell(row["ttt_val_bpb"]), _cell(row["causal_val_bpb"]),
                 _cell(row["ttt_causal_val_bpb"]), _cell(row["artifact_total_bytes"], "{:,}")]
                for row in legal["per_seed"]]
        mean = legal["mean"]
        rows.append(["mean", *(_cell(mean[key]) for key in ("base_val_bpb", *LEGAL_FIGURES)),
                     _cell(legal["artifact_total_bytes_max"], "max {:,}")])
        lines += _table(["seed", "base val_bpb", "score-first TTT", "causal hints", "TTT + causal hints",
                         "total bytes"], rows)
    lines += ["", f"Curves of every seed (validation BPB and training loss against step and training time, "
                  f"from the same logs): [{PICTURE_NAME}]({PICTURE_NAME})"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Curves
# One SVG of four panels: validation BPB (top) and training loss (bottom) against step (left) and
# against training time (right), one colour a seed. Written as text here, so a record needs no
# plotting library; every point carries its figures (data-* attributes) so a test can read them back.
# ---------------------------------------------------------------------------------------------

PICTURE_NAME = "curves.svg"
SEED_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
PANEL_WIDTH, PANEL_HEIGHT = 420, 230  # the plotting area of one panel, in SVG units
MARGIN_LEFT, MARGIN_TOP, GAP_X, GAP_Y = 70, 60, 90, 95
AXES = {"step": (0, "step"), "seconds": (1, "training time (s)")}  # x: index into a point, label
FIGURES = {"val_bpb": "validation BPB", "train_loss": "training loss (nats per token)"}


def nice_ticks(low, high, count=5):
    """Round tick values covering [low, high]: steps of 1, 2 or 5 times a power of ten."""
    low, high = min(low, high), max(low, high)
    if high == low:  # one value (a single point): a unit around it
        low, high = low - 0.5, high + 0.5
    raw = (high - low) / count
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(low / step) * step
    ticks = [first]
    while ticks[-1] < high - 1e-9 * step:
        ticks.append(ticks[-1] + step)
    return [round(tick, 12) for tick in ticks]


def _tick_text(value):
    return f"{value:,.0f}" if float(value).is_integer() and abs(value) >= 1 else f"{value:g}"


def _points_of(run, figure):
    """[(kind, step, seconds, value)] of one run's figure: the logged curve, then its end points."""
    curve = run["curve"]
    points = [("train" if figure == "train_loss" else "val", *p) for p in curve[figure]]
    if figure == "val_bpb":
        points += [(kind, *curve[kind]) for kind in ("prequant", "roundtrip") if kind in curve]
    return points


def _panel(origin, figure, axis, runs):
    """SVG elements of one panel: frame, ticks, labels, each seed's line and points."""
    left, top = origin
    index, x_label = AXES[axis]
    series = [(run, _points_of(run, figure)) for run in runs]
    everything = [p for _, points in series for p in points]
    parts = [f'<rect x="{left}" y="{top}" width="{PANEL_WIDTH}" height="{PANEL_HEIGHT}" fill="none" stroke="#888"/>',
             f'<text x="{left + PANEL_WIDTH / 2}" y="{top - 10}" text-anchor="middle" font-weight="bold">'
             f'{escape(FIGURES[figure])} against {escape(x_label)}</text>',
             f'<text x="{left + PANEL_WIDTH / 2}" y="{top + PANEL_HEIGHT + 38}" text-anchor="middle">'
             f'{escape(x_label)}</text>']
    if not everything:
        parts.append(f'<text x="{left + PANEL_WIDTH / 2}" y="{top + PANEL_HEIGHT / 2}" text-anchor="middle" '
                     f'fill="#888">no points in the logs</text>')
        return parts
    if figure == "val_bpb" and not any(kind == "val" for kind, *_ in everything):
        parts.append(f'<text x="{left + PANEL_WIDTH / 2}" y="{top + PANEL_HEIGHT + 56}" text-anchor="middle" '
                     'fill="#888">the end points only: no val_step lines (VAL_LOSS_EVERY=0)</text>')
    xs = nice_ticks(0.0, max(p[1 + index] for p in everything))
    ys = nice_ticks(min(p[3] for p in everything), max(p[3] for p in everything))

    def place(x, y):
        return (left + (x - xs[0]) / (xs[-1] - xs[0]) * PANEL_WIDTH,
                top + PANEL_HEIGHT - (y - ys[0]) / (ys[-1] - ys[0]) * PANEL_HEIGHT)

    for tick in xs:
        px = place(tick, ys[0])[0]
        parts.append(f'<line x1="{px:.1f}" y1="{top + PANEL_HEIGHT}" x2="{px:.1f}" y2="{top + PANEL_HEIGHT + 5}" '
                     f'stroke="#888"/><text x="{px:.1f}" y="{top + PANEL_HEIGHT + 18}" text-anchor="middle">'
                     f'{_tick_text(tick)}</text>')
    for tick in ys:
        py = place(xs[0], tick)[1]
        parts.append(f'<line x1="{left}" y1="{py:.1f}" x2="{left + PANEL_WIDTH}" y2="{py:.1f}" stroke="#eee"/>'
                     f'<text x="{left - 6}" y="{py + 4:.1f}" text-anchor="end">{_tick_text(tick)}</text>')
    for number, (run, points) in enumerate(series):
        colour = SEED_COLOURS[number % len(SEED_COLOURS)]
        drawn = [(kind, place(p[index], value), p, value) for kind, *p, value in points]
        line = [xy for kind, xy, _, _ in drawn if kind in ("train", "val", "prequant")]
        if len(line) > 1:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in line)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        for kind, (x, y), (step, seconds), value in drawn:
            ring = kind == "roundtrip"  # after the int6 + zstd roundtrip: a ring, not a dot
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{4 if ring else 2.5}" '
                         f'fill="{"white" if ring else colour}" stroke="{colour}" '
                         f'data-seed={quoteattr(str(run["seed"]))} data-figure="{figure}" data-kind="{kind}" '
                         f'data-step="{step}" data-seconds="{seconds:g}" data-value="{value!r}"/>')
    return parts


def render_curves_svg(runs, title):
    """The record's picture (an SVG document as text) from parsed training runs."""
    width = MARGIN_LEFT + 2 * PANEL_WIDTH + GAP_X + 30
    height = MARGIN_TOP + 2 * PANEL_HEIGHT + GAP_Y + 90
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<text x="{width / 2}" y="24" text-anchor="middle" font-size="15">{escape(title)}</text>']
    for row, figure in enumerate(FIGURES):
        for column, axis in enumerate(AXES):
            origin = (MARGIN_LEFT + column * (PANEL_WIDTH + GAP_X), MARGIN_TOP + row * (PANEL_HEIGHT + GAP_Y))
            parts += _panel(origin, figure, axis, runs)
    legend_y = height - 30
    for number, run in enumerate(runs):
        colour = SEED_COLOURS[number % len(SEED_COLOURS)]
        x = MARGIN_LEFT + number * 110
        parts.append(f'<circle cx="{x}" cy="{legend_y - 4}" r="4" fill="{colour}"/>'
                     f'<text x="{x + 8}" y="{legend_y}">seed {escape(str(run["seed"]))}</text>')
    parts.append(f'<text x="{MARGIN_LEFT}" y="{legend_y + 20}" fill="#444">dots: during training, and before '
                 'quantization at the end; ring: after the int6 + zstd roundtrip (sliding windows)</text>')
    return "\n".join(parts + ["</svg>"]) + "\n"


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def write_atomically(path, text):
    """train_gpt's writer (a temporary file renamed into place): readers never see half a file. Imported
    here, so torch (which train_gpt needs) loads only when a record is written."""
    from train_gpt import atomic_write_bytes
    atomic_write_bytes(path, text.encode("utf-8"))


def imported_scripts(scripts):
    """The file names of the modules the scripts import (at any indentation: some imports are lazy)."""
    return {f"{module}.py" for source in scripts.values()
            for module in re.findall(r"^[ \t]*(?:from|import)[ \t]+(\w+)", source, re.MULTILINE)}


def code_bundle(scripts):
    """(name, text) of the self-extracting script holding the largest evaluation whose scripts the logs
    carry (train_gpt.EVALUATION_CODE), as train_gpt.code_bundle writes it; None if they carry none. A
    script of today's list that the logged code never imports (a room made after those runs, such as
    token_data.py) was no part of that evaluation: the bundle is the code that ran, as the export counted it."""
    import train_gpt
    imported = imported_scripts(scripts)
    for names in sorted(train_gpt.EVALUATION_CODE.values(), key=len, reverse=True):
        needed = [name for name in names if name in scripts or name in imported]
        if all(name in scripts for name in needed) and {"train_gpt.py", "eval_final.py"} <= set(needed):
            blob = train_gpt.code_bundle({name: scripts[name].encode("utf-8") for name in needed})
            return train_gpt.BUNDLE_NAME, blob.decode("ascii")
    return None


def build_parser():
    parser = argparse.ArgumentParser(
        prog="make_record",
        description="Write submission.json, results.md and curves.svg from training and evaluation logs.")
    parser.add_argument("--logs", nargs="+", required=True, help="training logs, one per seed")
    parser.add_argument("--eval-logs", nargs="+", default=None,
                        help="eval_final.py logs, one per training log (same order, or by seed)")
    parser.add_argument("--code-logs", nargs="+", default=None,
                        help="more logs whose code joins the record's scripts, e.g. the legal evaluation's "
                             "(USE_TTT=1 with the causal hints): the bundle then holds that evaluation's scripts")
    parser.add_argument("--out", required=True, help="folder for submission.json and results.md")
    parser.add_argument("--author", default="unknown")
    parser.add_argument("--github-id", default="")
    parser.add_argument("--name", default=DEFAULT_NAME)
    parser.add_argument("--blurb", default=None, help="default: a sentence built from the figures")
    parser.add_argument("--date", default=None, help="default: today, YYYY-MM-DD")
    parser.add_argument("--corpus", default="unspecified",
                        help='the data the runs used, e.g. "fineweb10B_sp1024" or "builtin"')
    parser.add_argument("--baseline-loss", type=float, default=None,
                        help="val_loss (nats) of the record to beat by 0.005 nats")
    parser.add_argument("--baseline-bpb", type=float, default=None,
                        help="val_bpb of the record to beat (converted to nats if no loss given)")
    return parser


def main(argv=None):
    options = build_parser().parse_args(argv)
    try:
        runs = [parse_train_log(path) for path in options.logs]
        evaluations = None
        if options.eval_logs:
            evaluations = match_eval_logs(runs, [parse_eval_log(p) for p in options.eval_logs])
        summary = summarize(
            runs, evaluations, author=options.author, github_id=options.github_id,
            name=options.name, blurb=options.blurb, date=options.date, corpus=options.corpus,
            baseline_loss=options.baseline_loss, baseline_bpb=options.baseline_bpb)
        code_logs = [{"code": _code(p, _read_text(str(p))), "log_file": str(p)} for p in options.code_logs or []]
        scripts = record_scripts(runs, list(evaluations or []) + code_logs)
        summary["code_sha256"] = {name: _sha256(source) for name, source in sorted(scripts.items())}
        markdown = render_results_markdown(summary)
        try:
            os.makedirs(options.out, exist_ok=True)
            for name, source in scripts.items():  # the exact code that ran, as the logs carry it
                write_atomically(os.path.join(options.out, name), source)
            bundle = code_bundle(scripts)
            if bundle is not None:  # what the cap counts (SHIP_CODE=bundle): the same scripts, one xz script
                write_atomically(os.path.join(options.out, bundle[0]), bundle[1])
                summary["code_sha256"][bundle[0]] = _sha256(bundle[1])
            write_atomically(os.path.join(options.out, "submission.json"),
                             json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
            write_atomically(os.path.join(options.out, "results.md"), markdown)
            write_atomically(os.path.join(options.out, PICTURE_NAME), render_curves_svg(runs, summary["name"]))
        except OSError as error:
            raise RecordError(f"{options.out}: cannot write: {error.strerror}") from None
    except RecordError as error:
        print(f"make_record: {error}", file=sys.stderr)
        return 2
    print(markdown, end="")  # the results table alone on stdout; what was written, on stderr
    for name, digest in summary["code_sha256"].items():
        from train_gpt import log_value  # loaded already: write_atomically imported it
        print(f"record_script file:{name} sha256:{digest} path:{log_value(os.path.join(options.out, name))}",
              file=sys.stderr)
    if "train_gpt.py" not in scripts:
        print("warning missing:train_gpt.py # the training logs carry no code (written before logs carried it): "
              "the record folder must get its train_gpt.py by hand", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
