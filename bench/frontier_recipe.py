"""RECIPE=frontier measured on the CPU (docs/frontier_recipe.md): its 8xH100 time, projected from CPU step-time
ratios, and its BPB at a CPU size against today's defaults at that size.

    python bench/frontier_recipe.py --project                      # the 8xH100 projection (a few minutes)
    python bench/frontier_recipe.py --compare --steps 200 --seeds 1 2   # the page's table (~15 minutes, 1 thread)
    python bench/frontier_recipe.py --compare --variants defaults frontier ema_over_the_run   # a wrong preset too

--project: one process times the full-size preset (11 x 512, MLP 4x, vocabulary 8192, two lanes from layer 8)
with the real train_gpt.TrainStep on random tokens, its plain and its looped order taking turns step by step
(bench/loop_step_time.py's time_orders), and projects: the plain step at #1855's 96 ms on 8xH100, the looped one
at that times the CPU ratio, the loop switched on at ENABLE_LOOPING_AT of the training clock (600 s less the
export's GPTQ_RESERVE_SECONDS); the evaluation's parts from the same FLOP scaling as bench/eval_throughput.py, over
the validation stream in the preset's own tokenization (SP8192 with case operators: 47,851,520 targets, #1855's
logs), the phased pass's multiple of the base pass scaled to that stream's mean document.
scripts/gpu_check.py --recipe frontier gives the same projection from step times measured on the GPU.

--compare: real train_gpt.py processes on the demo's corpus (bench/recipe_ablation.py's), the demo's shape
(4 x 128, sequence 256, 2,048 tokens a step), same steps, data and seeds: today's defaults (warm-down a third of
the run, as the demo runs them) against RECIPE=frontier with the dimensions, the loop's span (layers 1-2 three
times) and the lanes' start (layer 3) given by hand. The figure: BPB after the int6 round trip at stride 64. The
rule (seed_noise_verdict, also tests/test_frontier_recipe.py's at a smaller size): the preset is not worse beyond
the noise of the seeds when its mean BPB less the defaults' is at most the defaults' spread over the seeds.
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
for folder in (REPO, REPO / "records", REPO / "bench", REPO / "data"):
    sys.path.insert(0, str(folder))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import case_ops  # noqa: E402
import log_format  # noqa: E402
import phased_ttt  # noqa: E402
import train_gpt  # noqa: E402
from eval_throughput import FINEWEB_DOC_TOKENS, PHASED  # noqa: E402
from loop_step_time import RECORD_PLAIN_MS, matmul_weights_per_token, projected_steps, time_orders  # noqa: E402
from recipe_ablation import COMMON, CONFIGS, prepare_corpus  # noqa: E402

# The evaluation's parts, from bench/eval_throughput.py's projection (docs/gpu_check.md, 2026-12-02): the default
# 11-layer model's base pass over sp1024's validation targets at stride 64 on 8xH100 (FLOP-scaled from a record's
# measured 155 s), startup and warm-up assumed; and the phased pass's time as a multiple of the base pass (measured
# there on the CPU, per token, times the tokens it puts through the model at seq 2048, 32-token document chunks,
# with every document of FineWeb's mean length in sp1024 tokens, FINEWEB_DOC_TOKENS).
DEFAULT_BASE_PASS_S, STARTUP_S, WARM_UP_S, PHASED_OVER_BASE = 189.0, 20.0, 60.0, 1.50
RECORD_SECONDS = 600.0

# The validation stream's scored targets (its first VALIDATION_DOCS documents, trimmed to a multiple of 2048) in
# each tokenization a public run printed them for: (vocabulary, tokenization as the training log's data line names
# it) -> (targets, where the count comes from). Another tokenization is counted as sp1024's, and the line says so.
VALIDATION_TARGETS = {
    (1024, train_gpt.PLAIN_TOKENIZATION): (62_021_632, "SPEC section 3"),
    (8192, case_ops.NAME): (47_851_520, "#1855's train_seed*.log val_tokens, SP8192 with case operators"),
}
FALLBACK_STREAM = (1024, train_gpt.PLAIN_TOKENIZATION)
VALIDATION_DOCS = 50_000  # SPEC section 3; #1855's logs: ttt_phased total_docs:50000
PRESET_TOKENIZATION = case_ops.NAME  # the data the preset's 8192 vocabulary is meant with (#1729, #1855; docs/caseops.md)


def validation_stream(vocab: int, tokenization: str) -> tuple[int, str]:
    """(the stream's scored targets, where the count comes from): an unknown tokenization is counted as sp1024's, more
    than a larger vocabulary's stream holds, and the source says so."""
    if (vocab, tokenization) in VALIDATION_TARGETS:
        return VALIDATION_TARGETS[(vocab, tokenization)]
    targets, source = VALIDATION_TARGETS[FALLBACK_STREAM]
    return targets, (f"no count for vocabulary {vocab} {tokenization}: sp1024's ({source}), an upper bound for a "
                     "larger vocabulary")


def phased_over_base(doc_tokens: int, seq_len: int) -> float:
    """PHASED_OVER_BASE for documents of doc_tokens tokens: the phased pass puts a document's chunks through the model
    with their growing windows, so its tokens per target follow the document's length in tokens; the base pass's
    stay seq_len / 64. Equal to PHASED_OVER_BASE at FINEWEB_DOC_TOKENS."""
    per_target = lambda length: phased_ttt.window_tokens(np.array([length]), PHASED.doc_chunk_tokens, seq_len) / length
    return PHASED_OVER_BASE * per_target(doc_tokens) / per_target(FINEWEB_DOC_TOKENS)


def forward_flops_per_token(cfg: train_gpt.ModelConfig, seq_len: int, looped: bool) -> float:
    """2 x the matrix weights a token passes through in the order's virtual layers, plus causal attention."""
    return 2 * matmul_weights_per_token(cfg, looped) + 2 * len(cfg.layer_order(looped)) * seq_len * cfg.model_dim


def projection(s: train_gpt.Settings, plain_ms: float, looped_ms: float, tokenization: str,
               base_tokens_per_s: float | None = None) -> dict:
    """Training steps in 600 s on 8xH100 (the loop switch included) and the legal evaluation's parts with phased
    TTT, over the validation stream in the run's vocabulary and tokenization. base_tokens_per_s: the preset's
    sliding base pass's rate on 8 GPUs, when measured (gpu_check); else its time FLOP-scaled from the default
    model's projected one, and by the stream's targets."""
    cfg = train_gpt.ModelConfig.from_settings(s)
    train_s = RECORD_SECONDS - s.gptq_reserve_seconds  # the export's calibration runs inside the cap
    switch = s.enable_looping_at if s.num_loops else 1.0
    before, steps = projected_steps(train_s, switch, plain_ms, looped_ms)
    targets, source = validation_stream(s.vocab_size, tokenization)
    if base_tokens_per_s is None:
        default = train_gpt.ModelConfig.from_settings(train_gpt.Settings())
        base_tokens_per_s = VALIDATION_TARGETS[FALLBACK_STREAM][0] / DEFAULT_BASE_PASS_S * \
            forward_flops_per_token(default, train_gpt.Settings().train_seq_len, False) / \
            forward_flops_per_token(cfg, s.train_seq_len, True)
    base_pass_s = targets / base_tokens_per_s
    doc_tokens = targets // VALIDATION_DOCS
    phased = phased_over_base(doc_tokens, s.train_seq_len)
    evaluation = {"startup": STARTUP_S, "warm_up_and_hints": WARM_UP_S, "ttt_phased": phased * base_pass_s}
    return {"train_seconds": train_s, "plain_ms": plain_ms, "looped_ms": looped_ms, "switch_at": switch,
            "steps_before_switch": round(before), "steps": round(steps), "validation_targets": targets,
            "targets_source": source, "doc_tokens": doc_tokens, "phased_over_base": round(phased, 3),
            "base_pass_s": round(base_pass_s, 1), "eval_parts_s": {k: round(v, 1) for k, v in evaluation.items()},
            "eval_total_s": round(sum(evaluation.values()), 1)}


def projection_lines(p: dict, source: str) -> list[str]:
    parts = " ".join(f"{k}_s:{v:.0f}" for k, v in p["eval_parts_s"].items())
    return [f"frontier_train_projection plain_ms:{p['plain_ms']:.1f} looped_ms:{p['looped_ms']:.1f} train_s:"
            f"{p['train_seconds']:.0f} switch_at:{p['switch_at']} steps_before_switch:{p['steps_before_switch']} "
            f"steps:{p['steps']} # 8xH100; step times {source}; the clock decides the switch (#1855: 4,931 steps, "
            "the loop from step 2,178)",
            f"frontier_eval_projection {parts} total_s:{p['eval_total_s']:.0f} base_pass_s:{p['base_pass_s']:.0f} "
            f"val_targets:{p['validation_targets']} doc_tokens:{p['doc_tokens']} phased_x:{p['phased_over_base']:.2f} "
            f"# 8xH100; targets: {p['targets_source']}; phased TTT at {PHASED_OVER_BASE:.2f}x the base pass at "
            f"sp1024's {FINEWEB_DOC_TOKENS}-token mean document (bench/eval_throughput.py's CPU ratio, "
            f"{PHASED.doc_chunk_tokens}-token chunks, rank {PHASED.rank_r}), scaled to this stream's mean document; "
            "assumed: every document of the mean length (the spread makes it more), a GPU using short chunks as well "
            f"as a CPU, startup {STARTUP_S:.0f} s, warm-up and hints {WARM_UP_S:.0f} s; #1855 measured 455-509 s for "
            "its whole evaluation"]


def cpu_projection(steps: int, seq_len: int, batch_tokens: int) -> None:
    s = train_gpt.Settings.from_env({"RECIPE": "frontier", "TRAIN_SEQ_LEN": str(seq_len),
                                     "TRAIN_BATCH_TOKENS": str(batch_tokens), "GRAD_ACCUM_STEPS": "1",
                                     "MAX_WALLCLOCK_SECONDS": "0", "DEVICE": "cpu"})
    r = time_orders("frontier", s, steps)
    full = train_gpt.Settings.from_env({"RECIPE": "frontier"})
    print(f"frontier_cpu_step threads:{torch.get_num_threads()} cpu:{train_gpt.log_value(train_gpt.cpu_name())} "
          f"seq_len:{seq_len} batch_tokens:{batch_tokens} plain_ms:{r['plain_ms']:.0f} looped_ms:{r['looped_ms']:.0f} "
          f"ratio:{r['ratio']:.3f} matmul_flops_ratio:{r['flops_ratio']:.3f} steps:{steps} precision:fp32")
    for line in projection_lines(projection(full, RECORD_PLAIN_MS, RECORD_PLAIN_MS * r["ratio"], PRESET_TOKENIZATION),
                                 f"#1855's plain {RECORD_PLAIN_MS:.0f} ms, looped x the CPU ratio {r['ratio']:.3f}"):
        print(line)


# ----------------------------------------------------------------------------------------------
# --compare: the preset against today's defaults at the demo's shape

# What the two variants share at any CPU size: everything but the shape, the data and the validation slice
COMPARE_COMMON = {"DEVICE": "cpu", "GRAD_ACCUM_STEPS": 1, "WARMUP_STEPS": 0, "VAL_LOSS_EVERY": 0,
                  "MAX_WALLCLOCK_SECONDS": 0, "EVAL_STRIDE": 64, "GPTQ_CALIBRATION_TOKENS": 8192, "ZSTD_LEVEL": 3,
                  "GPTQ_RESERVE_SECONDS": 0, "AUTOCAST_BF16": 0}
DEMO = {**CONFIGS["demo"], **COMPARE_COMMON, "VOCAB_SIZE": 1024, "TRAIN_BATCH_TOKENS": 2048,
        "VAL_MAX_TOKENS": COMMON["VAL_MAX_TOKENS"]}
# Each variant's own settings for a run of `steps` steps; the shape comes from the base, and the preset's loop
# span and lanes' start, which name layers, from the shape (PRESET_LAYERS_BY_DEPTH). ema_over_the_run: a preset made
# wrong on purpose (its EMA's time constant the whole run, so the export keeps ~1/e of the initial weights), to show
# that the comparison's rule can fail; run only when named (--variants).
VARIANTS = {
    "defaults": lambda steps: {"WARMDOWN_ITERS": steps // 3, "SWA_EVERY": 10},  # as the demo runs them
    "frontier": lambda steps: {"RECIPE": "frontier"},
    "ema_over_the_run": lambda steps: {"RECIPE": "frontier", "EMA_HORIZON": 1.0},
}
COMPARED = ("defaults", "frontier")
# The preset's layer-naming settings by hand at a CPU depth: a loop over the middle, the lanes after it
PRESET_LAYERS_BY_DEPTH = {
    2: {"LOOP_START": 0, "LOOP_END": 0, "PARALLEL_RESIDUAL_START": 1},
    4: {"LOOP_START": 1, "LOOP_END": 2, "PARALLEL_RESIDUAL_START": 3},
}


def train_variant(base: dict, variant: dict, seed: int, steps: int, out_dir: Path) -> dict:
    """One train_gpt.py process with base's settings, then variant's, for `steps` steps; its BPB after the int6
    round trip (at base's stride and validation slice) and its mean step time."""
    env = {**base, **variant, "SEED": seed, "ITERATIONS": steps, "TRAIN_LOG_EVERY": steps, "OUTPUT_DIR": out_dir,
           "RUN_ID": out_dir.name}
    (out_dir / "logs" / f"{out_dir.name}.txt").unlink(missing_ok=True)
    done = subprocess.run([sys.executable, "train_gpt.py"], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **{k: str(v) for k, v in env.items()}})
    if done.returncode:
        raise SystemExit(f"frontier_recipe: {out_dir.name} failed:\n{done.stderr[-2000:]}")
    final = log_format.last_line(done.stdout, "final_int6_zstd_roundtrip_exact").fields
    trained = log_format.last_line(done.stdout, "train_done").fields
    return {"val_bpb": float(final["val_bpb"]), "step_ms": float(trained["step_avg"].removesuffix("ms"))}


def variant_settings(variant: str, steps: int, num_layers: int) -> dict:
    own = VARIANTS[variant](steps)
    return {**own, **(PRESET_LAYERS_BY_DEPTH[num_layers] if "RECIPE" in own else {})}


def seed_noise_verdict(bpb: dict[str, list[float]], candidate: str = "frontier", baseline: str = "defaults") -> dict:
    """The rule: the candidate is not worse beyond the noise of the seeds when mean(candidate) - mean(baseline) <=
    noise, noise being the spread of the baseline's BPBs over the seeds (max - min; every variant run on the same
    seeds). The baseline's alone: a candidate that varies more with its seed does not widen its own allowance."""
    noise = max(bpb[baseline]) - min(bpb[baseline])
    delta = statistics.mean(bpb[candidate]) - statistics.mean(bpb[baseline])
    return {"delta": delta, "noise": noise, "not_worse_beyond_noise": delta <= noise}


def compare(out: Path, steps: int, seeds: list[int], variants: list[str]) -> None:
    data, tokenizer = prepare_corpus(out)
    base = {**DEMO, "DATA_PATH": data, "TOKENIZER_PATH": tokenizer}
    path = out / "results.jsonl"
    results = {r["key"]: r for r in map(json.loads, path.read_text().splitlines())} if path.is_file() else {}
    for seed in seeds:
        for variant in variants:
            key = f"{variant}_seed{seed}_steps{steps}"
            if key not in results:
                run = train_variant(base, variant_settings(variant, steps, DEMO["NUM_LAYERS"]), seed, steps,
                                    out / "runs" / key)
                results[key] = {"key": key, "variant": variant, "seed": seed, "steps": steps, **run}
                with path.open("a") as f:
                    f.write(json.dumps(results[key]) + "\n")
            r = results[key]
            print(f"frontier_compare variant:{variant} seed:{seed} steps:{steps} val_bpb:{r['val_bpb']:.4f} "
                  f"step_ms:{r['step_ms']:.0f}", flush=True)
    bpb = {v: [results[f"{v}_seed{s}_steps{steps}"]["val_bpb"] for s in seeds] for v in variants}
    for candidate in (v for v in variants if v != "defaults"):
        print(summary_line(bpb, candidate, steps, seeds), flush=True)


def summary_line(bpb: dict[str, list[float]], candidate: str, steps: int, seeds) -> str:
    verdict = seed_noise_verdict(bpb, candidate)
    return (f"frontier_compare_summary variant:{candidate} steps:{steps} seeds:{','.join(map(str, seeds))} "
            f"defaults_mean:{statistics.mean(bpb['defaults']):.4f} candidate_mean:"
            f"{statistics.mean(bpb[candidate]):.4f} delta:{verdict['delta']:+.4f} seed_noise:{verdict['noise']:.4f} "
            f"not_worse_beyond_noise:{int(verdict['not_worse_beyond_noise'])} # noise: the defaults' spread over the "
            "seeds")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", action="store_true", help="the 8xH100 projection from CPU step-time ratios")
    parser.add_argument("--compare", action="store_true", help="the preset against the defaults at the demo's shape")
    parser.add_argument("--steps", type=int, default=200, help="--compare: training steps (--project: timed rounds 3)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(COMPARED),
                        help="--compare: the variants run (defaults first; each other one compared with it)")
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
        compare(out, args.steps, args.seeds, ["defaults", *(v for v in args.variants if v != "defaults")])


if __name__ == "__main__":
    main()
