"""Evaluation throughput with and without the correction table, side by side on this machine.

Both runs score the same stream with the same model through eval_final's own code: the plain
sliding-window pass, and the pass that keeps every position's loss, then selects, encodes,
writes, decodes and applies the table in closed form. Target: ratio (with / without) <= 1.10,
since the inline table needs no second pass through the model.

    python bench/eval_throughput.py [--tokens 32768] [--repeats 3]
"""

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import eval_final  # noqa: E402
import train_gpt  # noqa: E402


def synthetic_scoring(num_tokens: int, out_dir: Path) -> eval_final.ScoredValidation:
    cfg = dataclasses.replace(train_gpt.ModelConfig.from_settings(train_gpt.Settings()), num_layers=2)
    torch.manual_seed(0)
    model = train_gpt.GPT(cfg)
    rng = np.random.default_rng(0)
    tokens = torch.from_numpy(rng.integers(4, cfg.vocab_size, num_tokens + 1))
    vocab = cfg.vocab_size  # every token one byte with no spaces: bytes do not matter for speed
    tables = train_gpt.ByteTables(torch.ones(vocab, dtype=torch.int64), torch.zeros(vocab, dtype=torch.bool),
                                  torch.zeros(vocab, dtype=torch.bool))
    settings = eval_final.EvalSettings(eval_stride=64, eval_batch_seqs=16, correction_out=str(out_dir / "bench.ctab"),
                                correction_max_bytes=max(num_tokens // 25, 64), device="cpu", compile="0")
    runtime = train_gpt.Runtime(0, 1, 0, torch.device("cpu"), False, False)
    artifact = train_gpt.Artifact({}, {"model_config": dataclasses.asdict(cfg)}, {})
    return eval_final.ScoredValidation(settings, runtime, artifact, model, 512, tokens, tables, model_bytes=0)


def time_plain(scored) -> float:
    t0 = time.perf_counter()
    scored.evaluate()
    return time.perf_counter() - t0


def time_corrected(scored) -> tuple[float, int]:
    t0 = time.perf_counter()
    base = scored.evaluate(keep_positions=True)
    _, _, table = eval_final.apply_correction(scored, base, None, None, Path(scored.settings.correction_out))
    return time.perf_counter() - t0, table.positions.size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        scored = synthetic_scoring(args.tokens, Path(tmp))
        time_plain(scored)  # warm-up
        plain, corrected, entries = [], [], 0
        for _ in range(args.repeats):  # interleaved, so drift in the machine hits both alike
            plain.append(time_plain(scored))
            seconds, entries = time_corrected(scored)
            corrected.append(seconds)
    plain_s, corrected_s = statistics.median(plain), statistics.median(corrected)
    print(f"eval_bench threads:{torch.get_num_threads()} tokens:{args.tokens} stride:64 seq_len:512 entries:{entries}")
    print(f"eval_ratio eval_tokens_per_s_plain:{args.tokens / plain_s:.0f} eval_tokens_per_s_corrected:{args.tokens / corrected_s:.0f} "
          f"ratio_time_corrected_over_plain:{corrected_s / plain_s:.3f} target:<=1.10")


if __name__ == "__main__":
    main()
