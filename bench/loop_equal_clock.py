"""Depth recurrence at equal wall clock on this CPU (docs/depth_recurrence.md): BPB with and without the loop.

For each configuration, the looped/plain step-time ratio r is measured first, side by side in one process
(bench/loop_step_time.py's time_orders). Then train_gpt.py trains each seed twice, counted in steps so that
a shared machine's load cannot move the comparison: the plain model ITERATIONS=N; the looped one the steps
the same wall clock buys it, 0.35 N plain steps and then 0.65 N / r looped ones, its switch set where those
0.35 N steps end, its warm-down over the same last third of the clock. Each run scores the standard (stride 0) final BPB after export.

    python bench/loop_equal_clock.py --data-path DIR --tokenizer-path FILE [--steps 200] [--seeds 1337,2024]
"""

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "records"))
import log_format  # noqa: E402
import train_gpt  # noqa: E402
from loop_step_time import time_orders  # noqa: E402

SWITCH_AT = 0.35  # of the wall clock, as #1855
COMMON = dict(VOCAB_SIZE=1024, DEVICE="cpu", MODEL_DIM=128, NUM_HEADS=4, NUM_KV_HEADS=2, MLP_MULT=3,
              BIGRAM_VOCAB_SIZE=2048, BIGRAM_DIM=64, TRAIN_SEQ_LEN=256, TRAIN_BATCH_TOKENS=2048, GRAD_ACCUM_STEPS=1,
              MATRIX_LR=0.0125, SCALAR_LR=0.0125, TIED_EMBED_LR=0.02, WARMUP_STEPS=0, SWA_EVERY=10,
              MUON_MOMENTUM_WARMUP_STEPS=50, VAL_LOSS_EVERY=0, TRAIN_LOG_EVERY=1000, EVAL_STRIDE=0,
              MAX_WALLCLOCK_SECONDS=0, AUTOCAST_BF16=0, GPTQ_CALIBRATION_TOKENS=8192)
CONFIGS = {  # the demo's 4 x 128 with its middle pair looped once more; 6 x 128 with blocks 2-3 twice more
    "demo_4x128_loop1-2x1": dict(NUM_LAYERS=4, LOOP_START=1, LOOP_END=2, NUM_LOOPS=1),
    "6x128_loop2-3x2": dict(NUM_LAYERS=6, LOOP_START=2, LOOP_END=3, NUM_LOOPS=2),
}


def step_ratio(config: dict, steps: int) -> float:
    settings = dataclasses.replace(train_gpt.Settings(), **{k.lower(): type(getattr(train_gpt.Settings(), k.lower()))(v)
                                                           for k, v in {**COMMON, **config}.items()})
    return time_orders("ratio", settings, steps)["ratio"]


def train(env: dict) -> float:
    out = tempfile.mkdtemp(prefix="loop_equal_clock_")
    run = subprocess.run([sys.executable, "train_gpt.py"], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "OUTPUT_DIR": out, "RUN_ID": "run",
                              **{k: str(v) for k, v in env.items()}})
    if run.returncode:
        raise SystemExit(run.stderr[-3000:])
    return float(log_format.last_line(run.stdout, "final_int6_zstd_roundtrip_exact").fields["val_bpb"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-path", required=True)
    parser.add_argument("--tokenizer-path", required=True)
    parser.add_argument("--steps", type=int, default=200, help="the plain run's steps, N")
    parser.add_argument("--seeds", default="1337,2024")
    parser.add_argument("--ratio-steps", type=int, default=3)
    parser.add_argument("--val-max-tokens", type=int, default=32768)
    args = parser.parse_args()
    data = dict(DATA_PATH=args.data_path, TOKENIZER_PATH=args.tokenizer_path, VAL_MAX_TOKENS=args.val_max_tokens)
    for name, config in CONFIGS.items():
        ratio = step_ratio(config, args.ratio_steps)
        plain_steps = args.steps
        before = round(SWITCH_AT * plain_steps)
        looped_steps = before + round((plain_steps - before) / ratio)
        plain = {k: v for k, v in config.items() if not k.startswith(("LOOP_", "NUM_LOOPS"))}
        for seed in args.seeds.split(","):
            bpb_plain = train({**COMMON, **data, **plain, "SEED": seed, "ITERATIONS": plain_steps,
                               "WARMDOWN_ITERS": plain_steps // 3})
            bpb_looped = train({**COMMON, **data, **config, "SEED": seed, "ITERATIONS": looped_steps,
                                "WARMDOWN_ITERS": round(plain_steps / 3 / ratio),  # the same last third of the clock
                                "ENABLE_LOOPING_AT": before / looped_steps})
            print(f"loop_equal_clock config:{name} seed:{seed} step_ratio:{ratio:.3f} plain_steps:{plain_steps} "
                  f"looped_steps:{looped_steps} switch_step:{before} plain_bpb:{bpb_plain:.5f} "
                  f"looped_bpb:{bpb_looped:.5f} looped_minus_plain:{bpb_looped - bpb_plain:+.5f}", flush=True)


if __name__ == "__main__":
    main()
