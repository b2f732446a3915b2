"""Case operators against plain tokenization, measured on the CPU (docs/caseops.md).

    python bench/caseops_compare.py --normaliser            # what nmt_nfkc changes, per corpus: seconds
    python bench/caseops_compare.py --vocabs 1024 8192 --seeds 1 2   # the table: tens of minutes

Two corpora: the built-in one (data/builtin_corpus.py: pydoc topics and docstrings, indented code
included) and a second of ordinary prose from this machine (--prose: the Vim user manual usr_*.txt and the
licence texts in /usr/share/common-licenses, one document a paragraph, whitespace folded to single spaces).
Each is prepared by data/prepare.py, plain and with --case-ops, at each vocabulary (the tokenizer trained on
the training documents), then the same tiny model is trained on each for the same number of steps of the
same number of tokens, for each seed, by train_gpt.py. The figures are train_gpt.py's: tokens a byte is
val_tokens / val_bytes of its data line (the bytes BPB divides by: for plain, SPEC section 5's count of the
normalised text; for case operators, the original text's through the sidecar), BPB its final line after the
int6 round trip, over the whole validation split (trimmed to whole sequences) in non-overlapping windows
(EVAL_STRIDE=0, to save CPU time). "bits a text byte" is BPB times
the bytes counted over the whole split over its UTF-8 bytes (the manifest's): the figure both tokenizations
share where plain's normaliser dropped bytes (the built-in corpus's indentation); 1 for case operators.

--normaliser: for each corpus, how many documents a tokenizer does not give back (decode, and the inverse
transform for case operators), and the bytes of what it gives back against the original's, for plain
(nmt_nfkc), case operators with nmt_nfkc (the records' setting) and case operators as prepared here (identity).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for folder in (REPO, REPO / "records", REPO / "data"):
    sys.path.insert(0, str(folder))

import case_ops  # noqa: E402
import log_format  # noqa: E402
import prepare  # noqa: E402
from builtin_corpus import builtin_documents  # noqa: E402

PROSE_SOURCES = (("/usr/share/vim/vim90/doc", "usr_*.txt"), ("/usr/share/common-licenses", "*"))
TRAINING = dict(NUM_LAYERS=2, MODEL_DIM=64, NUM_HEADS=4, NUM_KV_HEADS=2, MLP_MULT=3, BIGRAM_VOCAB_SIZE=512,
                BIGRAM_DIM=16, TRAIN_SEQ_LEN=128, TRAIN_BATCH_TOKENS=2048, WARMUP_STEPS=2, MAX_WALLCLOCK_SECONDS=0,
                VAL_LOSS_EVERY=0, VAL_MAX_TOKENS=0, TRAIN_LOG_EVERY=50, EVAL_STRIDE=0, EVAL_BATCH_SEQS=32,
                SWA_EVERY=10, ZSTD_LEVEL=3, COMPILE=0, GPTQ_RESERVE_SECONDS=0, GPTQ_CALIBRATION_TOKENS=8192,
                AUTOCAST_BF16=0, DEVICE="cpu")


def prose_documents() -> list[str]:
    docs = []
    for folder, pattern in PROSE_SOURCES:
        for path in sorted(Path(folder).glob(pattern)):
            if not path.is_file():
                continue
            text = path.read_text(encoding="utf-8", errors="replace")
            for paragraph in re.split(r"\n[ \t]*\n", text):
                words = paragraph.split()
                # prose: a paragraph of 12+ words, mostly alphabetic (not a table, a command list or a banner)
                if len(words) >= 12 and sum(w.isalpha() for w in words) >= 0.6 * len(words):
                    docs.append(" ".join(words))
    return docs


def corpora(which: list[str]) -> dict[str, list[str]]:
    found = {}
    if "builtin" in which:
        found["builtin"] = builtin_documents()[0]
    if "prose" in which:
        found["prose"] = prose_documents()
    return found


def normaliser_report(docs: list[str], val_docs: int, vocab: int) -> dict:
    """Documents not given back and bytes given back, per tokenizer kind, on the validation documents."""
    nfkc_case_ops = {**prepare.CASE_OPS_TOKENIZER_SETTINGS, "normalization_rule_name": "nmt_nfkc",
                     "remove_extra_whitespaces": True}
    kinds = {"plain_nmt_nfkc": (prepare.TOKENIZER_SETTINGS, False),
             "case_ops_nmt_nfkc": (nfkc_case_ops, True),
             "case_ops_identity": (prepare.CASE_OPS_TOKENIZER_SETTINGS, True)}
    original = docs[:val_docs]
    report = {"documents": len(original), "bytes": sum(len(d.encode()) for d in original)}
    for name, (settings, transformed) in kinds.items():
        train = docs[val_docs:]
        sp = prepare.tokenizer_from_bytes(prepare.train_tokenizer(
            map(case_ops.encode, train) if transformed else iter(train), vocab, settings)[0])
        back = []
        for doc in original:
            text = sp.decode(sp.encode(case_ops.encode(doc) if transformed else doc))
            try:
                back.append(case_ops.decode(text) if transformed else text)
            except case_ops.CaseOpsError:
                back.append(None)
        report[name] = {"documents_changed": sum(b != d for b, d in zip(back, original)),
                        "undecodable": sum(b is None for b in back),
                        "bytes_given_back": sum(len(b.encode()) for b in back if b is not None)}
    return report


def run(cmd: list[str], env: dict | None = None) -> str:
    proc = subprocess.run([sys.executable, *cmd], cwd=REPO, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def prepared(out: Path, corpus: str, docs: list[str], vocab: int, kind: str, val_docs: int) -> Path:
    folder = out / f"{corpus}_val{val_docs}_{kind}_{vocab}"
    if (folder / "manifest.json").is_file():
        return folder
    source = out / f"{corpus}.jsonl"
    if not source.is_file():
        source.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    run(["data/prepare.py", "--input", str(source), "--vocab-size", str(vocab), "--val-docs", str(val_docs),
         "--out-dir", str(folder), *(["--case-ops"] if kind == "case_ops" else [])])
    return folder


def counted_bytes(data: Path, vocab: int) -> int:
    """The bytes BPB counts over the whole validation split (train_gpt's rule for this data, nothing trimmed)."""
    import numpy as np
    import torch

    import train_gpt

    stream = np.concatenate([train_gpt.load_data_shard(p, vocab) for p in train_gpt.list_shards(str(data), "val")])
    tokens = torch.from_numpy(stream.astype(np.int64))
    sp = train_gpt.load_tokenizer(data / f"sp{vocab}_bpe.model", vocab)
    identity = train_gpt.data_identity(str(data), str(data / f"sp{vocab}_bpe.model"))
    tables = train_gpt.validation_byte_tables(sp, str(data), identity, tokens)
    return int(tables.target_bytes(tokens[:-1], tokens[1:], torch.arange(tokens.numel() - 1)).sum())


def trained(out: Path, data: Path, vocab: int, seed: int, steps: int) -> dict:
    results = out / "results.jsonl"
    key = f"{data.name}_seed{seed}_steps{steps}"
    if results.is_file():
        for line in results.read_text().splitlines():
            if json.loads(line)["key"] == key:
                return json.loads(line)
    settings = dict(TRAINING, DATA_PATH=data, TOKENIZER_PATH=data / f"sp{vocab}_bpe.model", VOCAB_SIZE=vocab,
                    OUTPUT_DIR=out / "runs" / key, RUN_ID=key, SEED=seed, ITERATIONS=steps,
                    WARMDOWN_ITERS=steps // 3)
    env = {**os.environ, **{k: str(v) for k, v in settings.items()}, "OMP_NUM_THREADS": "1"}
    log = run(["train_gpt.py"], env)
    data_line = log_format.last_line(log, "data").fields
    final = log_format.last_line(log, "final_int6_zstd_roundtrip_exact").fields
    manifest = json.loads((data / "manifest.json").read_text())
    row = {"key": key, "val_tokens": int(data_line["val_tokens"]), "val_bytes": int(data_line["val_bytes"]),
           "text_bytes": int(manifest["splits"]["val"]["bytes"]), "counted_bytes": counted_bytes(data, vocab),
           "val_bpb": float(final["val_bpb"]), "tokenization": data_line.get("tokenization", "plain")}
    with results.open("a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--normaliser", action="store_true", help="only what the tokenizers' normalisers change")
    parser.add_argument("--corpora", nargs="+", default=["builtin", "prose"])
    parser.add_argument("--vocabs", nargs="+", type=int, default=[1024])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--val-fraction", type=int, default=40, help="validation: the first 1/N of the documents")
    parser.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "caseops_compare"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    found = corpora(args.corpora)
    if args.normaliser:
        for corpus, docs in found.items():
            report = normaliser_report(docs, len(docs) // args.val_fraction, args.vocabs[0])
            print(f"normaliser corpus:{corpus} vocab:{args.vocabs[0]} " + json.dumps(report), flush=True)
        return
    print("| corpus | vocab | tokenization | bytes counted / text bytes | tokens a counted byte | BPB (" +
          ", ".join(f"seed {s}" for s in args.seeds) + ") | mean BPB | mean bits a text byte |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for corpus, docs in found.items():
        val_docs = len(docs) // args.val_fraction
        for vocab in args.vocabs:
            for kind in ("plain", "case_ops"):
                data = prepared(out, corpus, docs, vocab, kind, val_docs)
                rows = [trained(out, data, vocab, seed, args.steps) for seed in args.seeds]
                bpbs = [r["val_bpb"] for r in rows]
                per_text_byte = statistics.mean(r["val_bpb"] * r["counted_bytes"] / r["text_bytes"] for r in rows)
                print(f"| {corpus} ({len(docs)} docs, first {val_docs} validation) | {vocab} | {kind} | "
                      f"{rows[0]['counted_bytes']} / {rows[0]['text_bytes']} | "
                      f"{rows[0]['val_tokens'] / rows[0]['val_bytes']:.4f} | {', '.join(f'{b:.4f}' for b in bpbs)} | "
                      f"{statistics.mean(bpbs):.4f} | {per_text_byte:.4f} |", flush=True)


if __name__ == "__main__":
    main()
