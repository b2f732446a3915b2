"""
reliability_probe.py: try the settings and files of the export, TTT, the builders, the data and the record as a
demanding user would, one process at a time, and print a table of what happened (docs/reliability_probe.md).

    python bench/reliability_probe.py --work /tmp/probe [--out table.md] [--only WORD]

Each case runs the real script on tiny data (pydoc's help topics, 512-token vocabulary, a 2-layer model trained
for 2 steps) and is judged against what it should do: `refused` (exit 2, one line on stderr that names the
setting or file and a fix, no traceback), `noted` (exit 0 and a note line saying what the run does instead), or
`ok` (exit 0 and the line that shows the setting was used). The verdict column says whether it did.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TINY = dict(DEVICE="cpu", NUM_LAYERS=2, MODEL_DIM=64, NUM_HEADS=4, NUM_KV_HEADS=2, MLP_MULT=3, BIGRAM_VOCAB_SIZE=256,
            BIGRAM_DIM=16, TRAIN_SEQ_LEN=64, TRAIN_BATCH_TOKENS=1024, ITERATIONS=2, WARMDOWN_ITERS=1, WARMUP_STEPS=0,
            MAX_WALLCLOCK_SECONDS=0, VAL_LOSS_EVERY=0, VAL_BATCH_SIZE=4096, VAL_MAX_TOKENS=2049, TRAIN_LOG_EVERY=1,
            EVAL_STRIDE=32, EVAL_BATCH_SEQS=16, ZSTD_LEVEL=3, COMPILE=0, GPTQ_RESERVE_SECONDS=0, AUTOCAST_BF16=0,
            VOCAB_SIZE=512)


def case(surface, what, argv, env=None, expect="refused", text="", unset=()):
    return dict(surface=surface, what=what, argv=argv, env=env or {}, expect=expect, text=text, unset=unset)


def cases(w: dict) -> list[dict]:
    train, ev, ttt, table = ["train_gpt.py"], ["eval_final.py"], ["build_ttt_settings.py"], ["build_correction_table.py"]
    full = dict(USE_TTT=1, TTT_MODE="full", TTT_CHUNK_TOKENS=512)
    prep = [str(REPO / "data" / "prepare.py"), "--input", str(w["corpus"]), "--out-dir", str(w["root"] / "prep_out")]
    record_logs = next((REPO / "records" / "track_10min_16mb").glob("*/logs"))
    return [
        case("export", "calibration larger than the training data", train, dict(GPTQ_CALIBRATION_TOKENS="1e12"),
             text="GPTQ_CALIBRATION_TOKENS="),
        case("export", "calibration of 0 tokens", train, dict(GPTQ_CALIBRATION_TOKENS=0), text="GPTQ_CALIBRATION_TOKENS=0"),
        case("export", "calibration not a number", train, dict(GPTQ_CALIBRATION_TOKENS="lots"),
             text="GPTQ_CALIBRATION_TOKENS='lots'"),
        case("export", "reserve eats the cap (MAX_WALLCLOCK_SECONDS=8, default reserve 10)", train,
             dict(MAX_WALLCLOCK_SECONDS=8), text="GPTQ_RESERVE_SECONDS=10", unset=("GPTQ_RESERVE_SECONDS",)),
        case("export", "negative reserve", train, dict(GPTQ_RESERVE_SECONDS=-1), text="GPTQ_RESERVE_SECONDS=-1"),
        case("export", "reserve not finite", train, dict(GPTQ_RESERVE_SECONDS="nan"), text="GPTQ_RESERVE_SECONDS=nan"),
        case("export", "LQER rank 0 with tensors asked for", train, dict(LQER_RANK=0, LQER_TENSORS=3), text="LQER_RANK=0"),
        case("export", "negative LQER tensors", train, dict(LQER_TENSORS=-2), text="LQER_TENSORS=-2"),
        case("export", "LQER factor bits not offered", train, dict(LQER_FACTOR_BITS=7), text="LQER_FACTOR_BITS=7"),
        case("export", "unknown quantizer", train, dict(EXPORT_QUANTIZER="awq"), text="EXPORT_QUANTIZER=awq"),
        case("export", "unknown evaluation to size for", train, dict(EXPORT_FOR_EVAL="full"), text="EXPORT_FOR_EVAL=full"),
        case("export", "unknown code shipping", train, dict(SHIP_CODE="zip"), text="SHIP_CODE=zip"),
        case("export", "cap of 0 bytes", train, dict(ARTIFACT_CAP_BYTES=0), text="ARTIFACT_CAP_BYTES=0"),
        case("export", "zstd level 0", train, dict(ZSTD_LEVEL=0), text="ZSTD_LEVEL=0"),
        case("export", "misspelt GPTQ_CALIBRATON_TOKENS", train, dict(GPTQ_CALIBRATON_TOKENS=1000),
             text="GPTQ_CALIBRATON_TOKENS"),
        case("export", "calibration tokens with round-to-nearest and no LQER", train,
             dict(EXPORT_QUANTIZER="rtn", GPTQ_CALIBRATION_TOKENS=4096), "noted", "note unused:GPTQ_CALIBRATION_TOKENS=4096"),
        case("export", "LQER rank without LQER tensors; the reserve shortens the cap", train,
             dict(LQER_RANK=8, MAX_WALLCLOCK_SECONDS=100, GPTQ_RESERVE_SECONDS=5, GPTQ_CALIBRATION_TOKENS=256),
             "noted", "note unused:LQER_RANK=8"),
        case("model", "depth recurrence NUM_LOOPS=2 (not built here)", train, dict(NUM_LOOPS=2), text="NUM_LOOPS=2"),
        case("model", "value residual alpha 1.5", train, dict(VALUE_RESIDUAL_ALPHA=1.5), text="VALUE_RESIDUAL_ALPHA=1.5"),
        case("model", "negative leaky slope", train, dict(MLP_LEAKY_SLOPE=-0.1), text="MLP_LEAKY_SLOPE=-0.1"),
        case("model", "odd RoPE dims", train, dict(ROPE_DIMS=3), text="ROPE_DIMS=3"),
        case("model", "EMA decay 1 (never moves)", train, dict(EMA_DECAY=1), text="EMA_DECAY=1"),
        case("artifact", "carried TTT_EPOCHS=2.7", ev, dict(full, CHECKPOINT=w["ttt_epochs"]), text="TTT_EPOCHS=2.7"),
        case("artifact", "carried TTT_LR=true", ev, dict(full, CHECKPOINT=w["ttt_lr_true"]), text="TTT_LR=true"),
        case("artifact", "carried TTT_MODE=banana (TTT_MODE not given by hand)", ev, dict(USE_TTT=1, TTT_CHUNK_TOKENS=512,
             CHECKPOINT=w["ttt_mode"]), text="TTT_MODE=banana"),
        case("artifact", "carried TTT_MODE=banana, TTT_MODE=full by hand (wins)", ev, dict(full, CHECKPOINT=w["ttt_mode"]),
             "ok", "by_hand:TTT_MODE=full"),
        case("artifact", "carried unknown key TTT_FOO", ev, dict(full, CHECKPOINT=w["ttt_foo"]), text="damaged"),
        case("artifact", "model_config slope as a string", ev, dict(CHECKPOINT=w["slope_str"]), text="MLP_LEAKY_SLOPE"),
        case("artifact", "model_config value_residual_alpha 5.0", ev, dict(CHECKPOINT=w["alpha5"]),
             text="VALUE_RESIDUAL_ALPHA=5.0"),
        case("artifact", "model_config num_heads 0", ev, dict(CHECKPOINT=w["heads0"]), text="NUM_HEADS=0"),
        case("artifact", "train_seq_len as a string", ev, dict(CHECKPOINT=w["seq_str"]), text="TRAIN_SEQ_LEN"),
        case("data", "vocabulary-512 artifact, 1024-token tokenizer", ev, dict(TOKENIZER_PATH=w["tok1024"]),
             text="point TOKENIZER_PATH at the 512-token tokenizer"),
        case("data", "VOCAB_SIZE=1024 given to eval_final (the artifact decides)", ev, dict(VOCAB_SIZE=1024), "noted",
             "note unused:VOCAB_SIZE=1024"),
        case("ttt", "phased, one document, 5 phases", ev, dict(USE_TTT=1, TTT_MODE="phased", VAL_MAX_TOKENS=65,
             TTT_PHASES=5, TTT_GLOBAL_LR=0.05), text="TTT_PHASES=5"),
        case("ttt", "phased, no phases but a global rate", ev, dict(USE_TTT=1, TTT_MODE="phased", VAL_MAX_TOKENS=65,
             TTT_PHASES=0, TTT_GLOBAL_LR=0.05), "noted", "note unused:TTT_GLOBAL_LR=0.05"),
        case("ttt", "full, one chunk holds the stream", ev, dict(full, TTT_CHUNK_TOKENS=1000000),
             text="TTT_CHUNK_TOKENS=1000000"),
        case("ttt", "full mode given a LoRA rank", ev, dict(full, TTT_RANK=4), text="TTT_RANK=4"),
        case("ttt", "TTT_LR without USE_TTT", ev, dict(TTT_LR=0.01), text="TTT_LR=0.01"),
        case("ttt", "TTT_EPOCHS=0", ev, dict(full, TTT_EPOCHS=0), text="TTT_EPOCHS=0"),
        case("ttt", "TTT_MOMENTUM=1", ev, dict(full, TTT_MOMENTUM=1), text="TTT_MOMENTUM=1"),
        case("eval", "negative EVAL_MAX_SECONDS", ev, dict(EVAL_MAX_SECONDS=-1), text="EVAL_MAX_SECONDS=-1"),
        case("eval", "negative EVAL_SEQ_LEN", ev, dict(EVAL_SEQ_LEN=-5), text="EVAL_SEQ_LEN=-5"),
        case("eval", "causal mode without USE_CORRECTION", ev, dict(CORRECTION_MODE="causal"), text="CORRECTION_MODE"),
        case("eval", "causal hints on an artifact without knobs", ev, dict(USE_CORRECTION=1, CORRECTION_MODE="causal"),
             text="carries no hint knobs"),
        case("bundle", "base bundle asked for USE_TTT=1", [str(w["bundle"]), "eval_final.py"], full,
             text="EXPORT_FOR_EVAL=ttt"),
        case("bundle", "bundle asked for a script it lacks", [str(w["bundle"]), "build_ttt_settings.py"],
             text="SCRIPT one of"),
        case("builder", "CALIBRATE_TTT_TOKENS=0", ttt, dict(CALIBRATE_TTT_TOKENS=0), text="CALIBRATE_TTT_TOKENS=0"),
        case("builder", "CALIBRATE_TTT_TOKENS=1e8", ttt, dict(CALIBRATE_TTT_TOKENS="1e8"),
             text="CALIBRATE_TTT_TOKENS=100000000"),
        case("builder", "CALIBRATE_TTT_TOKENS=-5", ttt, dict(CALIBRATE_TTT_TOKENS=-5), text="CALIBRATE_TTT_TOKENS=-5"),
        case("builder", "full mode, slice of one chunk", ttt, dict(TTT_MODE="full", CALIBRATE_TTT_TOKENS=1000,
             TTT_CHUNK_TOKENS=32768), text="CALIBRATE_TTT_TOKENS=1000 slice"),
        case("builder", "TTT_MODE=lora (no search for it)", ttt, dict(TTT_MODE="lora"), text="TTT_MODE=lora"),
        case("builder", "full mode given a LoRA rank", ttt, dict(TTT_MODE="full", TTT_RANK=4), text="TTT_RANK=4"),
        case("builder", "TTT_LR and TTT_EPOCHS by hand", ttt, dict(TTT_MODE="full", CALIBRATE_TTT_TOKENS=1000,
             TTT_CHUNK_TOKENS=256, TTT_LR=0.02, TTT_EPOCHS=1), "ok", "by_hand:TTT_CHUNK_TOKENS=256,TTT_EPOCHS=1,TTT_LR=0.02"),
        case("builder", "the same again: the earlier copy kept", ttt, dict(TTT_MODE="full", CALIBRATE_TTT_TOKENS=1000,
             TTT_CHUNK_TOKENS=256, TTT_LR=0.03, TTT_EPOCHS=1), "ok", "written:kept_existing"),
        case("builder", "hint slice of 10 tokens", table, dict(CORRECTION_MODE="causal", HINT_TRAIN_TOKENS=10),
             text="HINT_TRAIN_TOKENS=10"),
        case("builder", "unknown table selection", table, dict(CORRECTION_SELECT="all"), text="CORRECTION_SELECT=all"),
        case("builder", "boost of 0", table, dict(CORRECTION_BOOST=0), text="CORRECTION_BOOST=0"),
        case("data", "prepare: vocabulary of 0", [*prep, "--vocab-size", "0"], text="--vocab-size"),
        case("data", "prepare: no validation documents", [*prep, "--val-docs", "0"], text="--val-docs"),
        case("data", "prepare: shards of 0 tokens", [*prep, "--shard-tokens", "0"], text="--shard-tokens"),
        case("data", "prepare: an input that does not exist", [str(REPO / "data" / "prepare.py"), "--input",
             str(w["root"] / "missing.jsonl"), "--out-dir", str(w["root"] / "prep_out")], text="missing.jsonl"),
        case("record", "make_record: a code log that does not exist", [str(REPO / "records" / "make_record.py"),
             "--logs", str(record_logs / "cpu_seed1337_train.txt"), "--code-logs", str(w["root"] / "nope.txt"),
             "--out", str(w["root"] / "rec")], text="nope.txt"),
    ]


def setup(root: Path) -> dict:
    """Tiny data (pydoc's help topics), a tiny artifact, tampered copies of it, a base-evaluation bundle."""
    import code_size
    import eval_final
    import train_gpt
    from pydoc_data.topics import topics

    root.mkdir(parents=True, exist_ok=True)
    docs = [topics[k] for k in sorted(topics)]
    corpus = root / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    data, env = root / "data", {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    if not (data / "manifest.json").is_file():
        for vocab, out in ((512, data), (1024, root / "data1024")):
            subprocess.run([sys.executable, "data/prepare.py", "--input", str(corpus), "--out-dir", str(out),
                            "--vocab-size", str(vocab), "--val-docs", "40", "--shard-tokens", "40000"], cwd=REPO,
                           env=env, check=True, capture_output=True)
    out = root / "run"
    base = dict(TINY, DATA_PATH=data, TOKENIZER_PATH=data / "sp512_bpe.model", OUTPUT_DIR=out, RUN_ID="probe")
    artifact = out / train_gpt.ARTIFACT_NAME
    if not artifact.is_file():
        subprocess.run([sys.executable, "train_gpt.py"], cwd=REPO, env={**env, **{k: str(v) for k, v in base.items()}},
                       check=True, capture_output=True)
    w = {"root": root, "corpus": corpus, "base": dict(base, CHECKPOINT=artifact), "tok1024": root / "data1024" /
         "sp1024_bpe.model"}
    blob = artifact.read_bytes()
    for name, config, meta, ttt in (
            ("ttt_epochs", {}, {}, {"TTT_MODE": "full", "TTT_EPOCHS": 2.7}),
            ("ttt_lr_true", {}, {}, {"TTT_MODE": "full", "TTT_LR": True}),
            ("ttt_mode", {}, {}, {"TTT_MODE": "banana"}), ("ttt_foo", {}, {}, {"TTT_FOO": 1}),
            ("slope_str", {"mlp_leaky_slope": "0.5"}, {}, None), ("alpha5", {"value_residual_alpha": 5.0}, {}, None),
            ("heads0", {"num_heads": 0}, {}, None), ("seq_str", {}, {"train_seq_len": "64"}, None)):
        header, body = train_gpt.artifact_parts(blob, "probe")
        header["meta"]["model_config"].update(config)
        header["meta"].update(meta)
        extras = {eval_final.TTT_EXTRA_NAME: json.dumps(ttt).encode()} if ttt is not None else {}
        w[name] = root / f"{name}.ptz"
        w[name].write_bytes(train_gpt.assemble_artifact(header, bytes(body), extras, 3))
    w["bundle"] = root / "bundle" / code_size.BUNDLE_NAME
    w["bundle"].parent.mkdir(exist_ok=True)
    w["bundle"].write_bytes(code_size.code_bundle({n: (REPO / n).read_bytes() for n in code_size.EVALUATION_CODE["base"]}))
    for stale in out.glob("final_model.int6.with_ttt*.ptz"):  # the builder's copies of an earlier probe
        stale.unlink()
    shutil.rmtree(root / "prep_out", ignore_errors=True)
    return w


def run_case(c: dict, w: dict, number: int) -> dict:
    own = dict(OUTPUT_DIR=w["root"] / "cases" / str(number), RUN_ID="case")  # a training's artifact and log apart
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           **{k: str(v) for k, v in {**w["base"], **own, **c["env"]}.items()}}
    for name in c["unset"]:
        env.pop(name, None)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *c["argv"]], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - t0
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    if c["expect"] == "refused":
        line = errors[-1] if errors else ""
        good = (proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr and c["text"] in line
                and ("; " in line or "usage" in line))
    else:
        found = [line for line in proc.stdout.splitlines() if c["text"] in line]
        line = found[-1] if found else (errors[-1] if errors else "")
        good = proc.returncode == 0 and bool(found)
    return dict(c, rc=proc.returncode, line=line, seconds=seconds, good=good)


def table(results: list[dict]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace(str(REPO) + "/", "")

    rows = ["| # | surface | case | command (beside the tiny settings) | expected | observed (exit; the line) | verdict |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for i, r in enumerate(results, 1):
        argv = " ".join(Path(a).name if "/" in a else a for a in r["argv"])
        command = " ".join(f"{k}={Path(str(v)).name if '/' in str(v) else v}" for k, v in r["env"].items())
        command += "".join(f" (unset {n})" for n in r["unset"])
        line = r["line"].split(": error: ", 1)[-1]
        line = line[:220] + ("…" if len(line) > 220 else "")
        rows.append(f"| {i} | {r['surface']} | {cell(r['what'])} | `{cell(command)} {cell(argv)}` | {r['expect']}: "
                    f"`{cell(r['text'])}` | {r['rc']}; {cell(line)} | {'good' if r['good'] else 'NOT GOOD'} |")
    return "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="a folder for the tiny data and artifacts")
    parser.add_argument("--out", type=Path, help="also write the table here")
    parser.add_argument("--only", default="", help="run only the cases whose surface or description holds this")
    options = parser.parse_args()
    w = setup(options.work.resolve())
    results = []
    shutil.rmtree(w["root"] / "cases", ignore_errors=True)
    for number, c in enumerate(cases(w), 1):
        if options.only and options.only not in c["surface"] + " " + c["what"]:
            continue
        results.append(run_case(c, w, number))
        r = results[-1]
        print(f"probe case:{len(results)} good:{int(r['good'])} rc:{r['rc']} seconds:{r['seconds']:.1f} "
              f"# {r['what']}: {r['line'][:160]}", flush=True)
    text = table(results)
    print(text, end="")
    print(f"probe_done cases:{len(results)} good:{sum(r['good'] for r in results)}")
    if options.out:
        options.out.write_text(text)


if __name__ == "__main__":
    main()
