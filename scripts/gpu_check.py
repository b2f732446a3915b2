"""gpu_check.py: the real default model on the GPUs present, a fixed number of steps, measured.

    bash scripts/gpu_check.sh                 # every visible GPU, 300 steps of the real run's per-GPU load
    bash scripts/gpu_check.sh --quick         # the same, scoring 1M validation tokens and projecting the rest
    bash scripts/gpu_check.sh --steps 100     # fewer steps
    bash scripts/gpu_check.sh --cpu-tiny      # the same pipeline on the CPU with a tiny model (the tests run it)
    bash scripts/gpu_check.sh --recipe frontier   # RECIPE=frontier's model; projects its steps and evaluation

Each GPU takes 98,304 tokens a step in one micro-batch: exactly its share of the 8-GPU run's
786,432-token batch, so the step time measured here is the 8-GPU run's step time less its
gradient all-reduce. Data: DATA_PATH if set, else the official folder if present, else the
built-in corpus prepared into the output folder (no network needed). Prints one `gpu_check`
line and writes gpu_check.json (step_avg, tokens/s, MFU against the card's measured bf16 peak,
peak memory, compiled graphs, projected steps in 600 s on 8 GPUs, the artifact's real bytes,
sliding-evaluation tokens/s and the projected full-validation evaluation time on 8 GPUs). With --recipe
frontier the preset trains (its warm-down a fraction of the check's steps, its loop switched on at 0.35 of
them) and the report adds its projection (bench/frontier_recipe.py's, from the step times measured here before
and after the switch): the steps in 600 s with the loop switch and the legal evaluation's parts with phased TTT,
each assumption stated, over the validation stream in the run's own vocabulary and tokenization (its targets from
bench/frontier_recipe.py's VALIDATION_TARGETS: sp1024's, or #1855's SP8192 with case operators; another counted as
sp1024's, which the line says). The preset's vocabulary is 8192: DATA_PATH with SP8192 shards, or the built-in
corpus prepared at 8192.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "records"))
import log_format  # noqa: E402  (the one reader of our log lines)
import train_gpt  # noqa: E402
from frontier_recipe import FALLBACK_STREAM, VALIDATION_TARGETS, projection, projection_lines  # noqa: E402
from train_throughput import model_flops_per_token  # noqa: E402

PER_GPU_BATCH_TOKENS = 786_432 // 8  # one GPU's share of the real run's batch
FULL_VAL_TARGETS = VALIDATION_TARGETS[FALLBACK_STREAM][0]  # SPEC section 3: the sp1024 stream's scored targets
RECORD_GPUS, RECORD_SECONDS = 8, 600
OFFICIAL_DATA = REPO / "data/datasets/fineweb10B_sp1024"
OFFICIAL_TOKENIZER = REPO / "data/tokenizers/fineweb_1024_bpe.model"

# --quick scores this much of the validation stream (1/59 of it) and projects the rest from its rate: the
# full sliding evaluation is 62M tokens, 2-3 minutes on 8 GPUs and 15-25 on one.
QUICK_VAL_TOKENS = 2**20 + 1

# The tiny CPU mode: the real pipeline (torchrun, the compiled path with the eager backend,
# export, roundtrip, sliding evaluation) at a size that runs in seconds.
CPU_TINY = dict(DEVICE="cpu", COMPILE=1, COMPILE_BACKEND="eager", NUM_LAYERS=2, MODEL_DIM=64, NUM_HEADS=4,
                NUM_KV_HEADS=2, BIGRAM_VOCAB_SIZE=256, BIGRAM_DIM=16, TRAIN_SEQ_LEN=256, VAL_MAX_TOKENS=4097,
                ZSTD_LEVEL=3, WARMUP_STEPS=2)
# ... and with a recipe: its shape at that size, the loop's span and the lanes given by hand as a user would
CPU_TINY_RECIPE = dict(NUM_LAYERS=3, LOOP_START=1, LOOP_END=1, PARALLEL_RESIDUAL_START=2, MLP_MULT=2,
                       TRAIN_SEQ_LEN=128)


def log_fields(lines: list[str], tag: str) -> dict[str, str]:
    try:
        return log_format.last_line(lines, tag).fields
    except (LookupError, log_format.LogFormatError) as e:
        raise SystemExit(f"gpu_check: error: the training log: {e.args[0]}") from None


def prepare_builtin_data(out: Path, vocab: int = 1024) -> tuple[Path, Path]:
    data = out / f"data{vocab if vocab != 1024 else ''}"
    tokenizer = data / "tok.model"
    if not (data / train_gpt.MANIFEST_NAME).is_file():
        subprocess.run([sys.executable, str(REPO / "data/prepare.py"), "--builtin", "--vocab-size", str(vocab),
                        "--out-dir", str(data), "--tokenizer-out", str(tokenizer), "--val-docs", "80"], check=True)
    return data, tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-tiny", action="store_true", help="a tiny model on the CPU: checks the pipeline")
    parser.add_argument("--steps", type=int, default=0, help="training steps (default 300; 4 with --cpu-tiny)")
    parser.add_argument("--quick", action="store_true", help=f"score only the first {QUICK_VAL_TOKENS - 1:,} "
                        "validation tokens and project the full evaluation from their rate")
    parser.add_argument("--out", default="gpu_check_out", help="folder for the log, artifact and gpu_check.json")
    parser.add_argument("--recipe", default="", help="RECIPE for the run (frontier): its model, and its projection")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    on_gpu = not args.cpu_tiny
    if on_gpu and not torch.cuda.is_available():
        raise SystemExit("gpu_check: error: no CUDA device is visible; run on a GPU machine, or use --cpu-tiny")
    nproc = torch.cuda.device_count() if on_gpu else 1
    steps = args.steps or (300 if on_gpu else 4)

    recipe_vocab = args.recipe and train_gpt.Settings.from_env({"RECIPE": args.recipe}).vocab_size  # a bad name: here
    if os.environ.get("DATA_PATH"):
        data, tokenizer = Path(os.environ["DATA_PATH"]), Path(os.environ.get("TOKENIZER_PATH", OFFICIAL_TOKENIZER))
    elif OFFICIAL_DATA.is_dir() and on_gpu and not args.recipe:
        data, tokenizer = OFFICIAL_DATA, OFFICIAL_TOKENIZER
    else:
        data, tokenizer = prepare_builtin_data(out, recipe_vocab if on_gpu and args.recipe else 1024)
    # A short warm-down keeps the learning rate at full strength for most steps (the weights then
    # move as in a real run, so the artifact's size means something), and QAT (from 75%) and SWA
    # still run inside the check, so their graphs and step times are in the figures.
    run_env = dict(DATA_PATH=data, TOKENIZER_PATH=tokenizer, OUTPUT_DIR=out, RUN_ID="gpu_check", ITERATIONS=steps,
                   WARMDOWN_ITERS=max(1, steps // 4), MAX_WALLCLOCK_SECONDS=0, VAL_LOSS_EVERY=0, TRAIN_LOG_EVERY=25,
                   GRAD_ACCUM_STEPS=1, TRAIN_BATCH_TOKENS=PER_GPU_BATCH_TOKENS * nproc)
    if args.quick:
        run_env.update(VAL_MAX_TOKENS=QUICK_VAL_TOKENS)
    if args.cpu_tiny:
        run_env.update(CPU_TINY, TRAIN_BATCH_TOKENS=4 * CPU_TINY["TRAIN_SEQ_LEN"])
    if args.recipe:  # the recipe's own warm-down (a fraction of the steps), not the check's WARMDOWN_ITERS
        run_env.pop("WARMDOWN_ITERS")
        run_env.update(RECIPE=args.recipe)
        if args.cpu_tiny:
            run_env.update(CPU_TINY_RECIPE, VOCAB_SIZE=1024, TRAIN_BATCH_TOKENS=4 * CPU_TINY_RECIPE["TRAIN_SEQ_LEN"])
        elif not os.environ.get("DATA_PATH"):
            run_env.update(VOCAB_SIZE=recipe_vocab)
    env = {**os.environ, **{k: str(v) for k, v in run_env.items()}, "PYTHONUNBUFFERED": "1"}
    if args.cpu_tiny:
        env.setdefault("OMP_NUM_THREADS", "1")  # a tiny model gains nothing from threads that a busy machine lacks
    log_path = out / "logs" / "gpu_check.txt"
    log_path.unlink(missing_ok=True)  # the trainer appends: one run per check
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(REPO / "train_gpt.py")]
    print("gpu_check_run " + " ".join(f"{k.lower()}:{train_gpt.log_value(v)}" for k, v in run_env.items())
          + f" nproc:{nproc} # torchrun train_gpt.py", flush=True)
    if subprocess.run(command, env=env, cwd=REPO).returncode != 0:
        raise SystemExit(f"gpu_check: error: the training run failed; its log is {log_path}")
    lines = log_path.read_text().splitlines()

    done, artifact = log_fields(lines, "train_done"), log_fields(lines, "artifact")
    final, compiled = log_fields(lines, "final_int6_zstd_roundtrip_exact"), log_fields(lines, "compile")
    hardware, data_line = log_fields(lines, "hardware"), log_fields(lines, "data")
    settings = train_gpt.Settings.from_env(env)
    step_ms = float(done["step_avg"].removesuffix("ms"))
    tokens_per_s_per_device = settings.train_batch_tokens / nproc / (step_ms / 1000)
    flops_per_token = model_flops_per_token(train_gpt.ModelConfig.from_settings(settings), settings.train_seq_len)
    device = "cuda" if on_gpu else "cpu"
    n = 8192 if on_gpu else 1024
    peaks = {str(dtype).removeprefix("torch."): 1e9 * train_gpt.matmul_gflops(dtype, n, n, n, torch.device(device), 10, 5.0)
             for dtype in (torch.bfloat16, torch.float32)}
    eval_s = float(final["eval_time"].removesuffix("ms")) / 1000
    eval_tokens_per_s_per_device = int(data_line["val_tokens"]) / eval_s / nproc
    report = {
        "device": hardware.get("name", device), "devices": nproc, "steps": int(done["steps"]),
        "step_avg_ms": step_ms, "tokens_per_s_per_device": round(tokens_per_s_per_device),
        "model_flops_per_token": flops_per_token,
        "peak_matmul_tflops": {k: round(v / 1e12, 2) for k, v in peaks.items()},
        "mfu_vs_fastest_peak": round(flops_per_token * tokens_per_s_per_device / max(peaks.values()), 4),
        "peak_memory": {k: v for k, v in done.items() if k.startswith("peak_")},
        "compiled_graphs": {k: int(v) for k, v in compiled.items() if v.isdigit()},
        "projected_steps_in_600s_on_8": int(RECORD_SECONDS * 1000 / step_ms),
        "artifact_model_bytes": int(artifact["model_bytes"]), "artifact_total_bytes": int(artifact["total_bytes"]),
        "artifact_counted_for": artifact["counted_for"], "counted_code_bytes": int(artifact["counted_code_bytes"]),
        "code_shipped_as": artifact["shipped_as"], "raw_code_bytes": int(artifact["raw_code_bytes"]),
        "validation_tokens_scored": int(data_line["val_tokens"]),
        "artifact_headroom_bytes": int(artifact["headroom_bytes"]), "over_cap": artifact.get("over_cap") == "1",
        "sliding_eval_tokens_per_s_per_device": round(eval_tokens_per_s_per_device),
        "projected_full_val_sliding_eval_s_on_8": round(FULL_VAL_TARGETS / (eval_tokens_per_s_per_device * RECORD_GPUS), 1),
        "final_val_bpb": float(final["val_bpb"]), "log": str(log_path),
    }
    if args.recipe:
        report.update(recipe_projection(settings, lines, eval_tokens_per_s_per_device * RECORD_GPUS))
    train_gpt.atomic_write_bytes(out / "gpu_check.json", (json.dumps(report, indent=2) + "\n").encode())
    flat = {k: v for k, v in report.items() if not isinstance(v, dict)}
    for line in report.get("projection_lines", []):
        print(line, flush=True)
    print("gpu_check " + " ".join(f"{k}:{train_gpt.log_value(v)}" for k, v in flat.items() if k != "projection_lines")
          + f" wrote:{out / 'gpu_check.json'}", flush=True)


def recipe_projection(settings: train_gpt.Settings, lines: list[str], base_tokens_per_s: float) -> dict:
    """The recipe's 8xH100 projection from this run's step times: the mean step before the loop switch and after
    it (the whole run's mean for a recipe without a loop), and its measured base pass's rate on 8 GPUs, over the
    validation stream in the run's own vocabulary and tokenization (the data line's)."""
    done = log_fields(lines, "train_done")
    total_ms, steps = float(done["train_time"].removesuffix("ms")), int(done["steps"])
    try:
        loop = log_format.last_line(lines, "loop_start").fields
        switch_ms, switch_step = float(loop["train_time"].removesuffix("ms")), int(loop["step"])
        plain_ms, looped_ms = switch_ms / max(switch_step, 1), (total_ms - switch_ms) / max(steps - switch_step, 1)
    except LookupError:
        plain_ms = looped_ms = total_ms / max(steps, 1)
    p = projection(settings, plain_ms, looped_ms, log_fields(lines, "data")["tokenization"], base_tokens_per_s)
    return {"recipe": settings.recipe, "recipe_projection": p, "projection_lines": projection_lines(
        p, "measured here before and after the switch (QAT's last quarter in the looped mean)")}


if __name__ == "__main__":
    main()
