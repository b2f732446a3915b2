"""
weight_decay_size.py: weight decay as a size lever. Two decays side by side, same seed, same steps, same data:

    DATA_PATH=... TOKENIZER_PATH=... python bench/weight_decay_size.py [CONFIG ...]   # default: demo256 wide

    low   MUON_WEIGHT_DECAY=0.04  ADAM_WEIGHT_DECAY=0.04   (our defaults)
    high  MUON_WEIGHT_DECAY=0.095 ADAM_WEIGHT_DECAY=0.085  (#1855's Muon 0.095 and embedding 0.085)

The tied embedding's decay is ADAM_WEIGHT_DECAY: on this code it is every Adam group's (the embedding, the bigram
table, the gains and scalars), there is no embedding-only setting, so `high` decays those too.

Configurations (CONFIGS): `demo256` is scripts/demo.py's model (4 layers, 4/2 heads, MLP 3x, bigram 2048x64, its
learning rates, sequence 256, batch 4,096 tokens) at width 256 instead of 128 (at 128 every block matrix is small
enough to stay fp16: nothing for the grid); `wide` is 2 layers x 384 (6/3 heads), otherwise the same.
QAT off (float weights: the decay's effect on the weights alone), STEPS steps each (defaults below), no wall-clock
cap. Each run is train_gpt.train: its export (the ladder with GPTQ, ZSTD_LEVEL 22 by default) gives the int6 rung's
model bytes and round-trip BPB (standard windows, the first VAL_TOKENS validation tokens); then the same float
weights are exported by the rd allocation (GPTQ on the training-token calibration) at one cap per configuration:
RD_CAP_FRACTION (default 0.8) of the `low` run's int6 model bytes, the same cap for both decays.
One `wd_size` line per run; docs/export_sizes.md has the table.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import allocation  # noqa: E402
import train_gpt  # noqa: E402

DECAYS = {"low": (0.04, 0.04), "high": (0.095, 0.085)}
COMMON = dict(vocab_size=1024, mlp_mult=3, bigram_vocab_size=2048, bigram_dim=64, train_seq_len=256,
              train_batch_tokens=4096, grad_accum_steps=1, matrix_lr=0.0125, scalar_lr=0.0125, tied_embed_lr=0.02,
              muon_momentum_warmup_steps=100, warmup_steps=0, max_wallclock_seconds=0, val_loss_every=0,
              train_log_every=100, eval_stride=0, eval_batch_seqs=16, swa_every=10, qat_enabled=False,
              gptq_reserve_seconds=0, gptq_calibration_tokens=16384, device="cpu", compile="0", autocast_bf16="0")
CONFIGS = {
    # the demo's 4 layers at width 256: at 128 every block matrix is under quantize.SMALL_TENSOR_MAX_NUMEL (kept fp16)
    "demo256": dict(num_layers=4, model_dim=256, num_heads=4, num_kv_heads=2, iterations=100),
    "wide": dict(num_layers=2, model_dim=384, num_heads=6, num_kv_heads=3, iterations=100),
}


def run(config: str, decay: str, out: Path, seed: int, rd_cap: int | None) -> dict:
    muon_wd, adam_wd = DECAYS[decay]
    shape = dict(CONFIGS[config])
    steps = int(os.environ.get("STEPS_" + config.upper(), shape.pop("iterations")))
    s = train_gpt.Settings(
        **COMMON, **shape, iterations=steps, warmdown_iters=steps // 3, seed=seed, muon_weight_decay=muon_wd,
        adam_weight_decay=adam_wd, data_path=os.environ["DATA_PATH"], tokenizer_path=os.environ["TOKENIZER_PATH"],
        val_max_tokens=int(os.environ.get("VAL_TOKENS", "65536")), zstd_level=int(os.environ.get("ZSTD_LEVEL", "22")),
        output_dir=str(out / f"{config}_{decay}_{seed}"), run_id=f"{config}_{decay}_{seed}")
    kept = {}
    export = train_gpt.export_artifact
    def keep(state, meta, *args, **kwargs):
        kept.update(state={n: t.clone() for n, t in state.items()}, meta=meta,
                    calibration=next(a for a in args if isinstance(a, train_gpt.quantize.Calibration)))
        return export(state, meta, *args, **kwargs)
    train_gpt.export_artifact = keep
    t0 = time.perf_counter()
    try:
        result = train_gpt.train(s)
    finally:
        train_gpt.export_artifact = export
    train_s = time.perf_counter() - t0
    state, meta, calibration = kept["state"], kept["meta"], kept["calibration"]
    rms = {g: (sum(float(state[n].float().square().sum()) for n in names)
               / sum(state[n].numel() for n in names)) ** 0.5
           for g, names in allocation.grouped_names(state).items()}
    row = dict(config=config, decay=decay, seed=seed, muon_wd=muon_wd, adam_wd=adam_wd, steps=result["steps"],
               float_bpb=result["prequant_val_bpb"], int6_bytes=result["model_bytes"], int6_bpb=result["val_bpb"],
               train_and_export_s=round(train_s), **{f"rms_{g}": v for g, v in rms.items()})
    if rd_cap is None:
        rd_cap = int(float(os.environ.get("RD_CAP_FRACTION", "0.8")) * row["int6_bytes"])
    lines = []
    blob, _ = allocation.export_rd(state, meta, 0, rd_cap, s.zstd_level, lines.append, "gptq", calibration.hessians)
    model = train_gpt.GPT(train_gpt.ModelConfig(**meta["model_config"]))
    model.load_state_dict({n: t.to(state[n].dtype) for n, t in
                           train_gpt.unpack_artifact(blob, "<memory>").state.items()})
    tokens = train_gpt.load_validation_tokens(s.data_path, s.vocab_size, s.train_seq_len, s.val_max_tokens)
    tables = train_gpt.build_byte_tables(train_gpt.load_tokenizer(s.tokenizer_path, s.vocab_size))
    rd_bpb = train_gpt.evaluate(model, tokens, tables, s.train_seq_len, 0, s.eval_batch_seqs, torch.device("cpu"),
                                False).val_bpb
    row.update(rd_cap=rd_cap, rd_bytes=len(blob), rd_bpb=rd_bpb)
    for line in lines:
        if line.startswith("export_group"):
            print(f"wd_rd_group config:{config} decay:{decay} {line}", flush=True)
    print("wd_size " + " ".join(f"{k}:{v:.5f}" if isinstance(v, float) else f"{k}:{v}" for k, v in row.items()),
          flush=True)
    return row


def main(configs: list[str]) -> None:
    seed = int(os.environ.get("SEED", "1337"))
    with tempfile.TemporaryDirectory() as tmp:
        for config in configs:
            low = run(config, "low", Path(tmp), seed, None)
            high = run(config, "high", Path(tmp), seed, low["rd_cap"])
            print(f"wd_delta config:{config} int6_bytes:{high['int6_bytes'] - low['int6_bytes']:+d} "
                  f"int6_bytes_pct:{100 * (high['int6_bytes'] / low['int6_bytes'] - 1):+.2f} "
                  f"float_bpb:{high['float_bpb'] - low['float_bpb']:+.5f} int6_bpb:{high['int6_bpb'] - low['int6_bpb']:+.5f} "
                  f"rd_bpb:{high['rd_bpb'] - low['rd_bpb']:+.5f}", flush=True)


if __name__ == "__main__":
    unknown = [c for c in sys.argv[1:] if c not in CONFIGS]
    if unknown or not {"DATA_PATH", "TOKENIZER_PATH"} <= set(os.environ):
        sys.exit(__doc__)
    main(sys.argv[1:] or list(CONFIGS))
