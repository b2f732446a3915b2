"""Depth recurrence's price in step time (docs/depth_recurrence.md): the looped order against the plain one.

At each width (the default 11 x 512 and the demo's 128, both with 11 layers so that #1855's span 3..5 exists),
one process builds the plain and the looped model from the same weights and times the real train_gpt.TrainStep
(forward, backward, Muon and AdamW) on random tokens, the two orders alternating step by step, so that a shared
machine's load falls on both alike; the ratio of the medians is the figure. Then an 8xH100 projection of the
steps a 600 s run takes with the loop switched on at ENABLE_LOOPING_AT of the wall clock.

    python bench/loop_step_time.py [--steps 4] [--loops 2 --loop-start 3 --loop-end 5] [--switch-at 0.35]
"""

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_gpt  # noqa: E402
from train_throughput import RandomTokens  # noqa: E402

# #1855's training log (SPEC section 12.1): about 96 ms a step unlooped, 141 ms looped, on 8xH100
RECORD_PLAIN_MS, RECORD_LOOPED_MS = 96.0, 141.0
RECORD_STEPS, RECORD_SWITCH_STEP = 4931, 2178  # what that run did: its steps, and the step the loop started at


def matmul_weights_per_token(cfg: train_gpt.ModelConfig, looped: bool) -> int:
    """The matrix weights a token passes through in one forward: each virtual layer's block, and the tied head."""
    block = sum(m.weight.numel() for m in train_gpt.Block(cfg).modules() if isinstance(m, train_gpt.FakeQuantLinear))
    return block * len(cfg.layer_order(looped)) + cfg.vocab_size * cfg.model_dim


def time_orders(name: str, settings: train_gpt.Settings, steps: int) -> dict:
    torch.manual_seed(0)
    cfg = train_gpt.ModelConfig.from_settings(settings)
    rt = train_gpt.Runtime(0, 1, 0, torch.device("cpu"), False, False)
    model = train_gpt.GPT(cfg)
    train_step = train_gpt.TrainStep(settings, rt, model, RandomTokens(settings.vocab_size))
    times = {False: [], True: []}
    for i in range(steps + 1):  # the first round warms both orders up and is not counted
        for looping in (False, True):
            model.looping = looping
            t0 = time.perf_counter()
            train_step(i, 0.0)[0].item()
            if i:
                times[looping].append(1000 * (time.perf_counter() - t0))
    plain, looped = (statistics.median(times[k]) for k in (False, True))
    return {"name": name, "plain_ms": plain, "looped_ms": looped, "ratio": looped / plain,
            "flops_ratio": matmul_weights_per_token(cfg, True) / matmul_weights_per_token(cfg, False),
            "virtual_layers": len(cfg.layer_order()), "layers": cfg.num_layers}


def projected_steps(seconds: float, switch_at: float, plain_ms: float, looped_ms: float) -> tuple[float, float]:
    """(steps before the switch, steps in all) in `seconds` of training whose clock reaches the switch first (on
    8xH100 the wall clock is further along than the step count, so it decides training_progress)."""
    before = switch_at * seconds * 1000 / plain_ms
    return before, before + (1 - switch_at) * seconds * 1000 / looped_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--loops", type=int, default=2)
    parser.add_argument("--loop-start", type=int, default=3)
    parser.add_argument("--loop-end", type=int, default=5)
    parser.add_argument("--switch-at", type=float, default=0.35)
    parser.add_argument("--seconds", type=float, default=600.0, help="the training clock of the projection")
    args = parser.parse_args()
    common = dict(train_seq_len=args.seq_len, train_batch_tokens=args.batch_tokens, grad_accum_steps=1,
                  max_wallclock_seconds=0, device="cpu", num_loops=args.loops, loop_start=args.loop_start,
                  loop_end=args.loop_end)
    configs = {"default_width": dataclasses.replace(train_gpt.Settings(), **common),
               "demo_width": dataclasses.replace(train_gpt.Settings(), model_dim=128, num_heads=4, num_kv_heads=2,
                                                 bigram_vocab_size=2048, bigram_dim=64, **common)}
    print(f"loop_bench threads:{torch.get_num_threads()} torch:{torch.__version__} cpu:{train_gpt.log_value(train_gpt.cpu_name())} "
          f"seq_len:{args.seq_len} batch_tokens:{args.batch_tokens} precision:fp32 steps:{args.steps} "
          f"order:{','.join(map(str, train_gpt.ModelConfig.from_settings(configs['demo_width']).layer_order()))}")
    results = [time_orders(name, s, args.steps) for name, s in configs.items()]
    for r in results:
        print(f"loop_step_time config:{r['name']} layers:{r['layers']} virtual_layers:{r['virtual_layers']} "
              f"plain_ms:{r['plain_ms']:.0f} looped_ms:{r['looped_ms']:.0f} ratio:{r['ratio']:.3f} "
              f"matmul_flops_ratio:{r['flops_ratio']:.3f}")
    plain_steps = args.seconds * 1000 / RECORD_PLAIN_MS
    rows = [("record_step_times", RECORD_LOOPED_MS)] + [(f"{r['name']}_ratio", RECORD_PLAIN_MS * r["ratio"])
                                                        for r in results]
    for source, looped_ms in rows:
        before, total = projected_steps(args.seconds, args.switch_at, RECORD_PLAIN_MS, looped_ms)
        print(f"projection_8xh100 looped_ms_from:{source} plain_ms:{RECORD_PLAIN_MS:.0f} looped_ms:{looped_ms:.0f} "
              f"seconds:{args.seconds:.0f} switch_at:{args.switch_at} steps_before_switch:{before:.0f} "
              f"steps:{total:.0f} steps_unlooped:{plain_steps:.0f} # assumes the plain step is #1855's 96 ms")
    print(f"record_8xh100 steps:{RECORD_STEPS} switch_step:{RECORD_SWITCH_STEP} # #1855's log, for comparison")


if __name__ == "__main__":
    main()
