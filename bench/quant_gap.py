"""The quantizers side by side on trained models: for each export rung and quantizer, quant_gap (BPB after the
artifact's round trip minus BPB of the float weights, on the same validation windows), the total bytes (the
artifact, LQER's factors inside it, and the training run's code: train_gpt.py and quantize.py), the relative
RMS errors on the weights and on the layers' outputs (calibration inputs), and the share of integers that
are not the nearest grid point (what GPTQ moves, on a QAT-trained model or not).

    python bench/quant_gap.py train                        # a train_gpt.py run that also keeps its float weights
    python bench/quant_gap.py measure RUN1/float_state.pt RUN2/float_state.pt ... > OUT.txt
    python bench/quant_gap.py table OUT1.txt OUT2.txt ...   # one table of the quant_gap_row lines of saved runs
    python bench/quant_gap.py sizes [VOCAB ...]              # bytes per rung of the default model, trained-like weights

`train` is train_gpt.py's run, settings from the environment as always, with the weights it exports also
saved before quantization (OUTPUT_DIR/float_state.pt). `measure` reads DATA_PATH, TOKENIZER_PATH,
VAL_MAX_TOKENS, EVAL_BATCH_SEQS, GPTQ_CALIBRATION_TOKENS, LQER_FACTOR_BITS, ZSTD_LEVEL and AUTOCAST_BF16 (auto
here: fp32, the exact figures) from the environment; the Hessians come from the training shards. It prints a
quant_gap_row line per (model, rung, quantizer) and a markdown table of them.

`sizes` needs no run and no data: the default model (settings from the environment) at each vocabulary
(default 1024 4096 8192), filled with trained-like weights (tests/test_model_and_quant.py's trained_like_state:
Student-t(4) rows, the statistics of the public int6 QAT record's stored values), packed at every rung of the
export ladder (round to nearest, ZSTD_LEVEL), each total counted with the code of EXPORT_FOR_EVAL's evaluation
as SHIP_CODE ships it and the room kept for the hint knobs, as the export counts them. One vocab_size_row line
per (vocabulary, rung) and a markdown table.
"""

import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "records"))
import log_format  # noqa: E402
import quantize  # noqa: E402
import train_gpt  # noqa: E402

RUNGS = ("int6", "embed_int8", "mlp_int5", "mlp_int4")
VOCAB_SIZES = (1024, 4096, 8192)
# (label, quantizer, LQER rank, LQER tensors)
QUANTIZERS = (("rtn", "rtn", 0, 0), ("gptq", "gptq", 0, 0), ("gptq+lqer r4x3", "gptq", 4, 3),
              ("gptq+lqer r8x12", "gptq", 8, 12))
FLOAT_STATE_NAME = "float_state.pt"


def train_keeping_float_weights() -> None:
    s = train_gpt.Settings.from_env()
    export = train_gpt.export_artifact
    def export_and_keep(state, meta, *args, **kwargs):
        torch.save({"state": state, "meta": meta}, Path(s.output_dir) / FLOAT_STATE_NAME)
        return export(state, meta, *args, **kwargs)
    train_gpt.export_artifact = export_and_keep
    train_gpt.train(s)


def log_figure(key: str, value) -> str:
    if key == "quant_gap":
        return f"{value:+.6f}"
    if isinstance(value, float):
        return f"{value:.5f}"
    return train_gpt.log_value(value)


def measure(paths: list[Path]) -> list[dict]:
    s = train_gpt.Settings.from_env()
    autocast = train_gpt.resolve_switch(s.autocast_bf16, "AUTOCAST_BF16", False)
    device, code = torch.device("cpu"), train_gpt.code_bytes(train_gpt.__file__, quantize.__file__)
    tables = train_gpt.build_byte_tables(train_gpt.load_tokenizer(s.tokenizer_path, s.vocab_size))
    rows = []
    for path in paths:
        saved = torch.load(path, weights_only=True)
        state, meta = saved["state"], saved["meta"]
        seq_len = meta["train_seq_len"]
        model = train_gpt.GPT(train_gpt.ModelConfig(**meta["model_config"]))
        model.load_state_dict(state)
        tokens = train_gpt.load_validation_tokens(s.data_path, s.vocab_size, seq_len, s.val_max_tokens)
        def bpb() -> float:
            return train_gpt.evaluate(model, tokens, tables, seq_len, 0, s.eval_batch_seqs, device, autocast).val_bpb
        before = bpb()
        calibration = train_gpt.calibrate(model, dataclasses.replace(s, export_quantizer="gptq", train_seq_len=seq_len),
                                          device, autocast)
        print(f"quant_gap_model model:{path.parent.name} prequant_bpb:{before:.6f} val_tokens:{tokens.numel() - 1} "
              f"calibration_tokens:{calibration.tokens} calibration_ms:{calibration.ms:.0f}", flush=True)
        cache = {}  # a tensor rounded (and its correction rated) once per width, as the export's ladder does
        for rung in (r for r in train_gpt.EXPORT_LADDER if r.name in RUNGS):
            bits = {n: train_gpt.tensor_bits(n, t, rung) for n, t in state.items()}
            for label, quantizer, rank, count in QUANTIZERS:
                quantized = quantize.quantize_state(state, bits, quantizer, calibration.hessians, rank, count,
                                                    s.lqer_factor_bits, cache)
                blob = train_gpt.pack_artifact(state, {**meta, "export_rung": rung.name}, zstd_level=s.zstd_level,
                                               rung=rung, quantized=quantized)
                model.load_state_dict(train_gpt.unpack_artifact(blob, str(path)).state)
                weight_error, output_error = quantize.relative_errors(state, quantized, calibration.hessians)
                nearest = quantize.quantize_state(state, bits, "rtn", cache=cache)
                moved = sum(int((q.values != nearest[n].values).sum()) for n, q in quantized.items())
                row = dict(model=path.parent.name, rung=rung.name, quantizer=label, quant_gap=bpb() - before,
                           total_bytes=len(blob) + code, correction_bytes=sum(
                               q.correction.nbytes for q in quantized.values() if q.correction is not None),
                           weight_rel_rms_error=weight_error, output_rel_rms_error=output_error,
                           off_nearest=moved / sum(q.values.numel() for q in quantized.values()))
                print("quant_gap_row " + " ".join(f"{k}:{log_figure(k, v)}" for k, v in row.items()), flush=True)
                rows.append(row)
        model.load_state_dict(state)
    return rows


def markdown(rows: list[dict]) -> str:
    models = list(dict.fromkeys(r["model"] for r in rows))
    lines = ["| rung | quantizer | " + " | ".join(f"quant_gap {m}" for m in models) + " | "
             + " | ".join(f"total bytes {m}" for m in models) + " |",
             "| --- | --- |" + " ---: |" * (2 * len(models))]
    for rung in RUNGS:
        for label, *_ in QUANTIZERS:
            cell = {r["model"]: r for r in rows if r["rung"] == rung and r["quantizer"] == label}
            lines.append(f"| {rung} | {label} | " + " | ".join(f"{cell[m]['quant_gap']:+.5f}" for m in models) + " | "
                         + " | ".join(f"{cell[m]['total_bytes']:,}" for m in models) + " |")
    return "\n".join(lines)


def saved_rows(paths: list[Path]) -> list[dict]:
    """The rows that `measure` printed, read back from its saved output."""
    rows = []
    for path in paths:
        for line in log_format.read_lines(path.read_text(), tags={"quant_gap_row"}):
            f = line.fields
            rows.append(dict(model=f["model"], rung=f["rung"], quantizer=f["quantizer"],
                             quant_gap=float(f["quant_gap"]), total_bytes=int(f["total_bytes"])))
    return rows


def sizes(vocabs: list[int]) -> list[dict]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_model_and_quant import trained_like_state  # the one definition of "trained-like", shared with the tests

    s = train_gpt.Settings.from_env()
    counted = train_gpt.counted_code(s.export_for_eval, s.ship_code)
    code = counted.code_bytes + counted.reserve_bytes
    rows = []
    for vocab in vocabs:
        cfg = train_gpt.ModelConfig.from_settings(dataclasses.replace(s, vocab_size=vocab))
        state = trained_like_state(cfg)
        for rung in train_gpt.EXPORT_LADDER:
            meta = {"model_config": dataclasses.asdict(cfg), "export_rung": rung.name}
            blob = train_gpt.pack_artifact(state, meta, zstd_level=s.zstd_level, rung=rung)
            row = dict(vocab=vocab, rung=rung.name, params=sum(t.numel() for t in state.values()),
                       model_bytes=len(blob), code_bytes=code, total_bytes=len(blob) + code,
                       fits=int(len(blob) + code <= train_gpt.ARTIFACT_CAP_BYTES))
            print("vocab_size_row " + " ".join(f"{k}:{v}" for k, v in row.items())
                  + f" counted_for:{counted.evaluation} shipped_as:{counted.ship} zstd_level:{s.zstd_level}", flush=True)
            rows.append(row)
    return rows


def sizes_markdown(rows: list[dict]) -> str:
    vocabs = list(dict.fromkeys(r["vocab"] for r in rows))
    lines = ["| rung | " + " | ".join(f"total bytes, vocab {v}" for v in vocabs) + " |", "| --- |" + " ---: |" * len(vocabs)]
    for rung in dict.fromkeys(r["rung"] for r in rows):
        cell = {r["vocab"]: r for r in rows if r["rung"] == rung}
        lines.append(f"| {rung} | " + " | ".join(f"{cell[v]['total_bytes']:,}" + ("" if cell[v]["fits"] else " (over)")
                                                 for v in vocabs) + " |")
    return "\n".join(lines)


def main() -> None:
    if sys.argv[1:2] == ["train"]:
        train_keeping_float_weights()
    elif sys.argv[1:2] == ["measure"] and sys.argv[2:]:
        print(markdown(measure([Path(p) for p in sys.argv[2:]])))
    elif sys.argv[1:2] == ["table"] and sys.argv[2:]:
        print(markdown(saved_rows([Path(p) for p in sys.argv[2:]])))
    elif sys.argv[1:2] == ["sizes"]:
        print(sizes_markdown(sizes([int(v) for v in sys.argv[2:]] or list(VOCAB_SIZES))))
    else:
        raise train_gpt.InputError("usage: python bench/quant_gap.py train | measure RUN/float_state.pt ... | "
                                   "table OUT.txt ... | sizes [VOCAB ...]")


if __name__ == "__main__":
    train_gpt.run_main(main, "bench/quant_gap.py")
