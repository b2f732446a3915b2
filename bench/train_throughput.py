"""Training throughput on this machine: tokens/s and model-FLOPs utilisation (MFU).

MFU is measured against the faster of the fp32 and bf16 matrix-multiply peaks, both measured in
the same run (a large square matmul, best of several), so the ratio does not depend on a
datasheet and a slow path cannot hide behind a slow peak. Each configuration runs the real
train_gpt.TrainStep (forward, backward, Muon and AdamW) on random tokens, in fp32 and in bf16
autocast side by side; a precision whose matmul is 4x slower than the fastest here is skipped
(and says so). Target at the default width: at least 0.30 of the fastest peak.

    python bench/train_throughput.py [--steps 3] [--compile]
"""

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt  # noqa: E402


def model_flops_per_token(cfg: train_gpt.ModelConfig, seq_len: int) -> float:
    """6 x the matmul weights a token passes through (the tied output layer included, lookups not),
    plus causal attention's score and value products: 6 x layers x seq_len x width (half of full)."""
    model = train_gpt.GPT(cfg)
    matmul_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, train_gpt.FakeQuantLinear))
    matmul_params += cfg.vocab_size * cfg.model_dim
    return 6 * matmul_params + 6 * cfg.num_layers * seq_len * cfg.model_dim


class RandomTokens:
    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.generator = torch.Generator().manual_seed(0)

    def next_batch(self, local_tokens: int, seq_len: int):
        idx = torch.randint(0, self.vocab_size, (local_tokens // seq_len, seq_len + 1), generator=self.generator)
        return idx[:, :-1], idx[:, 1:]


def bench(name: str, settings: train_gpt.Settings, steps: int, use_compile: bool, bf16: bool) -> dict:
    torch.manual_seed(0)
    rt = train_gpt.Runtime(0, 1, 0, torch.device("cpu"), use_compile, bf16)
    model = train_gpt.GPT(train_gpt.ModelConfig.from_settings(settings))
    train_step = train_gpt.TrainStep(settings, rt, model, RandomTokens(settings.vocab_size))
    for _ in range(2):  # warm-up, and compilation when asked
        train_step(0, 0.0)[0].item()
    step_times = []
    for i in range(steps):
        t0 = time.perf_counter()
        train_step(i + 1, 0.0)[0].item()  # waits for the step, as the training loop does
        step_times.append(time.perf_counter() - t0)
    step_s = statistics.median(step_times)
    tokens_per_s = settings.train_batch_tokens / step_s
    flops = model_flops_per_token(model.cfg, settings.train_seq_len) * tokens_per_s
    return {"name": name, "precision": rt.precision, "step_ms": 1000 * step_s, "tokens_per_s": tokens_per_s,
            "model_flops": flops}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (slow to start on CPU)")
    args = parser.parse_args()
    common = dict(train_seq_len=args.seq_len, train_batch_tokens=args.batch_tokens, grad_accum_steps=1,
                  max_wallclock_seconds=0, device="cpu")
    configs = {
        "tiny": dataclasses.replace(train_gpt.Settings(), num_layers=2, model_dim=128, num_heads=4, num_kv_heads=2,
                                    bigram_vocab_size=512, bigram_dim=32, **common),
        "default_width": dataclasses.replace(train_gpt.Settings(), **common),
    }
    print(f"train_bench threads:{torch.get_num_threads()} torch:{torch.__version__} compile:{int(args.compile)} "
          f"seq_len:{args.seq_len} batch_tokens:{args.batch_tokens}")
    peaks = {name: 1e9 * train_gpt.matmul_gflops(dtype, 2048, 2048, 2048, repeats=8, budget_s=3.0)
             for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    fastest = max(peaks, key=peaks.get)
    print(" ".join(f"{k}_matmul_peak_gflops:{v / 1e9:.1f}" for k, v in peaks.items()) + f" fastest:{fastest} "
          f"auto_choice:{'bf16' if train_gpt.prefer_bf16(peaks['fp32'], peaks['bf16']) else 'fp32'}")
    results = []
    for name, settings in configs.items():
        for precision in ("fp32", "bf16"):
            if peaks[precision] < max(peaks.values()) / 4:  # hours at the default width: nothing to learn
                print(f"train_config config:{name} precision:{precision} skipped:its_matmul_is_"
                      f"{max(peaks.values()) / peaks[precision]:.0f}x_slower_than_the_fastest_here")
                continue
            results.append(bench(name, settings, args.steps, args.compile, precision == "bf16"))
    peak = max(peaks.values())
    for r in results:
        print(f"train_config config:{r['name']} precision:{r['precision']} step_ms:{r['step_ms']:.0f} "
              f"tokens_per_s:{r['tokens_per_s']:.0f} model_gflops:{r['model_flops'] / 1e9:.1f} "
              f"mfu_vs_fastest_peak:{r['model_flops'] / peak:.3f}")


if __name__ == "__main__":
    main()
