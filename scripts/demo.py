"""
demo.py: the whole pipeline in one command, on the built-in corpus and a CPU, with references.

    bash scripts/demo.sh                  # sets up .venv, then runs this (about 12 minutes on 2 cores)
    python scripts/demo.py --quick        # a short training run: the pipeline, not the score
    python scripts/demo.py --train-seconds 600

Stages, each a real tool run as a child process whose output is streamed through:
  1. data/prepare.py --builtin: the pydoc topics and stdlib docstrings become sp1024 shards;
  2. train_gpt.py: a small model trained on CPU, exported as the int6 + zstd artifact;
  3. eval_final.py with USE_CORRECTION=1: the artifact's own score, then the val-derived
     correction table (1.5% of the validation targets, the seed's density) and its two-part cost;
  4. the legal eval-time methods: build_correction_table.py with CORRECTION_MODE=causal chooses
     the hint knobs on training text, then eval_final.py scores the copy carrying them with
     score-first TTT and the causal hints, each alone and both together;
  5. references on the same validation text: zstd -22, xz -9e, xz given the training text, and
     unigram and bigram token models counted on the training tokens.
The model's figures are read from the lines its tools print (records/log_format.py reads them),
never recomputed here; the references are scripts/demo_references.py's. The table goes to
data/demo_run/summary.md and the figures to data/demo_run/summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for folder in (REPO, REPO / "records", REPO / "scripts"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import log_format  # noqa: E402
import train_gpt  # noqa: E402
from demo_references import (BIGRAM_BASE_ADD_K, UNIGRAM_ADD_K, ZSTD_REFERENCE_LEVEL, References,  # noqa: E402
                             compute_references)

# ----------------------------------------------------------------------------------------------
# Settings
# Everything the demo chooses, in one place. Paths are relative to the repository root, where
# the child processes run, so the logs name them the way a reader would type them.
# ----------------------------------------------------------------------------------------------

RUN_DIR = Path("data/demo_run")
DATA_DIR = RUN_DIR / "datasets"
TOKENIZER_PATH = RUN_DIR / "tokenizer.model"
ARTIFACT_PATH = RUN_DIR / train_gpt.ARTIFACT_NAME
RUN_ID = "demo"
SUMMARY_MD = RUN_DIR / "summary.md"
SUMMARY_JSON = RUN_DIR / "summary.json"

VOCAB_SIZE = 1024
VAL_DOCS = 80  # of the ~800 built-in documents: the first 80 (pydoc topics) are validation
CORRECTION_DENSITY = 0.015  # table entries per validation target: the seed's 1.464%, rounded
ENV_STARTED_AT = "DEMO_STARTED_AT"  # scripts/demo.sh sets it, so the clock includes the setup

# The training run: the real architecture at 4 layers x 128 (0.86 M parameters), the size
# that scored best in 360 s on 2 cores among 64 to 256 wide, with a small batch (more steps win
# at this budget) and half the default learning rates. ITERATIONS is what an idle 2-core machine
# gets through in 380-415 s (305-330 ms a step measured), so there the run is the same every time;
# TRAIN_SECONDS caps the clock on a busier one, where the warm-down is timed to end on the cap
# (train_gpt.lr_scale). The whole demo then takes about 12 minutes plus the .venv setup (the legal
# methods' stage about 3.5 of them).
TRAIN_SECONDS = 420
TRAIN_ENV = {
    "VOCAB_SIZE": VOCAB_SIZE,
    "DEVICE": "cpu",
    "NUM_LAYERS": 4,
    "MODEL_DIM": 128,
    "NUM_HEADS": 4,
    "NUM_KV_HEADS": 2,
    "MLP_MULT": 3,
    "BIGRAM_VOCAB_SIZE": 2048,
    "BIGRAM_DIM": 64,
    "TRAIN_SEQ_LEN": 256,
    "TRAIN_BATCH_TOKENS": 4096,
    "GRAD_ACCUM_STEPS": 1,
    "ITERATIONS": 1250,
    "WARMDOWN_ITERS": 450,
    "MUON_MOMENTUM_WARMUP_STEPS": 100,
    "MATRIX_LR": 0.0125,
    "SCALAR_LR": 0.0125,
    "TIED_EMBED_LR": 0.02,
    "WARMUP_STEPS": 0,  # warm-up steps exist to compile CUDA kernels; on CPU they are wasted time
    "SWA_EVERY": 10,
    "VAL_LOSS_EVERY": 0,
    "TRAIN_LOG_EVERY": 100,
    "EVAL_STRIDE": 64,
    "ZSTD_LEVEL": 22,
}
# The legal eval-time methods on the demo's model: the causal hints and score-first TTT, each with settings
# chosen on training text: the hint knobs by build_correction_table.py, TTT's rate, rank and steps by
# build_ttt_settings.py on the last TTT_BUILD_ENV["CALIBRATE_TTT_TOKENS"] training tokens, in the mode and
# chunk size below, both carried by the artifact. (Until issue 24 the demo ran TTT at lr 0.06, picked by a
# sweep on this validation text.)
HINTS_ARTIFACT_PATH = RUN_DIR / "final_model.int6.with_hints.ptz"
LEGAL_ARTIFACT_PATH = RUN_DIR / "final_model.int6.with_hints.with_ttt.ptz"
# The chunked mode: on this corpus, with settings chosen on training text, it gained 0.108 BPB where the phased mode
# gained 0.022 (docs/legal_eval.md, "Measured": the validation text is another kind than the training text)
TTT_BUILD_ENV = {"TTT_MODE": "full", "TTT_CHUNK_TOKENS": 8192, "CALIBRATE_TTT_TOKENS": 32768}
LEGAL_ENV = {"USE_CORRECTION": 1, "CORRECTION_MODE": "causal", "USE_TTT": 1}
QUICK_TRAIN_SECONDS = 90
SCHEDULE_KEYS = ("ITERATIONS", "WARMDOWN_ITERS", "MUON_MOMENTUM_WARMUP_STEPS")  # in steps: scaled with the time


@dataclass(frozen=True)
class DemoSettings:
    train_seconds: float
    quick: bool = False

    @property
    def schedule(self) -> dict[str, int]:
        """The step counts of TRAIN_ENV, scaled from TRAIN_SECONDS to this run's training time."""
        scale = self.train_seconds / TRAIN_SECONDS
        return {k: max(1, round(TRAIN_ENV[k] * scale)) for k in SCHEDULE_KEYS}

    def train_env(self) -> dict[str, str]:
        env = dict(TRAIN_ENV, **self.schedule, MAX_WALLCLOCK_SECONDS=self.train_seconds, DATA_PATH=DATA_DIR,
                   TOKENIZER_PATH=TOKENIZER_PATH, OUTPUT_DIR=RUN_DIR, RUN_ID=RUN_ID)
        return {k: str(v) for k, v in env.items()}


class DemoError(Exception):
    """A stage that failed, and what to look at."""


# ----------------------------------------------------------------------------------------------
# Child processes and their logs
# Each stage is the real tool, run from the repository root with its output shown as it comes
# and kept, so the figures can be read back from the very lines the user saw.
# ----------------------------------------------------------------------------------------------


def last_line(lines: list[str], tag: str, stage: str) -> dict[str, str]:
    """The fields of the last `tag` line (records/log_format.py reads them), or a DemoError naming the stage."""
    try:
        return log_format.last_line(lines, tag).fields
    except (LookupError, log_format.LogFormatError) as e:
        raise DemoError(f"{stage}: its output: {e.args[0]}; see the output above") from None


def number(fields: dict[str, str], key: str, stage: str) -> float:
    if key not in fields:
        raise DemoError(f"{stage}: a log line lacks '{key}:' ({fields}); see the output above")
    return float(fields[key].removesuffix("ms"))


class Clock:
    def __init__(self):
        started = os.environ.get(ENV_STARTED_AT)
        try:
            self.start = float(started) if started else time.time()
        except ValueError:
            self.start = time.time()

    def elapsed(self) -> float:
        return time.time() - self.start

    def stamp(self) -> str:
        seconds = int(self.elapsed())
        return f"{seconds // 60}:{seconds % 60:02d}"


def banner(clock: Clock, index: int, total: int, title: str) -> None:
    print(f"\ndemo_stage stage:{index}/{total} elapsed:{clock.stamp()} # {title}", flush=True)


def run_child(stage: str, args: list[str], env_overrides: dict[str, str] | None = None) -> list[str]:
    """Runs `python args...` from the repository root, echoing its output; returns its lines."""
    env = dict(os.environ)
    env.update(env_overrides or {})
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    shown = " ".join(f"{k}={v}" for k, v in (env_overrides or {}).items())
    print(f"demo_child stage:{stage} # {shown + ' ' if shown else ''}{Path(sys.executable).name} {' '.join(args)}",
          flush=True)
    lines = []
    with subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, bufsize=1) as child:
        try:
            for line in child.stdout:
                line = line.rstrip("\n")
                print(f"  {line}", flush=True)
                lines.append(line)
        except KeyboardInterrupt:
            child.terminate()
            child.wait()
            raise
        code = child.wait()
    if code != 0:
        raise DemoError(f"{stage} failed (exit status {code}); its output is above")
    return lines


# ----------------------------------------------------------------------------------------------
# The summary
# One row per coder, with what it divides by: the model and the token models count SPEC
# section 5 bytes of the scored targets; the compressors count the raw UTF-8 of the same
# documents. Both totals are printed so the two denominators can be compared.
# ----------------------------------------------------------------------------------------------

ROWS = {
    "base": "model, int6+zstd roundtrip (eval_base)",
    "corrected": "model + correction table (val-derived)",
    "two_part": "two-part: model + table bits",
    "ttt": "model + score-first TTT (legal)",
    "causal": "model + causal hints (legal)",
    "ttt_causal": "model + TTT + causal hints (legal)",
    "zstd": f"zstd -{ZSTD_REFERENCE_LEVEL}",
    "xz": "xz -9e",
    "xz_given": "xz -9e given train text",
    "unigram": f"unigram (add-{UNIGRAM_ADD_K:g})",
    "bigram": "bigram (interpolated Kneser-Ney)",
}
SPEC_BYTES = "SPEC §5 bytes"
TEXT_BYTES = "raw UTF-8 bytes"


@dataclass
class Row:
    label: str
    bpb: float
    counts: str  # which bytes the BPB divides by
    size: str  # what the coder costs to store, in words


def render_table(rows: list[Row], headers=("coder", "val BPB", "bytes counted", "size")) -> str:
    """An aligned Markdown table."""
    cells = [list(headers)] + [[r.label, f"{r.bpb:.4f}", r.counts, r.size] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    right = {1}

    def line(row: list[str]) -> str:
        parts = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        return "| " + " | ".join(parts) + " |"

    rule = "| " + " | ".join(("-" * (w - 1) + ":") if i in right else "-" * w for i, w in enumerate(widths)) + " |"
    return "\n".join([line(cells[0]), rule, *(line(row) for row in cells[1:])])


def summary_rows(fig: dict, refs: References) -> list[Row]:
    spec = f"{SPEC_BYTES} ({fig['val_token_bytes']:,})"
    text = f"{TEXT_BYTES} ({refs.val_text_bytes:,})"
    base_size = (f"{fig['artifact_total_bytes']:,} B (model {fig['model_bytes']:,} + the legal evaluation's code "
                 f"and knob room {fig['counted_code_bytes']:,})")
    table_size = (f"+ table {fig['table_bytes']:,} B ({fig['table_entries']:,} entries); total "
                  f"{fig['eval_total_bytes']:,} B")
    return [
        Row(ROWS["base"], fig["base_bpb"], spec, base_size),
        Row(ROWS["corrected"], fig["corrected_bpb"], spec, table_size),
        Row(ROWS["two_part"], fig["two_part_bpb"], spec, "table bits added to the corrected bits"),
        Row(ROWS["ttt"], fig["ttt_bpb"], spec, f"no bytes; eval time x{fig['ttt_time_ratio']:.1f} the base's"),
        Row(ROWS["causal"], fig["causal_bpb"], spec, f"+ knobs {fig['hint_bytes']} B; total {fig['legal_total_bytes']:,} B"),
        Row(ROWS["ttt_causal"], fig["ttt_causal_bpb"], spec, "the two above together"),
        Row(ROWS["zstd"], refs.bpb(refs.zstd_bytes), text, f"{refs.zstd_bytes:,} B compressed"),
        Row(ROWS["xz"], refs.bpb(refs.xz_bytes), text, f"{refs.xz_bytes:,} B compressed"),
        Row(ROWS["xz_given"], refs.bpb(refs.xz_given_train_bytes), text,
            f"{refs.xz_given_train_bytes:,} B = xz(train+val) - xz(train)"),
        Row(ROWS["unigram"], refs.unigram_bpb, spec, f"counts of {refs.train_tokens:,} train tokens"),
        Row(ROWS["bigram"], refs.bigram_bpb, spec, f"counts of {refs.train_tokens:,} train tokens, "
            f"D={refs.bigram_discount:.3f}"),
    ]


def summary_notes(fig: dict, refs: References, settings: DemoSettings) -> list[str]:
    margin = refs.bigram_bpb - fig["base_bpb"]
    return [
        f"Validation: the first {VAL_DOCS} built-in documents, {refs.val_targets:,} scored targets "
        f"(trimmed to whole {TRAIN_ENV['TRAIN_SEQ_LEN']}-token sequences); {fig['val_token_bytes']:,} SPEC §5 bytes, "
        f"{refs.val_text_bytes:,} raw UTF-8 bytes of the same documents as the tokenizer kept them (decoded from "
        f"the shards: NFKC-normalized, every run of whitespace, newlines included, folded into one space; "
        f"documents joined by newlines). Training: {refs.train_tokens:,} tokens, {refs.train_text_bytes:,} bytes "
        f"of text.",
        f"Model: {TRAIN_ENV['NUM_LAYERS']} layers x {TRAIN_ENV['MODEL_DIM']}, {fig['params']:,} parameters, "
        f"{fig['steps']} steps ({fig['stop_reason']}) in {fig['train_ms'] / 1000:.0f} s of CPU training; "
        f"sliding eval at stride {TRAIN_ENV['EVAL_STRIDE']}. Pre-quantization {fig['prequant_bpb']:.4f} BPB.",
        f"The correction table is made from the validation text ({fig['table_entries']:,} entries, "
        f"{CORRECTION_DENSITY:.1%} of the targets): the rules forbid it in a record. The two-part row adds "
        f"its bits to the corrected bits, which is what it really costs.",
        f"Legal rows: every position is scored before anything learns from it. Score-first TTT ({fig['ttt_chosen']}; "
        f"{fig['ttt_chunks']:,} chunks scored) took {fig['ttt_ms'] / 1000:.0f} s against the base pass's "
        f"{fig['legal_base_ms'] / 1000:.0f} s; its settings were chosen by build_ttt_settings.py on the last whole "
        f"documents (at most {TTT_BUILD_ENV['CALIBRATE_TTT_TOKENS']:,} tokens) of the training shard (gain there "
        f"{fig['ttt_slice_gain']:.4f} BPB), never on validation text. The causal hints' knobs (orders "
        f"{fig['hint_orders']}) were chosen on the last {fig['hint_train_tokens']:,} tokens of the training shard. "
        "Training had seen both slices; the built-in corpus repeats itself, so the hints gain far more here than "
        "on FineWeb.",
        f"Unigram: add-{UNIGRAM_ADD_K:g} counts. Bigram: interpolated Kneser-Ney, discount "
        f"D = n1/(n1+2 n2) = {refs.bigram_discount:.3f}, continuation counts add-{BIGRAM_BASE_ADD_K:g}. "
        f"Both are counted on the training tokens and scored on the model's targets with train_gpt's byte "
        "accounting.",
        "Compressor sizes count the compressed stream only (no decoder); the model's size counts the "
        "artifact and its code.",
        f"Check: the model beats the bigram by {margin:.4f} BPB." if margin > 0 else
        f"WARNING: the model does not beat the bigram (it is {-margin:.4f} BPB behind)"
        + ("; a --quick run trains too briefly for that." if settings.quick else "."),
    ]


# ----------------------------------------------------------------------------------------------
# The stages
# ----------------------------------------------------------------------------------------------


def prepare_data() -> None:
    run_child("data/prepare.py", ["data/prepare.py", "--builtin", "--vocab-size", str(VOCAB_SIZE),
                                  "--out-dir", str(DATA_DIR), "--tokenizer-out", str(TOKENIZER_PATH),
                                  "--val-docs", str(VAL_DOCS)])


def train_model(settings: DemoSettings) -> dict:
    for stale in (REPO / ARTIFACT_PATH, REPO / RUN_DIR / "logs" / f"{RUN_ID}.txt"):
        stale.unlink(missing_ok=True)  # a failed run must not leave an older model to evaluate
    stage = "train_gpt.py"
    lines = run_child(stage, ["train_gpt.py"], settings.train_env())
    done = last_line(lines, "train_done", stage)
    artifact = last_line(lines, "artifact", stage)
    return {
        "params": int(number(last_line(lines, "model", stage), "params", stage)),
        "steps": int(number(done, "steps", stage)),
        "stop_reason": done.get("reason", "?"),
        "train_ms": number(done, "train_time", stage),
        "val_token_bytes_train": int(number(last_line(lines, "data", stage), "val_bytes", stage)),
        "prequant_bpb": number(last_line(lines, "prequant_exact", stage), "val_bpb", stage),
        "roundtrip_bpb": number(last_line(lines, "final_int6_zstd_roundtrip_exact", stage), "val_bpb", stage),
        "model_bytes": int(number(artifact, "model_bytes", stage)),
        "counted_code_bytes": int(number(artifact, "counted_code_bytes", stage)
                                  + number(artifact, "reserve_bytes", stage)),
        "artifact_total_bytes": int(number(artifact, "total_bytes", stage)),
    }


def evaluation_env(max_entries: int) -> dict[str, str]:
    env = {"CHECKPOINT": ARTIFACT_PATH, "DATA_PATH": DATA_DIR, "TOKENIZER_PATH": TOKENIZER_PATH,
           "EVAL_STRIDE": TRAIN_ENV["EVAL_STRIDE"], "DEVICE": "cpu", "USE_CORRECTION": 1,
           "CORRECTION_MAX_ENTRIES": max_entries}
    return {k: str(v) for k, v in env.items()}


def evaluate_model(max_entries: int) -> dict:
    (REPO / ARTIFACT_PATH.with_suffix(".ctab")).unlink(missing_ok=True)
    (REPO / RUN_DIR / "logs" / f"eval_{ARTIFACT_PATH.stem}.txt").unlink(missing_ok=True)
    stage = "eval_final.py"
    lines = run_child(stage, ["eval_final.py"], evaluation_env(max_entries))
    base = last_line(lines, "eval_base", stage)
    table = last_line(lines, "correction", stage)
    if "entries" not in table or int(number(table, "entries", stage)) == 0:
        raise DemoError(f"{stage}: no correction table was built; see the output above")
    total = last_line(lines, "artifact_total", stage)
    return {
        "base_bpb": number(base, "val_bpb", stage),
        "base_val_loss": number(base, "val_loss", stage),
        "val_targets_eval": int(number(base, "tokens", stage)),
        "val_token_bytes": int(number(base, "bytes", stage)),
        "eval_ms": number(base, "eval_time", stage),
        "table_entries": int(number(table, "entries", stage)),
        "table_bytes": int(number(table, "table_bytes", stage)),
        "table_bytes_per_entry": number(table, "bytes_per_entry", stage),
        "corrected_bpb": number(last_line(lines, "eval_corrected_valderived", stage), "val_bpb", stage),
        "two_part_bpb": number(last_line(lines, "eval_two_part", stage), "val_bpb", stage),
        "eval_code_bytes": int(number(total, "eval_code_bytes", stage)),
        "eval_total_bytes": int(number(total, "total_bytes", stage)),
    }


def evaluate_legal() -> dict:
    for stale in (HINTS_ARTIFACT_PATH, LEGAL_ARTIFACT_PATH):
        (REPO / stale).unlink(missing_ok=True)
    (REPO / RUN_DIR / "logs" / f"eval_{LEGAL_ARTIFACT_PATH.stem}.txt").unlink(missing_ok=True)  # one evaluation a log
    stage = "build_correction_table.py"
    env = {k: str(v) for k, v in evaluation_env(0).items() if k != "USE_CORRECTION" and k != "CORRECTION_MAX_ENTRIES"}
    lines = run_child(stage, ["build_correction_table.py"], dict(env, CORRECTION_MODE="causal"))
    search = last_line(lines, "hint_search", stage)
    stage = "build_ttt_settings.py"
    lines = run_child(stage, ["build_ttt_settings.py"], dict(env, CHECKPOINT=str(HINTS_ARTIFACT_PATH),
                                                            **{k: str(v) for k, v in TTT_BUILD_ENV.items()}))
    chosen = last_line(lines, "ttt_chosen", stage)
    stage = "eval_final.py (legal)"
    lines = run_child(stage, ["eval_final.py"], dict(env, CHECKPOINT=str(LEGAL_ARTIFACT_PATH),
                                                     **{k: str(v) for k, v in LEGAL_ENV.items()}))
    ttt = last_line(lines, "ttt", stage)
    base_ms = number(last_line(lines, "eval_base", stage), "eval_time", stage)
    return {
        "legal_base_bpb": number(last_line(lines, "eval_base", stage), "val_bpb", stage),
        "legal_base_ms": base_ms,
        "ttt_bpb": number(last_line(lines, "eval_ttt", stage), "val_bpb", stage),
        "ttt_ms": number(ttt, "time", stage),
        "ttt_time_ratio": number(ttt, "time", stage) / base_ms,
        "ttt_chunks": int(number(ttt, "chunks", stage)),
        "ttt_chosen": " ".join(f"{k.removeprefix('ttt_')}:{v}" for k, v in chosen.items() if k.startswith("ttt_")),
        "ttt_slice_gain": number(chosen, "gain_bpb", "build_ttt_settings.py"),
        "causal_bpb": number(last_line(lines, "eval_causal", stage), "val_bpb", stage),
        "ttt_causal_bpb": number(last_line(lines, "eval_ttt_causal", stage), "val_bpb", stage),
        "hint_bytes": int(number(last_line(lines, "artifact_total", stage), "hint_bytes", stage)),
        "hint_orders": last_line(lines, "hints", stage).get("orders", "?"),
        "hint_train_tokens": int(number(search, "tokens", stage)),
        "legal_total_bytes": int(number(last_line(lines, "artifact_total", stage), "total_bytes", stage)),
    }


def check_same_stream(fig: dict, refs: References) -> None:
    """The references must score the very targets the model was scored on."""
    if (fig["val_targets_eval"], fig["val_token_bytes"]) != (refs.val_targets, refs.val_token_bytes) \
            or fig["val_token_bytes_train"] != refs.val_token_bytes:
        raise DemoError(f"the references scored {refs.val_targets} targets / {refs.val_token_bytes} bytes, but "
                        f"eval_final.py scored {fig['val_targets_eval']} / {fig['val_token_bytes']} and train_gpt.py "
                        f"counted {fig['val_token_bytes_train']} bytes; they must read the same validation stream")


def write_summary(table: str, notes: list[str], fig: dict, refs: References, rows: list[Row],
                  settings: DemoSettings, timings: dict) -> None:
    markdown = "# Demo: the pipeline on the built-in corpus (CPU)\n\n" + table + "\n\n" + \
        "\n".join(f"- {note}" for note in notes) + "\n"
    train_gpt.atomic_write_bytes(REPO / SUMMARY_MD, markdown.encode("utf-8"))
    record = {
        "rows": [asdict(r) for r in rows],
        "model": fig,
        "references": asdict(refs),
        "settings": {"demo": asdict(settings), "train_env": settings.train_env(),
                     "eval_env": evaluation_env(fig["table_entries_cap"]), "legal_env": LEGAL_ENV,
                     "ttt_build_env": TTT_BUILD_ENV, "val_docs": VAL_DOCS,
                     "correction_density": CORRECTION_DENSITY, "zstd_level": ZSTD_REFERENCE_LEVEL,
                     "xz_preset": "9e", "unigram_add_k": UNIGRAM_ADD_K, "bigram_base_add_k": BIGRAM_BASE_ADD_K},
        "timings_s": timings,
        "versions": train_gpt.library_versions(),
        "cpu": train_gpt.cpu_name(),
    }
    train_gpt.atomic_write_bytes(REPO / SUMMARY_JSON, (json.dumps(record, indent=2) + "\n").encode("utf-8"))


def parse_args(argv: list[str] | None) -> DemoSettings:
    parser = argparse.ArgumentParser(description="Prepare, train, evaluate and compare, on the built-in corpus.")
    parser.add_argument("--quick", action="store_true",
                        help=f"train for {QUICK_TRAIN_SECONDS} s instead of {TRAIN_SECONDS} s (shows the pipeline, "
                             "not a good score)")
    parser.add_argument("--train-seconds", type=float, help="cap on the training clock, in seconds")
    args = parser.parse_args(argv)
    if args.train_seconds is not None and args.train_seconds <= 0:
        parser.error("--train-seconds must be positive")
    seconds = args.train_seconds or (QUICK_TRAIN_SECONDS if args.quick else TRAIN_SECONDS)
    return DemoSettings(seconds, quick=args.quick)


def start_line(settings: DemoSettings) -> str:
    return (f"demo {train_gpt.library_versions()} cpu:{train_gpt.log_value(train_gpt.cpu_name())} "
            f"threads:{os.cpu_count()} train_seconds:{settings.train_seconds:g} "
            f"iterations:{settings.schedule['ITERATIONS']} out_dir:{RUN_DIR} # training stops at whichever ends first")


def done_line(clock: Clock, timings: dict[str, float]) -> str:
    return (f"demo_done elapsed:{clock.stamp()} " + " ".join(f"{k}_s:{v:.0f}" for k, v in timings.items())
            + f" summary_md:{SUMMARY_MD} summary_json:{SUMMARY_JSON}")


def run(settings: DemoSettings) -> None:
    clock = Clock()
    timings: dict[str, float] = {}
    print(start_line(settings), flush=True)

    def timed(name: str, seconds_before: float) -> None:
        timings[name] = round(clock.elapsed() - seconds_before, 1)

    banner(clock, 1, 6, "prepare the built-in corpus (data/prepare.py)")
    t = clock.elapsed()
    prepare_data()
    timed("prepare", t)

    banner(clock, 2, 6, f"train a small model on CPU (train_gpt.py, at most {settings.train_seconds:g} s of training)")
    t = clock.elapsed()
    fig = train_model(settings)
    timed("train", t)

    seq_len = int(TRAIN_ENV["TRAIN_SEQ_LEN"])
    n_targets = train_gpt.load_validation_tokens(str(REPO / DATA_DIR), VOCAB_SIZE, seq_len).numel() - 1
    max_entries = max(1, round(CORRECTION_DENSITY * n_targets))
    banner(clock, 3, 6, f"evaluate the artifact with the correction table (eval_final.py, at most {max_entries:,} "
                        f"entries = {CORRECTION_DENSITY:.1%} of {n_targets:,} targets)")
    t = clock.elapsed()
    fig.update(evaluate_model(max_entries), table_entries_cap=max_entries)
    timed("evaluate", t)

    banner(clock, 4, 6, "the legal eval-time methods: causal hint knobs chosen on training text "
                        "(build_correction_table.py), then score-first TTT and the hints (eval_final.py)")
    t = clock.elapsed()
    fig.update(evaluate_legal())
    timed("legal", t)
    if abs(fig["legal_base_bpb"] - fig["base_bpb"]) > 1e-6:
        raise DemoError(f"the copy carrying the hint knobs scored {fig['legal_base_bpb']} base, the artifact "
                        f"{fig['base_bpb']}: the copy must hold the same weights")

    banner(clock, 5, 6, "references on the same validation text (zstd, xz, unigram, bigram)")
    t = clock.elapsed()
    refs = compute_references(str(REPO / DATA_DIR), str(REPO / TOKENIZER_PATH), VOCAB_SIZE, seq_len,
                              say=lambda msg: print(f"  {msg}", flush=True))
    timed("references", t)
    check_same_stream(fig, refs)

    banner(clock, 6, 6, "summary")
    rows = summary_rows(fig, refs)
    table = render_table(rows)
    notes = summary_notes(fig, refs, settings)
    timings["total"] = round(clock.elapsed(), 1)
    write_summary(table, notes, fig, refs, rows, settings, timings)
    print(table)
    print()
    for note in notes:
        print(f"- {note}")
    print("\n" + done_line(clock, timings), flush=True)


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    try:
        run(settings)
    except (DemoError, train_gpt.InputError) as e:
        print(f"\ndemo: error: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("\ndemo: interrupted", file=sys.stderr, flush=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
