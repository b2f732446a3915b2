"""RECIPE=frontier measured on the CPU (docs/frontier_recipe.md): its 8xH100 time, projected from CPU step-time
ratios, and its BPB at a CPU size against today's defaults at that size.

    python bench/frontier_recipe.py --project                      # the 8xH100 projection (a few minutes)
    python bench/frontier_recipe.py --compare --steps 200 --seeds 1 2   # the page's table (~15 minutes, 1 thread)

--project: one process times the full-size preset (11 x 512, MLP 4x, vocabulary 8192, two lanes from layer 8)
with the real train_gpt.TrainStep on random tokens, its plain and its looped order taking turns step by step
(bench/loop_step_time.py's time_orders), and projects: the plain step at #1855's 96 ms on 8xH100, the looped one
at that times the CPU ratio, the loop switched on at ENABLE_LOOPING_AT of the training clock (600 s less the
export's GPTQ_RESERVE_SECONDS); the evaluation's parts from the same FLOP scaling as bench/eval_throughput.py.
scripts/gpu_check.py --recipe frontier gives the same projection from step times measured on the GPU.

--compare: real train_gpt.py processes on the demo's corpus (bench/recipe_ablation.py's), the demo's shape
(4 x 128, sequence 256, 2,048 tokens a step), same steps, data and seeds: today's defaults (warm-down a third of
the run, as the demo runs them) against RECIPE=frontier with the dimensions, the loop's span (layers 1-2 three
times) and the lanes' start (layer 3) given by hand. The figure: BPB after the int6 round trip at stride 64.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("OMP_NUM_THREADS", "1")
for folder in (REPO, REPO / "records", REPO / "bench"):
    sys.path.insert(0, str(folder))

import torch  # noqa: E402

import log_format  # noqa: E402
import train_gpt  # noqa: E402
from loop_step_time import RECORD_PLAIN_MS, matmul_weights_per_token, projected_steps, time_orders  # noqa: E402
from recipe_ablation import COMMON, CONFIGS, prepare_corpus  # noqa: E402

# The evaluation's parts, from bench/eval_throughput.py's projection (docs/gpu_check.md, 2026-12-02): the default
# 11-layer model's base pass at stride 64 on 8xH100 (FLOP-scaled from a record's measured 155 s), startup and
# warm-up assumed; and the phased pass's time as a multiple of the base pass (measured there on the CPU, per
# token, times the tokens it puts through the model at seq 2048 with documents of FineWeb's mean length).
DEFAULT_BASE_PASS_S, STARTUP_S, WARM_UP_S, PHASED_OVER_BASE = 189.0, 20.0, 60.0, 1.50
RECORD_SECONDS = 600.0


def forward_flops_per_token(cfg: train_gpt.ModelConfig, seq_len: int, looped: bool) -> float:
    """2 x the matrix weights a token passes through in the order's virtual layers, plus causal attention."""
    return 2 * matmul_weights_per_token(cfg, looped) + 2 * len(cfg.layer_order(looped)) * seq_len * cfg.model_dim


def projection(s: train_gpt.Settings, plain_ms: float, looped_ms: float, base_pass_s: float | None = None) -> dict:
    """Training steps in 600 s on 8xH100 (the loop switch included) and the legal evaluation's parts with phased
    TTT. base_pass_s: the preset's sliding base pass over the whole validation stream on 8 GPUs, when measured
    (gpu_check); else FLOP-scaled from the default model's projected one."""
    cfg = train_gpt.ModelConfig.from_settings(s)
    train_s = RECORD_SECONDS - s.gptq_reserve_seconds  # the export's calibration runs inside the cap
    switch = s.enable_looping_at if s.num_loops else 1.0
    before, steps = projected_steps(train_s, switch, plain_ms, looped_ms)
    if base_pass_s is None:
        default = train_gpt.ModelConfig.from_settings(train_gpt.Settings())
        base_pass_s = DEFAULT_BASE_PASS_S * forward_flops_per_token(cfg, s.train_seq_len, True) / \
            forward_flops_per_token(default, train_gpt.Settings().train_seq_len, False)
    evaluation = {"startup": STARTUP_S, "warm_up_and_hints": WARM_UP_S, "ttt_phased": PHASED_OVER_BASE * base_pass_s}
    return {"train_seconds": train_s, "plain_ms": plain_ms, "looped_ms": looped_ms, "switch_at": switch,
            "steps_before_switch": round(before), "steps": round(steps), "base_pass_s": round(base_pass_s, 1),
            "eval_parts_s": {k: round(v, 1) for k, v in evaluation.items()},
            "eval_total_s": round(sum(evaluation.values()), 1)}


def projection_lines(p: dict, source: str) -> list[str]:
    parts = " ".join(f"{k}_s:{v:.0f}" for k, v in p["eval_parts_s"].items())
    return [f"frontier_train_projection plain_ms:{p['plain_ms']:.1f} looped_ms:{p['looped_ms']:.1f} train_s:"
            f"{p['train_seconds']:.0f} switch_at:{p['switch_at']} steps_before_switch:{p['steps_before_switch']} "
            f"steps:{p['steps']} # 8xH100; step times {source}; the clock decides the switch (#1855: 4,931 steps, "
            "the loop from step 2,178)",
            f"frontier_eval_projection {parts} total_s:{p['eval_total_s']:.0f} base_pass_s:{p['base_pass_s']:.0f} # "
            f"8xH100, phased TTT at {PHASED_OVER_BASE}x the base pass (bench/eval_throughput.py's CPU ratio at "
            f"FineWeb's mean document), startup {STARTUP_S:.0f} s and warm-up {WARM_UP_S:.0f} s assumed; #1855 "
            "measured 455-509 s for its whole evaluation"]


def cpu_projection(steps: int, seq_len: int, batch_tokens: int) -> None:
    s = train_gpt.Settings.from_env({"RECIPE": "frontier", "TRAIN_SEQ_LEN": str(seq_len),
                                     "TRAIN_BATCH_TOKENS": str(batch_tokens), "GRAD_ACCUM_STEPS": "1",
                                     "MAX_WALLCLOCK_SECONDS": "0", "DEVICE": "cpu"})
    r = time_orders("frontier", s, steps)
    full = train_gpt.Settings.from_env({"RECIPE": "frontier"})
    print(f"frontier_cpu_step threads:{torch.get_num_threads()} cpu:{train_gpt.log_value(train_gpt.cpu_name())} "
          f"seq_len:{seq_len} batch_tokens:{batch_tokens} plain_ms:{r['plain_ms']:.0f} looped_ms:{r['looped_ms']:.0f} "
          f"ratio:{r['ratio']:.3f} matmul_flops_ratio:{r['flops_ratio']:.3f} steps:{steps} precision:fp32")
    for line in projection_lines(projection(full, RECORD_PLAIN_MS, RECORD_PLAIN_MS * r["ratio"]),
                                 f"#1855's plain {RECORD_PLAIN_MS:.0f} ms, looped x the CPU ratio {r['ratio']:.3f}"):
        print(line)


# ----------------------------------------------------------------------------------------------
# --compare: the preset against today's defaults at the demo's shape

DEMO = {**CONFIGS["demo"], "VOCAB_SIZE": 1024, "DEVICE": "cpu", "TRAIN_BATCH_TOKENS": 2048, "GRAD_ACCUM_STEPS": 1,
        "WARMUP_STEPS": 0, "VAL_LOSS_EVERY": 0, "MAX_WALLCLOCK_SECONDS": 0, "EVAL_STRIDE": 64,
        "VAL_MAX_TOKENS": COMMON["VAL_MAX_TOKENS"], "GPTQ_CALIBRATION_TOKENS": 8192, "ZSTD_LEVEL": 3,
        "GPTQ_RESERVE_SECONDS": 0, "AUTOCAST_BF16": 0}
VARIANTS = {
    "defaults": lambda steps: {"WARMDOWN_ITERS": steps // 3, "SWA_EVERY": 10},  # as the demo runs them
    "frontier": lambda steps: {"RECIPE": "frontier", "LOOP_START": 1, "LOOP_END": 2, "PARALLEL_RESIDUAL_START": 3},
}


def compare_run(out: Path, variant: str, seed: int, steps: int) -> dict:
    data, tokenizer = prepare_corpus(out)
    run_id = f"{variant}_seed{seed}_steps{steps}"
    env = {**DEMO, **VARIANTS[variant](steps), "SEED": seed, "ITERATIONS": steps, "TRAIN_LOG_EVERY": steps,
           "DATA_PATH": data, "TOKENIZER_PATH": tokenizer, "OUTPUT_DIR": out / "runs" / run_id, "RUN_ID": run_id}
    (out / "runs" / run_id / "logs" / f"{run_id}.txt").unlink(missing_ok=True)
    done = subprocess.run([sys.executable, "train_gpt.py"], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **{k: str(v) for k, v in env.items()}})
    if done.returncode:
        raise SystemExit(f"frontier_recipe: {run_id} failed:\n{done.stderr[-2000:]}")
    final = log_format.last_line(done.stdout, "final_int6_zstd_roundtrip_exact").fields
    trained = log_format.last_line(done.stdout, "train_done").fields
    return {"key": run_id, "variant": variant, "seed": seed, "steps": steps, "val_bpb": float(final["val_bpb"]),
            "step_ms": float(trained["step_avg"].removesuffix("ms"))}


def compare(out: Path, steps: int, seeds: list[int]) -> None:
    path = out / "results.jsonl"
    results = {r["key"]: r for r in map(json.loads, path.read_text().splitlines())} if path.is_file() else {}
    for seed in seeds:
        for variant in VARIANTS:
            key = f"{variant}_seed{seed}_steps{steps}"
            if key not in results:
                results[key] = compare_run(out, variant, seed, steps)
                with path.open("a") as f:
                    f.write(json.dumps(results[key]) + "\n")
            r = results[key]
            print(f"frontier_compare variant:{variant} seed:{seed} steps:{steps} val_bpb:{r['val_bpb']:.4f} "
                  f"step_ms:{r['step_ms']:.0f}", flush=True)
    bpb = {v: [results[f"{v}_seed{s}_steps{steps}"]["val_bpb"] for s in seeds] for v in VARIANTS}
    noise = max(abs(a - b) for a, b in zip(bpb["defaults"], bpb["defaults"][1:])) if len(seeds) > 1 else 0.0
    delta = statistics.mean(bpb["frontier"]) - statistics.mean(bpb["defaults"])
    print(f"frontier_compare_summary steps:{steps} seeds:{','.join(map(str, seeds))} defaults_mean:"
          f"{statistics.mean(bpb['defaults']):.4f} frontier_mean:{statistics.mean(bpb['frontier']):.4f} "
          f"delta:{delta:+.4f} seed_noise_defaults:{noise:.4f} not_worse_beyond_noise:{int(delta <= noise)} # noise: "
          "the spread of today's defaults over the seeds")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", action="store_true", help="the 8xH100 projection from CPU step-time ratios")
    parser.add_argument("--compare", action="store_true", help="the preset against the defaults at the demo's shape")
    parser.add_argument("--steps", type=int, default=200, help="--compare: training steps (--project: timed rounds 3)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seq-len", type=int, default=256, help="--project: the timed steps' sequence")
    parser.add_argument("--batch-tokens", type=int, default=2048, help="--project: the timed steps' tokens")
    parser.add_argument("--out", default="frontier_recipe_out")
    args = parser.parse_args()
    if not (args.project or args.compare):
        parser.error("give --project, --compare or both")
    if args.project:
        cpu_projection(3, args.seq_len, args.batch_tokens)
    if args.compare:
        out = Path(args.out).resolve()
        out.mkdir(parents=True, exist_ok=True)
        compare(out, args.steps, args.seeds)


if __name__ == "__main__":
    main()
