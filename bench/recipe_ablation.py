"""The frontier's training-recipe changes, measured side by side on the CPU: the current recipe, each change
alone, and the changes that won here together, on the demo's corpus (the built-in pydoc and docstring
text) at two tiny configurations, same steps, data and seeds. The figure is what train_gpt.py's last
line reports: BPB after the artifact's int6 round trip, at the sliding stride.

    python bench/recipe_ablation.py                      # one seed, the demo's shape, 60 steps: ~3 minutes
    python bench/recipe_ablation.py --configs demo deep --steps 180 120 --seeds 1 2   # docs/recipe.md's table
    python bench/recipe_ablation.py --table-only ...     # the table of runs already saved in --out
    python bench/recipe_ablation.py --pre-bos-fix ...    # the current recipe with the look-back before the BOS fix

Each run is a real `train_gpt.py` process (settings from its environment, as a user would set them); its
result line goes to --out/results.jsonl, and a run already there is not made again. Every recipe setting is
given explicitly, so the "current" row is the recipe before these changes whatever the defaults are now.
"together" is the changes whose mean BPB over the seeds beat the current recipe in every configuration run.
The step-time cost of each variant is measured in this process, all variants taking turns on random tokens
(train_gpt.TrainStep, the EMA's update included), as a ratio to the current recipe: load on a shared machine
then weighs on every variant alike. Set OMP_NUM_THREADS (default here: 1) and run it under `nice`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("OMP_NUM_THREADS", "1")
for folder in (REPO, REPO / "records", REPO / "bench"):
    sys.path.insert(0, str(folder))

import torch  # noqa: E402

import log_format  # noqa: E402
import train_gpt  # noqa: E402
from train_throughput import RandomTokens, model_flops_per_token  # noqa: E402

# ----------------------------------------------------------------------------------------------
# What is compared
# The configurations share the demo's corpus and its schedule shape (warm-down a third of the run, SWA
# every 10 steps, half the default learning rates); they differ in shape and context length.

CONFIGS = {
    # the demo's model (scripts/demo.py), with half its batch
    "demo": {"NUM_LAYERS": 4, "MODEL_DIM": 128, "NUM_HEADS": 4, "NUM_KV_HEADS": 2, "BIGRAM_VOCAB_SIZE": 2048,
             "BIGRAM_DIM": 64, "TRAIN_SEQ_LEN": 256},
    # deeper and narrower, with 48-wide heads and half the context
    "deep": {"NUM_LAYERS": 6, "MODEL_DIM": 96, "NUM_HEADS": 2, "NUM_KV_HEADS": 1, "BIGRAM_VOCAB_SIZE": 1024,
             "BIGRAM_DIM": 32, "TRAIN_SEQ_LEN": 128},
}
COMMON = {"VOCAB_SIZE": 1024, "DEVICE": "cpu", "MLP_MULT": 3, "TRAIN_BATCH_TOKENS": 2048, "GRAD_ACCUM_STEPS": 1,
          "WARMUP_STEPS": 0, "SWA_EVERY": 10, "VAL_LOSS_EVERY": 0, "MATRIX_LR": 0.0125, "SCALAR_LR": 0.0125,
          "TIED_EMBED_LR": 0.02, "MAX_WALLCLOCK_SECONDS": 0, "EVAL_STRIDE": 64, "VAL_MAX_TOKENS": 16384,
          "GPTQ_CALIBRATION_TOKENS": 8192, "ZSTD_LEVEL": 3}  # zstd's level changes bytes, never the BPB
VAL_DOCS = 80  # the demo's split: the first 80 built-in documents are validation

# The recipe before these changes: every change off.
CURRENT = {"MLP_LEAKY_SLOPE": 0, "XSA_LAST_LAYERS": 0, "ROPE_DIMS": 0, "LAYER_NORM_SCALE": 0, "ATTN_OUTPUT_GATE": 0,
           "VALUE_RESIDUAL_ALPHA": 1, "EMA_DECAY": 0}
RECORD_EMA_DECAY, RECORD_STEPS = 0.997, 7051  # 8xH100 records: EMA 0.997 every step over ~7,000 steps


def scaled_ema_decay(steps: int) -> float:
    """The records' 0.997 over ~7,000 steps averages the last ~5% of the run; the same share of a short run (0.997
    itself would keep half the initial weights after 200 steps)."""
    return round(1 - (1 - RECORD_EMA_DECAY) * RECORD_STEPS / steps, 4)


@dataclasses.dataclass(frozen=True)
class Change:
    name: str
    settings: object  # (config env, steps) -> the settings that turn it on
    gpu: str  # what the 8xH100 records measured (docs/recipe.md cites them)


CHANGES = (
    Change("leaky_relu2", lambda c, n: {"MLP_LEAKY_SLOPE": 0.5}, "-0.003 (#493, #549), -0.0024 (#1859), -0.0045 (#784)"),
    Change("xsa_all_layers", lambda c, n: {"XSA_LAST_LAYERS": c["NUM_LAYERS"]},
           "-0.010 last 4 (#784); all -0.006 vs last 4 (#638)"),
    Change("partial_rope_ln_scale", lambda c, n: {"ROPE_DIMS": c["MODEL_DIM"] // c["NUM_HEADS"] // 4,
                                                  "LAYER_NORM_SCALE": 1}, "-0.0023 (record 2026-03-21: 1.1271 -> 1.1248)"),
    Change("ema", lambda c, n: {"EMA_DECAY": scaled_ema_decay(n)}, "-0.0006 beside SWA (record 2026-03-22, 1.1233)"),
    Change("attn_output_gate", lambda c, n: {"ATTN_OUTPUT_GATE": 1}, "-0.0010 (#1859)"),
    Change("value_residual", lambda c, n: {"VALUE_RESIDUAL_ALPHA": 0.9}, "-0.0010 (#1859)"),
)


# --pre-bos-fix: train_gpt.py run with SmearGate and BigramHash looking back across a document's BOS, as they did
# before the fix (the fix is no setting: it is always on). Only for this comparison.
PRE_BOS_FIX_RUNNER = """
import torch, torch.nn.functional as F, train_gpt
def smear_across_documents(self, x, idx):
    g = torch.sigmoid(self.gate.to(x.dtype))
    return (1 - g) * x + g * F.pad(x[:, :-1], (0, 0, 1, 0))
def buckets_across_documents(self, idx):
    hashed = (idx[:, :-1] * self.vocab_size + idx[:, 1:]) * 2654435761 % (1 << 32) % (self.num_buckets - 1) + 1
    return F.pad(hashed, (1, 0), value=0)
train_gpt.SmearGate.forward, train_gpt.BigramHash.buckets = smear_across_documents, buckets_across_documents
train_gpt.run_main(lambda: train_gpt.train(train_gpt.Settings.from_env()), "train_gpt.py")
"""
PRE_BOS_FIX = ("pre_bos_fix",)  # a variant name, not a change: the rows of --pre-bos-fix


def variant_settings(variant: tuple[str, ...], config: dict, steps: int) -> dict:
    env = dict(CURRENT)
    for change in CHANGES:
        if change.name in variant:
            env.update(change.settings(config, steps))
    return env


def variant_name(variant: tuple[str, ...]) -> str:
    return "current" if not variant else variant[0] if len(variant) == 1 else "together:" + "+".join(variant)

# ----------------------------------------------------------------------------------------------
# Runs

def prepare_corpus(out: Path) -> tuple[Path, Path]:
    data, tokenizer = out / "datasets", out / "tokenizer.model"
    if not (data / train_gpt.MANIFEST_NAME).is_file():
        subprocess.run([sys.executable, "data/prepare.py", "--builtin", "--vocab-size", "1024", "--val-docs",
                        str(VAL_DOCS), "--out-dir", str(data), "--tokenizer-out", str(tokenizer)], cwd=REPO, check=True)
    return data, tokenizer


def run_key(config: str, variant: tuple[str, ...], seed: int, steps: int) -> str:
    return f"{config}/{variant_name(variant)}/seed{seed}/steps{steps}"


def train_run(out: Path, config: str, variant: tuple[str, ...], seed: int, steps: int, bf16: bool) -> dict:
    data, tokenizer = prepare_corpus(out)
    key = run_key(config, variant, seed, steps)
    run_id = key.replace("/", "_").replace(":", "_").replace("+", "_")
    env = {**COMMON, **CONFIGS[config], **variant_settings(variant, CONFIGS[config], steps), "SEED": seed,
           "ITERATIONS": steps, "WARMDOWN_ITERS": steps // 3, "MUON_MOMENTUM_WARMUP_STEPS": steps // 4,
           "TRAIN_LOG_EVERY": steps, "AUTOCAST_BF16": int(bf16), "DATA_PATH": data, "TOKENIZER_PATH": tokenizer,
           "OUTPUT_DIR": out / "runs" / run_id, "RUN_ID": run_id}
    log_path = out / "runs" / run_id / "logs" / f"{run_id}.txt"
    log_path.unlink(missing_ok=True)
    command = ["-c", PRE_BOS_FIX_RUNNER] if variant == PRE_BOS_FIX else ["train_gpt.py"]
    done = subprocess.run([sys.executable, *command], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **{k: str(v) for k, v in env.items()}})
    if done.returncode:
        raise SystemExit(f"recipe_ablation: {key} failed:\n{done.stderr[-2000:]}")
    final = log_format.last_line(done.stdout, "final_int6_zstd_roundtrip_exact").fields
    trained = log_format.last_line(done.stdout, "train_done").fields
    return {"key": key, "config": config, "variant": list(variant), "seed": seed, "steps": steps,
            "val_bpb": float(final["val_bpb"]), "step_ms": float(trained["step_avg"].removesuffix("ms")),
            "settings": {k: str(v) for k, v in env.items() if k in CURRENT}}


def load_results(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    return {r["key"]: r for r in map(json.loads, path.read_text().splitlines())}

# ----------------------------------------------------------------------------------------------
# Step time: every variant takes turns, on random tokens, in this one process

def step_time_ratios(config: str, variants: list[tuple[str, ...]], steps: int, bf16: bool,
                     rounds: int = 5, steps_per_round: int = 3) -> dict[str, float]:
    """Median step time of each variant over `rounds` turns, as a ratio to the current recipe's."""
    rt = train_gpt.Runtime(0, 1, 0, torch.device("cpu"), False, bf16)
    trainers = {}
    for variant in variants:
        env = {**COMMON, **CONFIGS[config], **variant_settings(variant, CONFIGS[config], steps)}
        s = train_gpt.Settings.from_env({k: str(v) for k, v in env.items()})
        torch.manual_seed(0)
        model = train_gpt.GPT(train_gpt.ModelConfig.from_settings(s))
        ema = train_gpt.MovingAverage(model, s.ema_decay) if s.ema_decay else None
        trainers[variant] = (train_gpt.TrainStep(s, rt, model, RandomTokens(s.vocab_size)), model, ema)
    times = {v: [] for v in variants}
    for r in range(rounds + 1):  # the first round warms up and is not counted
        for variant, (train_step, model, ema) in trainers.items():
            t0 = time.perf_counter()
            for i in range(steps_per_round):
                train_step(i + 1, 0.0)[0].item()
                if ema is not None:
                    ema.update(model)
            if r:
                times[variant].append((time.perf_counter() - t0) / steps_per_round)
    base = statistics.median(times[()])
    return {variant_name(v): statistics.median(t) / base for v, t in times.items()}

# ----------------------------------------------------------------------------------------------
# 8xH100: each change's extra work on the default 11-layer model, per token of training (forward and backward
# taken as 3x the forward), as matmul-like FLOPs and as activation bytes its element-wise operations move when
# not fused (an upper bound: torch.compile fuses many). Projected onto the records' step: 85 ms for 786,432
# tokens on 8 GPUs (the 2026-03-21 record: 7,051 steps in 600 s), at the same utilisation for FLOPs, and at
# H100 SXM's 3.35 TB/s of memory bandwidth for the bytes.

RECORD_STEP_MS, RECORD_TOKENS_PER_GPU, HBM_BYTES_PER_S, BF16 = 85.0, 786_432 // 8, 3.35e12, 2


def extra_work_per_token(name: str, cfg: train_gpt.ModelConfig, params: int, step_tokens: int) -> tuple[float, float]:
    """(FLOPs, bytes) a change adds per training token, at the change's record setting on cfg's shape."""
    L, C, H, Hkv = cfg.num_layers, cfg.model_dim, cfg.num_heads, cfg.num_kv_heads
    D = C // H
    work = {  # forward (FLOPs, bytes per token), all layers; x3 below for the backward
        "leaky_relu2": (0.0, 0.0),  # leaky_relu in place of relu: the same element-wise pass
        "xsa_all_layers": (L * (4 * H * D + 3 * Hkv * D), L * BF16 * (2 * H * D + 3 * Hkv * D)),
        "partial_rope_ln_scale": (L * 2 * C, L * BF16 * 4 * C),  # the scale's multiply; partial RoPE does less
        "ema": (3 * params / step_tokens, 12 * params / step_tokens),  # fp32 lerp (read 2, write 1) a step, a GPU
        "attn_output_gate": (L * (2 * C * H + 2 * H * D), L * BF16 * (C + 3 * H * D)),
        "value_residual": ((L - 1) * 3 * Hkv * D, (L - 1) * BF16 * 3 * Hkv * D),
    }[name]
    return (work[0] * 3, work[1] * 3) if name != "ema" else work


def h100_projection() -> str:
    s = train_gpt.Settings()
    cfg = dataclasses.replace(train_gpt.ModelConfig.from_settings(s), **{
        "mlp_leaky_slope": 0.0, "xsa_last_layers": 0, "rope_dims": 0, "layer_norm_scale": False,
        "attn_output_gate": False, "value_residual_alpha": 1.0})
    base = model_flops_per_token(cfg, s.train_seq_len)
    params = sum(p.numel() for p in train_gpt.GPT(cfg).parameters())
    lines = ["| change | extra FLOPs / token | share of the model's | ms/step by FLOPs | extra bytes / token "
             "(unfused) | ms/step by bytes |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for change in CHANGES:
        flops, nbytes = extra_work_per_token(change.name, cfg, params, RECORD_TOKENS_PER_GPU)  # each GPU keeps one
        lines.append(f"| {change.name} | {flops:,.0f} | {flops / base:.3%} | {RECORD_STEP_MS * flops / base:.2f} | "
                     f"{nbytes:,.0f} | {1000 * nbytes * RECORD_TOKENS_PER_GPU / HBM_BYTES_PER_S:.2f} |")
    return f"model_flops_per_token:{base:,.0f} (default 11-layer model, sequence {s.train_seq_len})\n" + "\n".join(lines)

# ----------------------------------------------------------------------------------------------
# The table

def mean_delta(results: dict, config: str, variant: tuple[str, ...], seeds: list[int], steps: dict) -> float | None:
    pairs = [(results.get(run_key(config, variant, s, steps[config])), results.get(run_key(config, (), s, steps[config])))
             for s in seeds]
    if not all(a and b for a, b in pairs):
        return None
    return statistics.mean(a["val_bpb"] - b["val_bpb"] for a, b in pairs)


def winners(results: dict, configs: list[str], seeds: list[int], steps: dict) -> tuple[str, ...]:
    """The changes whose mean BPB over the seeds is below the current recipe's in every configuration."""
    won = []
    for change in CHANGES:
        deltas = [mean_delta(results, c, (change.name,), seeds, steps) for c in configs]
        if all(d is not None and d < 0 for d in deltas):
            won.append(change.name)
    return tuple(won)


def table(results: dict, configs: list[str], seeds: list[int], steps: dict, variants: list[tuple[str, ...]],
          ratios: dict[str, dict[str, float]]) -> str:
    head = ["variant"]
    for c in configs:
        head += [f"{c} seed {s}" for s in seeds] + [f"{c} mean delta", f"{c} step time"]
    head.append("8xH100 records")
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(["---"] + ["---:"] * (len(head) - 2) + ["---"]) + " |"]
    gpu = {c.name: c.gpu for c in CHANGES}
    for variant in variants:
        row = [variant_name(variant)]
        for c in configs:
            for s in seeds:
                r = results.get(run_key(c, variant, s, steps[c]))
                row.append(f"{r['val_bpb']:.4f}" if r else "-")
            d = mean_delta(results, c, variant, seeds, steps)
            row.append("-" if d is None or not variant else f"{d:+.4f}")
            ratio = ratios.get(c, {}).get(variant_name(variant))
            row.append("-" if ratio is None else f"{ratio:.3f}")
        row.append(gpu.get(variant[0], "") if len(variant) == 1 else "")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[60], help="one for all configurations, or one each")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--configs", nargs="+", default=["demo"], choices=list(CONFIGS))
    parser.add_argument("--out", type=Path, default=REPO / "data" / "recipe_ablation")
    parser.add_argument("--table-only", action="store_true", help="no runs: the table of what --out holds")
    parser.add_argument("--pre-bos-fix", action="store_true",
                        help="only the current recipe, fixed and as before the BOS fix, for what the fix changes")
    args = parser.parse_args()
    if len(args.steps) not in (1, len(args.configs)):
        parser.error(f"--steps: give one number, or one for each of the {len(args.configs)} configurations")
    steps = dict(zip(args.configs, args.steps * len(args.configs) if len(args.steps) == 1 else args.steps))
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.jsonl"
    results = load_results(results_path)
    bf16, probe = train_gpt.choose_cpu_precision(128, 384, 1)  # chosen once: every run computes alike
    print(f"recipe_ablation steps:{','.join(map(str, steps.values()))} seeds:{','.join(map(str, args.seeds))} configs:{','.join(args.configs)} "
          f"autocast_bf16:{int(bf16)} {probe} cpu_threads:{torch.get_num_threads()} "
          f"cpu:{train_gpt.log_value(train_gpt.cpu_name())} torch:{torch.__version__}", flush=True)

    def ensure(variants):
        for config in args.configs:
            for variant in variants:
                for seed in args.seeds:
                    key = run_key(config, variant, seed, steps[config])
                    if key in results or args.table_only:
                        continue
                    t0 = time.perf_counter()
                    results[key] = train_run(args.out, config, variant, seed, steps[config], bf16)
                    with open(results_path, "a") as f:
                        f.write(json.dumps(results[key]) + "\n")
                    print(f"recipe_run key:{key} val_bpb:{results[key]['val_bpb']:.6f} "
                          f"step_ms:{results[key]['step_ms']:.1f} wall_s:{time.perf_counter() - t0:.0f}", flush=True)

    if args.pre_bos_fix:
        ensure([(), PRE_BOS_FIX])
        print(table(results, args.configs, args.seeds, steps, [(), PRE_BOS_FIX], {}))
        return
    singles = [()] + [(c.name,) for c in CHANGES]
    ensure(singles)
    together = winners(results, args.configs, args.seeds, steps)
    variants = singles + ([together] if len(together) > 1 else [])
    ensure(variants[len(singles):])
    ratios = {} if args.table_only else {c: step_time_ratios(c, variants, steps[c], bf16) for c in args.configs}
    print(f"recipe_winners changes:{','.join(together) or 'none'} # mean BPB below the current recipe's in "
          f"{', '.join(args.configs)}")
    print(table(results, args.configs, args.seeds, steps, variants, ratios))
    print(h100_projection())


if __name__ == "__main__":
    main()
