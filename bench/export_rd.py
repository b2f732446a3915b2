"""The rate-distortion export (EXPORT_ALLOCATION=rd, allocation.py) against the ladder, and where the bytes go.

    python bench/export_rd.py sizes [VOCAB:MLP_MULT ...]   # trained-like weights: bits a parameter per group (SIZES_PARTS)
    python bench/export_rd.py compare [SEED ...]           # trained models (width 384, QAT off): round-trip BPB, ladder vs rd
    python bench/export_rd.py trained FLOAT_STATE DATA_PATH TOKENIZER  # a kept CPU-trained model: its per-group table
    python bench/export_rd.py time [VOCAB:MLP_MULT ...]    # the rd export's phases, serial on this CPU; 8xH100 projection

`sizes` (default 1024:3 8192:4: the default model and the frontier's shape), the weights of tests/
test_model_and_quant.py's trained_like_state (Student-t(4) rows), no calibration (H = I), round to nearest, ZSTD_LEVEL
(default 22), the legal evaluation's code counted. Per model, the parts SIZES_PARTS names (default all, in this
order): `ladder`, the ladder's first fitting rung from SIZES_FIRST_RUNG (an index, default 0) as one stream (version
3); `rd`, the rd export at the cap, its options measured on RD_SAMPLE (default 0.25) of each group: bits a parameter
and output error per group, export time; `rule`, #1855's fixed rule (k 11.5 MLP, 13 attention, 14 int7 embedding)
per group, version 4, zstd, rows as stored; `v4`, the ladder rung's integers per group, version 4 (zstd or xz,
each orientation, the smallest), and what that saves against the one stream. Level 22 on the frontier's shape is
minutes a pass on a shared machine: separate processes can run separate parts. Tables: docs/export_sizes.md.

`trained` reads a float state dict, its meta and its GPTQ calibration (training tokens) kept by
bench/keep_float_state.py, and exports the same float weights with GPTQ on the calibration's Hessians (the rd
export with its sensitivities and final check on the calibration's training tokens, as train_gpt off the clock,
the loss in fp32; RD_LAMBDA=0: without them): the ladder's
int6 and mlp_int5 rungs (version 3, one stream), the int6 integers per group (version 4: zstd or xz, each orientation,
the smallest), #1855's rule per group,
and the rd export at each rung's model bytes (code not counted: a cap on the model alone); each with its output error
and its round-trip BPB on the first VAL_TOKENS (default 65,536) validation tokens of DATA_PATH. Docs:
docs/export_sizes.md.

`compare` trains, per seed, a 2-layer 384-wide model (6/3 heads, MLP 3x, vocabulary 512) on the pydoc help topics
(the tests' tiny corpus: topics 40 on for training, the first 40 for validation) for STEPS (default 40) steps with
QAT_ENABLED=0, then exports the same float weights by round to nearest (GPTQ's column loop is too slow for this
shared machine: docs/export.md) both ways, the rd export's errors weighted by Hessians from training tokens, at two caps:
the ladder's mlp_int5 rung's bytes (the ladder below int6) and its int6 rung's bytes, model bytes only. It prints
one export_compare line per (seed, cap, allocation): bytes, round-trip validation BPB and its gap to the float BPB,
on the first VAL_TOKENS (default 16,384; 0: all) validation targets; the Hessians, the sensitivities and the
check's losses on the first CALIBRATION_TOKENS (default 4,096) training tokens (CALIBRATION_SPLIT=held_out: on the
first training topics holding them, kept out of the training shard: tokens the model never trained on). The rd
export's export_rd_check line (seed, cap) gives each finalist's measured training loss and which one it kept
(allocation.check_finalists; CHECK_MARGIN_SE, default the module's, its margin); an export_paired line (seed, cap) rd's BPB less the ladder's on the same positions
and its standard error (`paired`).
"""

import dataclasses
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import allocation  # noqa: E402
import artifact  # noqa: E402
import quantize  # noqa: E402
import train_gpt  # noqa: E402

LEVEL = int(os.environ.get("ZSTD_LEVEL", "22"))
QUANTIZER = os.environ.get("QUANTIZER", "rtn")  # compare: the quantizer on both sides (rtn or gptq)
torch.set_num_threads(int(os.environ.get("THREADS", "1")))  # the shared 2-core machine: more threads only contend
# PR #1855 (SPEC section 12.1): 35,945,671 parameters in 15,865,260 bytes of model, everything included
FRONTIER_PARAMS, FRONTIER_MODEL_BYTES = 35_945_671, 15_865_260


def sizes(shapes: list[str]) -> None:
    """Parts in the order of their worth per compression pass (level 22 on 36 M integers is minutes a pass on the
    shared machine): the ladder's first fitting rung (from SIZES_FIRST_RUNG on, default the first), the rd export at
    the cap (options measured on RD_SAMPLE of each group, default 0.25), #1855's rule per group (rows as stored, zstd:
    one pass), then the ladder rung's integers per group (zstd or xz where smaller, each orientation)."""
    from test_model_and_quant import trained_like_state
    first = int(os.environ.get("SIZES_FIRST_RUNG", "0"))
    sample = float(os.environ.get("RD_SAMPLE", "0.25"))
    parts = os.environ.get("SIZES_PARTS", "ladder,rd,rule,v4").split(",")  # a subset: the others' passes run apart
    for shape in shapes:
        vocab, mult = map(int, shape.split(":"))
        s = train_gpt.Settings(vocab_size=vocab, mlp_mult=mult)
        cfg = train_gpt.ModelConfig.from_settings(s)
        state = trained_like_state(cfg)
        meta = {"model_config": dataclasses.asdict(cfg)}
        params = sum(t.numel() for t in state.values())
        groups = allocation.grouped_names(state)
        counted = train_gpt.counted_code(s.export_for_eval, s.ship_code)
        code = counted.code_bytes + counted.reserve_bytes
        print(f"model vocab:{vocab} mlp_mult:{mult} params:{params} code_bytes:{code} zstd_level:{LEVEL} "
              f"first_rung:{train_gpt.EXPORT_LADDER[first].name} rd_sample:{sample}", flush=True)
        def per_group(label: str, stored: list[dict]) -> None:
            for g in stored:
                numel = sum(state[n].numel() for n in groups.get(g["name"], []))
                print(f"{label}_group vocab:{vocab} group:{g['name']} bytes:{g['nbytes']} codec:{g['codec']} "
                      f"transposed:{int(g['transposed'])} params:{numel}"
                      + (f" bits_per_param:{8 * g['nbytes'] / numel:.3f}" if numel else ""), flush=True)
        v3, rung = b"", train_gpt.EXPORT_LADDER[first]  # without the ladder part: SIZES_FIRST_RUNG's rung
        if "ladder" in parts:
            lines = []
            t0 = time.perf_counter()
            v3, rung = train_gpt.export_artifact(state, meta, code, train_gpt.ARTIFACT_CAP_BYTES, LEVEL, first,
                                                 lines.append)
            for line in lines:
                print(f"ladder vocab:{vocab} {line}", flush=True)
            print(f"part vocab:{vocab} what:ladder_v3_one_stream rung:{rung.name} model_bytes:{len(v3)} "
                  f"total_bytes:{len(v3) + code} bits_per_param:{8 * len(v3) / params:.3f} "
                  f"export_ms:{1000 * (time.perf_counter() - t0):.0f}", flush=True)
        if "rd" in parts:
            rd_part(state, meta, code, params, vocab, sample)
        if "rule" in parts:
            rule_part(state, meta, code, params, vocab, groups, per_group)
        if "v4" in parts:
            quantized = quantize.quantize_state(state, {n: quantize.tensor_bits(n, t, rung) for n, t in state.items()})
            t0 = time.perf_counter()
            blob, stored = artifact.grouped_artifact(state, meta, quantized, zstd_level=LEVEL, codecs=("zstd", "lzma"))
            per_group("ladder_v4", stored)
            print(f"part vocab:{vocab} what:v4_groups_best_of_zstd_xz_and_orientation rung:{rung.name} "
                  f"model_bytes:{len(blob)} " + (f"saved_vs_v3:{len(v3) - len(blob)} " if v3 else "")
                  + f"lzma_max_raw:{artifact.LZMA_MAX_RAW} pack_ms:{1000 * (time.perf_counter() - t0):.0f}",
                  flush=True)
    print(f"frontier_1855 params:{FRONTIER_PARAMS} model_bytes:{FRONTIER_MODEL_BYTES} "
          f"bits_per_param:{8 * FRONTIER_MODEL_BYTES / FRONTIER_PARAMS:.3f} # SPEC section 12.1", flush=True)


def rd_part(state: dict, meta: dict, code: int, params: int, vocab: int, sample: float) -> None:
    lines = []
    t0 = time.perf_counter()
    blob, _ = allocation.export_rd(state, meta, code, train_gpt.ARTIFACT_CAP_BYTES, LEVEL, lines.append,
                                   sample=sample)
    for line in lines:
        print(f"rd vocab:{vocab} {line}", flush=True)
    print(f"rd_total vocab:{vocab} model_bytes:{len(blob)} total_bytes:{len(blob) + code} "
          f"bits_per_param:{8 * len(blob) / params:.3f} export_ms:{1000 * (time.perf_counter() - t0):.0f}",
          flush=True)


def rule_part(state: dict, meta: dict, code: int, params: int, vocab: int, groups: dict, per_group) -> None:
    t0 = time.perf_counter()
    grids = {n: quantize.rule_1855(g) for g, names in groups.items() for n in names}
    rule = quantize.quantize_state(state, grids)
    error = sum(allocation.group_error(state, names, {n: rule[n].dequantize() for n in names}, {})
                for names in groups.values())
    blob, stored = artifact.grouped_artifact(state, meta, rule, zstd_level=LEVEL, codecs=("zstd",),
                                             orientation="plain")
    per_group("rule_1855", stored)
    print(f"part vocab:{vocab} what:rule_1855_v4_zstd_plain model_bytes:{len(blob)} total_bytes:{len(blob) + code} "
          f"bits_per_param:{8 * len(blob) / params:.3f} output_error_h_identity:{error:.6g} "
          f"pack_ms:{1000 * (time.perf_counter() - t0):.0f}", flush=True)


def trained(path: str, data_path: str, tokenizer_path: str) -> None:
    kept = torch.load(path, weights_only=False)
    state, meta, calibration = kept["state"], kept["meta"], kept["calibration"]
    hessians = calibration.hessians if calibration is not None else {}
    cfg = train_gpt.ModelConfig(**meta["model_config"])
    params = sum(t.numel() for t in state.values())
    seq_len = meta["train_seq_len"]
    model = train_gpt.GPT(cfg)
    model.load_state_dict(state)
    tables = train_gpt.build_byte_tables(train_gpt.load_tokenizer(tokenizer_path, cfg.vocab_size))
    tokens = train_gpt.load_validation_tokens(data_path, cfg.vocab_size, seq_len,
                                              int(os.environ.get("VAL_TOKENS", "65536")))
    def bpb(weights: dict) -> float:
        model.load_state_dict({n: t.to(state[n].dtype) for n, t in weights.items()})
        try:
            return train_gpt.evaluate(model, tokens, tables, seq_len, 0, 16, torch.device("cpu"), False).val_bpb
        finally:
            model.load_state_dict(state)  # the float weights back: the rd export's loss replaces only its groups
    float_bpb = bpb(state)
    # the rd export as train_gpt runs it off the clock: sensitivities and the final check on the calibration's own
    # training tokens (the first GPTQ_CALIBRATION_TOKENS of DATA_PATH's training shards; RD_LAMBDA=0: none)
    calibrating = dataclasses.replace(train_gpt.Settings(), data_path=data_path, vocab_size=cfg.vocab_size,
                                      train_seq_len=seq_len, eval_batch_seqs=16,
                                      gptq_calibration_tokens=getattr(calibration, "tokens", 0) or 65536)
    loss = None if os.environ.get("RD_LAMBDA") == "0" else \
        allocation.replaced_loss(model, train_gpt.calibration_batches(calibrating, torch.device("cpu")), False)
    groups = allocation.grouped_names(state)
    print(f"model path:{path} params:{params} layers:{cfg.num_layers} dim:{cfg.model_dim} vocab:{cfg.vocab_size} "
          f"mlp_mult:{cfg.mlp_mult} steps:{meta.get('steps')} calibration_tokens:{getattr(calibration, 'tokens', 0)} "
          f"zstd_level:{LEVEL} val_tokens:{tokens.numel() - 1} float_bpb:{float_bpb:.5f}", flush=True)
    def row(what: str, blob: bytes, t0: float, error: float | None = None) -> None:
        roundtrip = bpb(train_gpt.unpack_artifact(blob, "<memory>").state)
        print(f"export what:{what} model_bytes:{len(blob)} bits_per_param:{8 * len(blob) / params:.3f} "
              f"roundtrip_bpb:{roundtrip:.5f} quant_gap:{roundtrip - float_bpb:+.5f} "
              + (f"output_error:{error:.6g} " if error is not None else "")
              + f"export_ms:{1000 * (time.perf_counter() - t0):.0f}", flush=True)
    rung_bytes, cache = {}, {}
    for rung in train_gpt.EXPORT_LADDER:
        if rung.name not in ("int6", "mlp_int5"):
            continue
        t0 = time.perf_counter()
        quantized = quantize.quantize_state(state, {n: quantize.tensor_bits(n, t, rung) for n, t in state.items()},
                                            "gptq", hessians, cache=cache)
        blob = train_gpt.pack_artifact(state, {**meta, "export_rung": rung.name}, zstd_level=LEVEL, rung=rung,
                                       quantized=quantized)
        rung_bytes[rung.name] = len(blob)
        error = sum(allocation.group_error(state, names, {n: quantized[n].dequantize() if n in quantized else
                                                          state[n].half().float() for n in names}, hessians)
                    for names in groups.values())
        row(f"ladder_v3_{rung.name}", blob, t0, error)
        if rung.name == "int6":
            t0 = time.perf_counter()
            v4, stored = artifact.grouped_artifact(state, meta, quantized, zstd_level=LEVEL, codecs=("zstd", "lzma"),
                                                   lzma_max_raw=1 << 30)
            print(f"part what:v4_groups_best_of_zstd_xz_and_orientation rung:int6 model_bytes:{len(v4)} "
                  f"saved_vs_v3:{len(blob) - len(v4)} pack_ms:{1000 * (time.perf_counter() - t0):.0f} "
                  + " ".join(f"{g['name']}:{g['nbytes']}:{g['codec']}{':T' if g['transposed'] else ''}"
                             for g in stored), flush=True)
    for label, grids, cap in [("rule_1855", {g: [quantize.rule_1855(g)] for g in groups}, 10**9)] + \
            [(f"rd_at_{name}_bytes", None, nbytes) for name, nbytes in rung_bytes.items()]:
        lines = []
        t0 = time.perf_counter()
        blob, _ = allocation.export_rd(state, meta, 0, cap, LEVEL, lines.append, "gptq", hessians, grids=grids,
                                       loss=None if grids else loss)  # #1855's rule: one grid a group, nothing to weigh
        for line in lines:
            print(f"{label} {line}", flush=True)
        row(label, blob, t0)


def fields(line: str) -> dict[str, str]:
    return dict(f.split(":", 1) for f in line.split() if ":" in f)


def timing(shapes: list[str]) -> None:
    """Each phase of the rd export, serial (one worker), on this CPU, and its projection for 8xH100 (docs/export.md)."""
    from test_model_and_quant import trained_like_state
    tokens, workers = int(os.environ.get("CALIBRATION_TOKENS", "2048")), int(os.environ.get("HOST_CORES", "16"))
    sample = float(os.environ.get("SAMPLE", "0.25"))
    artifact.pool_workers = allocation.pool_workers = lambda: 1  # serial: the sum of the jobs, divided below
    for shape in shapes:
        vocab, mult = map(int, shape.split(":"))
        s = train_gpt.Settings(vocab_size=vocab, mlp_mult=mult)
        cfg = train_gpt.ModelConfig.from_settings(s)
        state = trained_like_state(cfg)
        model = train_gpt.GPT(cfg)
        model.load_state_dict(state)
        meta = {"model_config": dataclasses.asdict(cfg)}
        params = sum(t.numel() for t in state.values())
        counted = train_gpt.counted_code(s.export_for_eval, s.ship_code)
        code = counted.code_bytes + counted.reserve_bytes
        ids = torch.randint(0, vocab, (max(1, tokens // 512), 512), generator=torch.Generator().manual_seed(0))
        batches = list(ids.split(4))  # random ids: the time of a forward, not its values
        t0, c0 = time.perf_counter(), time.process_time()
        calibration = quantize.calibrate(model, batches, model.hidden, train_gpt.TIED_EMBEDDING_NAME)
        calibration_ms, calibration_cpu_ms = 1000 * (time.perf_counter() - t0), 1000 * (time.process_time() - c0)
        loss = allocation.replaced_loss(model, batches, False)
        groups = allocation.grouped_names(state)
        largest = max(sum(state[n].numel() for n in names) for names in groups.values()) / \
            sum(sum(state[n].numel() for n in names) for names in groups.values())
        print(f"time_model vocab:{vocab} mlp_mult:{mult} params:{params} calibration_tokens:{ids.numel()} "
              f"calibration_ms:{calibration_ms:.0f} calibration_cpu_ms:{calibration_cpu_ms:.0f} zstd_level:{LEVEL} sample:{sample} largest_group_share:{largest:.3f}",
              flush=True)
        block = {n: state[n] for n in state if n.startswith("blocks.0.") and quantize.is_quantized_matrix(n, state[n])}
        t0 = time.perf_counter()
        quantize.quantize_state(block, {n: quantize.rule_1855(quantize.weight_group(n)) for n in block}, "gptq",
                                calibration.hessians)
        gptq_ms = 1000 * (time.perf_counter() - t0) * cfg.num_layers  # one block's matrices, times the blocks
        print(f"time_phase vocab:{vocab} phase:gptq_cpu ms:{gptq_ms:.0f} # block 0 x {cfg.num_layers} blocks, one thread",
              flush=True)
        for label, kwargs in (("sensitivities_measure_at_export_level", dict(loss=loss)),
                              ("measure_at_level_3", dict(measure_level=3))):
            lines = []
            t0, c0 = time.perf_counter(), time.process_time()
            blob, _ = allocation.export_rd(state, meta, code, train_gpt.ARTIFACT_CAP_BYTES, LEVEL, lines.append, "rtn",
                                           calibration.hessians, sample=sample, **kwargs)
            total_ms, cpu_ms = 1000 * (time.perf_counter() - t0), 1000 * (time.process_time() - c0)
            f = fields(lines[-2] if lines[-1].startswith("over_cap") else lines[-1])
            for line in lines:
                if line.startswith("export_group"):
                    g = fields(line)
                    print(f"time_group vocab:{vocab} run:{label} group:{g['group']} grid:{g['grid']} "
                          f"bytes:{g['bytes']} predicted_bytes:{g['predicted_bytes']} sensitivity:{g['sensitivity']}",
                          flush=True)
            per_pack = float(f["pack_ms"])
            measure, compress = float(f["measure_ms"]), float(f["compress_ms_serial"])
            # 8xH100 host: the compression jobs spread over HOST_CORES at this machine's per-core speed, but never
            # faster than the largest group alone; rounding, output errors, forwards and GPTQ on the GPU
            host_measure = max(compress / workers, compress * largest)
            host_pack = max(per_pack / workers, per_pack * largest) * int(f["packs"])
            candidates = {g: len(allocation.candidates(g)) for g in groups}
            error_gflop = sum(2 * state[n].size(0) * state[n].size(1) ** 2 * candidates[g] for g, names in groups.items()
                              for n in names if n in calibration.hessians) / 1e9
            print(f"time_export vocab:{vocab} run:{label} model_bytes:{len(blob)} total_bytes:{len(blob) + code} "
                  f"fits:{f['fits']} sensitivity_ms:{f['sensitivity_ms']} measure_ms:{measure:.0f} "
                  f"compress_ms:{compress:.0f} rounding_and_error_ms:{measure - compress:.0f} "
                  f"error_fp64_gflop:{error_gflop:.0f} "
                  f"pack_ms_each:{per_pack:.0f} packs:{f['packs']} total_ms:{total_ms:.0f} cpu_ms:{cpu_ms:.0f} "
                  f"host_cores:{workers} projected_host_measure_s:{host_measure / 1000:.1f} "
                  f"projected_host_pack_s:{host_pack / 1000:.1f}", flush=True)


def tiny_corpus(root: Path, held_out_tokens: int = 0) -> dict:
    """The first 40 topics for validation, the rest for training; held_out_tokens > 0: the first training topics
    holding at least that many tokens go to a training shard of their own (calibration_path), never trained on."""
    import sentencepiece as spm
    from conftest import natural_text_documents, train_tiny_tokenizer
    docs = natural_text_documents()
    model = train_tiny_tokenizer(docs, root / "tok")
    sp = spm.SentencePieceProcessor(model_file=str(model))
    def stream(ds):
        return np.concatenate([np.array([1] + sp.encode(d), dtype=np.uint16) for d in ds])
    lengths = np.cumsum([1 + len(sp.encode(d)) for d in docs[40:]])
    split = 40 + (int(np.searchsorted(lengths, held_out_tokens)) + 1 if held_out_tokens else 0)
    train_gpt.write_data_shard(root / "shards" / "fineweb_val_000000.bin", stream(docs[:40]))
    train_gpt.write_data_shard(root / "shards" / "fineweb_train_000000.bin", stream(docs[split:]))
    if held_out_tokens:
        train_gpt.write_data_shard(root / "held_out" / "fineweb_train_000000.bin", stream(docs[40:split]))
    return {"data_path": str(root / "shards"), "tokenizer_path": str(model), "vocab_size": 512,
            "calibration_path": str(root / ("held_out" if held_out_tokens else "shards")), "held_out_topics": split - 40}


def paired(seed: int, cap_name: str, difference: torch.Tensor, byte_count: int, seq_len: int) -> None:
    """rd's round-trip BPB less the ladder's on the same validation positions, and its standard error from blocks of
    PAIRED_BLOCK_SEQS sequences (default 8) taken as independent: sqrt(blocks x variance of the block sums)."""
    block = seq_len * int(os.environ.get("PAIRED_BLOCK_SEQS", "8"))
    sums = difference.double()[: difference.numel() // block * block].view(-1, block).sum(dim=1)
    to_bpb = 1 / math.log(2) / byte_count
    print(f"export_paired seed:{seed} cap:{cap_name} rd_minus_ladder_bpb:{float(difference.double().sum()) * to_bpb:+.5f} "
          f"standard_error_bpb:{math.sqrt(sums.numel() * float(sums.var())) * to_bpb:.5f} blocks:{sums.numel()} "
          f"block_tokens:{block}", flush=True)


def compare(seeds: list[int]) -> None:
    steps = int(os.environ.get("STEPS", "40"))
    val_tokens = int(os.environ.get("VAL_TOKENS", "16384"))  # validation targets scored; 0: all of the 40 topics
    calibration_tokens = int(os.environ.get("CALIBRATION_TOKENS", "4096"))  # training tokens: Hessians, lambdas, check
    # the check's margin (allocation.CHECK_MARGIN_SE): the two rules side by side on the same float weights
    allocation.CHECK_MARGIN_SE = float(os.environ.get("CHECK_MARGIN_SE", allocation.CHECK_MARGIN_SE))
    with tempfile.TemporaryDirectory() as tmp:
        held_out = os.environ.get("CALIBRATION_SPLIT", "trained") == "held_out"
        data = tiny_corpus(Path(tmp), calibration_tokens if held_out else 0)
        print(f"compare_data calibration_split:{'held_out' if held_out else 'trained'} "
              f"held_out_topics:{data['held_out_topics']}", flush=True)
        for seed in seeds:
            s = dataclasses.replace(
                train_gpt.Settings(), data_path=data["data_path"], tokenizer_path=data["tokenizer_path"],
                vocab_size=512, output_dir=str(Path(tmp) / f"run{seed}"), run_id=f"rd{seed}", seed=seed, device="cpu",
                num_layers=2, model_dim=384, num_heads=6, num_kv_heads=3, mlp_mult=3, bigram_vocab_size=2048,
                bigram_dim=64, train_seq_len=128, train_batch_tokens=2048, iterations=steps, warmdown_iters=steps // 3,
                warmup_steps=0, max_wallclock_seconds=0, val_loss_every=0, val_batch_size=4096, val_max_tokens=4097,
                train_log_every=50, eval_stride=0, eval_batch_seqs=16, zstd_level=3, compile="0", qat_enabled=False,
                gptq_reserve_seconds=0, gptq_calibration_tokens=calibration_tokens, autocast_bf16="0", export_quantizer="rtn",
                swa_enabled=False, export_allocation="ladder")  # the training's own export: the cheap one
            kept = {}
            export = train_gpt.export_artifact
            def keep(state, meta, *args, **kwargs):
                kept.update(state={n: t.clone() for n, t in state.items()}, meta=meta)  # train() loads the round trip into them
                return export(state, meta, *args, **kwargs)
            train_gpt.export_artifact = keep
            train_gpt.train(s)
            train_gpt.export_artifact = export
            state, meta = kept["state"], kept["meta"]
            model = train_gpt.GPT(train_gpt.ModelConfig(**meta["model_config"]))
            model.load_state_dict(state)
            tables = train_gpt.build_byte_tables(train_gpt.load_tokenizer(s.tokenizer_path, s.vocab_size))
            tokens = train_gpt.load_validation_tokens(s.data_path, s.vocab_size, s.train_seq_len, val_tokens + 1 if val_tokens else 0)
            def scored():
                return train_gpt.evaluate(model, tokens, tables, s.train_seq_len, 0, s.eval_batch_seqs,
                                          torch.device("cpu"), False, keep_positions=True)
            before = scored().val_bpb
            calibrating = dataclasses.replace(s, data_path=data["calibration_path"])  # the training side, never validation
            calibration = train_gpt.calibrate(model, dataclasses.replace(calibrating, export_allocation="rd"), torch.device("cpu"),
                                              False)  # training tokens: the rd export's error weights
            loss = allocation.replaced_loss(model, train_gpt.calibration_batches(calibrating, torch.device("cpu")), False)
            rungs = {r.name: len(train_gpt.pack_artifact(state, {**meta, "export_rung": r.name}, zstd_level=LEVEL, rung=r))
                     for r in train_gpt.EXPORT_LADDER if r.name in ("int6", "mlp_int5")}
            for cap_name in ("mlp_int5", "int6"):
                cap = rungs[cap_name]
                positions = {}
                for allocation_name in ("ladder", "rd"):
                    lines = []
                    t0 = time.perf_counter()
                    if allocation_name == "ladder":
                        blob, rung = train_gpt.export_artifact(state, meta, 0, cap, LEVEL, 0, lines.append, QUANTIZER,
                                                               calibration)
                    else:
                        blob, rung = train_gpt.export_rd(state, meta, 0, cap, LEVEL, lines.append, QUANTIZER,
                                                         calibration, loss=None if os.environ.get("RD_LAMBDA") == "0"
                                                         else loss)
                    ms = 1000 * (time.perf_counter() - t0)
                    model.load_state_dict(train_gpt.unpack_artifact(blob, "<memory>").state)
                    result = scored()
                    after, positions[allocation_name] = result.val_bpb, result.position_losses
                    model.load_state_dict(state)
                    for line in lines:
                        if line.startswith(("export_group", "export_rd", "export_rung")):
                            tag, rest = line.split(" ", 1)  # the tag first: a log line (log_format) still
                            print(f"{tag} seed:{seed} cap:{cap_name} {rest}", flush=True)
                    print(f"export_compare seed:{seed} cap:{cap_name} cap_bytes:{cap} allocation:{allocation_name} "
                          f"chosen:{rung.name} model_bytes:{len(blob)} float_bpb:{before:.5f} roundtrip_bpb:{after:.5f} "
                          f"quant_gap:{after - before:+.5f} val_tokens:{tokens.numel() - 1} export_ms:{ms:.0f}", flush=True)
                paired(seed, cap_name, positions["rd"] - positions["ladder"], result.byte_count, s.train_seq_len)


if __name__ == "__main__":
    command, args = (sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else ("", [])
    if command == "sizes":
        sizes(args or ["1024:3", "8192:4"])
    elif command == "trained" and len(args) == 3:
        trained(*args)
    elif command == "time":
        timing(args or ["1024:3", "8192:4"])
    elif command == "compare":
        compare([int(a) for a in args] or [1337, 2024])
    else:
        sys.exit(__doc__)
