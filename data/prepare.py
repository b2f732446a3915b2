"""
prepare.py: text in, token shards out, in the format train_gpt.py reads (SPEC sections 3 and 4).

    python data/prepare.py --builtin --out-dir data/datasets/builtin_sp1024
    python data/prepare.py --input docs_selected.jsonl --out-dir data/datasets/fineweb10B_sp1024 \
        --tokenizer-out data/tokenizers/fineweb_1024_bpe.model
    python data/prepare.py --input notes/ --txt-docs paragraph --tokenizer my.model --vocab-size 1024 --out-dir DIR

    python data/prepare.py --input data/docs_selected.jsonl --vocab-size 8192 \
        --out-dir data/datasets/fineweb10B_sp8192 --tokenizer-out data/tokenizers/fineweb_8192_bpe.model

Options: --val-docs N (default 50,000, at most a tenth of the documents), --shard-tokens N
(default 100,000,000), --max-docs N (read only the first N documents), --tokenizer-train-docs N
(default 100,000; 0 for all), --vocab-size N (default 1024).

Inputs, read in the order given (a folder: its .txt and .jsonl files in sorted path order),
followed by the built-in corpus when --builtin is given:
  .txt    one document per file, or with --txt-docs paragraph one per blank-line-separated
          paragraph; UTF-8.
  .jsonl  one JSON object per line with a "text" field (the shape of the official
          docs_selected.jsonl); blank lines are skipped.
  --builtin  the pydoc topics and standard-library docstrings of this Python (builtin_corpus.py).
A document that is empty or only whitespace is skipped, except in the official list.

The official split (official_split.py): when the input is the challenge's document list
(docs_selected.jsonl, or a .jsonl with a .source_manifest.json beside it), it must be the only
input; the file is checked against its source manifest (bytes, sha256, number of documents);
validation is exactly its first 50,000 documents (--val-docs may only say 50000); every document
counts, an empty one too, as in the challenge's own export. For every input, once the shards are
written, they are read back and checked by document hash: validation must hold exactly the first
val_docs documents and training none of them, or nothing is written. The manifest's "split" says
which rule was used and what the check found; train_gpt.py logs it.

Tokenizer: with --tokenizer, an existing SentencePiece model is used as it is (its vocabulary must
equal --vocab-size). Otherwise a BPE model is trained with exactly the SPEC section 4 settings on
the training documents (never the validation ones), single-threaded and in input order so the
same text gives a byte-identical .model, and written to --tokenizer-out.

Case operators (--case-ops, case_ops.py, docs/caseops.md): every document is transformed (capitals
as marker characters) before the tokenizer learns from it and before it is encoded; the tokenizer
declares the four markers as user-defined symbols and normalises nothing (identity, spaces kept), so
decoding and inverting gives back the original. The split and its hash check are those of the
untransformed documents (the same documents, in the same order). The validation byte sidecar
val_bytes.bin (the shard format, one uint16 a validation token: BOS and operators 0, every other token
the bytes of the original text it stands for) is written beside the shards; BPB counts it.

Output in --out-dir: fineweb_val_000000.bin, ... holding the first --val-docs documents, then
fineweb_train_000000.bin, ... holding the rest, each document written as BOS (id 1) and its
tokens, no EOS; every shard holds --shard-tokens tokens except the last of its split. Then
manifest.json: documents, tokens and text bytes per split, the sha256 of every file written, the
tokenizer and its settings, and what the input was. The same input and options give the same
files, byte for byte.

All or nothing: the new folder is built beside --out-dir (.NAME.staging-PID) and swapped in only
when every file is written, so a run that fails or is interrupted leaves --out-dir exactly as it
was, and one that finishes leaves no shard of an earlier run (train_gpt.py never reads a mix).
Files of the earlier folder that this run does not write (a --tokenizer kept there, notes) are
carried over; its shards and manifest are not. Until the swap both folders take disk space.
A tokenizer trained to --tokenizer-out outside the folder is written once the shards are complete.

Problems with the input are reported on one line naming the file (and line) and the fix, exit 2.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

DATA_DIR = Path(__file__).resolve().parent
REPO_ROOT = DATA_DIR.parent
for folder in (str(REPO_ROOT), str(DATA_DIR)):  # train_gpt.py and builtin_corpus.py, from any working folder
    if folder not in sys.path:
        sys.path.insert(0, folder)

import case_ops  # noqa: E402
from builtin_corpus import MINIMUM_CORPUS_BYTES, builtin_documents, describe  # noqa: E402
from official_split import OfficialList, check_list_file, check_split, document_hashes, official_list  # noqa: E402
from train_gpt import (  # noqa: E402
    MANIFEST_NAME,
    PLAIN_TOKENIZATION,
    load_tokenizer,
    log_value,
    SHARD_HEADER_BYTES,
    SHARD_MAGIC,
    SHARD_TOKEN_DTYPE,
    SHARD_VERSION,
    VAL_BYTES_NAME,
    InputError,
    atomic_write_bytes,
    file_sha256,
    write_data_shard,
)

BOS_ID = 1
DEFAULT_VOCAB_SIZE = 1024
DEFAULT_SHARD_TOKENS = 100_000_000
# SPEC section 3 validates on the first 50,000 documents. Without --val-docs that is the
# default, lowered to a tenth of the documents for inputs smaller than 500,000 documents.
DEFAULT_VAL_DOCS = 50_000
DEFAULT_VAL_FRACTION = 10
DEFAULT_TOKENIZER_TRAIN_DOCS = 100_000  # SentencePiece holds its training text in memory
SHARD_PATTERN = re.compile(r"fineweb_(train|val)_\d{6}\.bin|" + re.escape(VAL_BYTES_NAME))

# SPEC section 4, plus what makes training reproducible: one thread, the sentences in input order,
# all of them. max_sentence_length is SentencePiece's default, written out so the manifest shows it.
TOKENIZER_SETTINGS = {
    "model_type": "bpe",
    "byte_fallback": True,
    "split_digits": True,
    "normalization_rule_name": "nmt_nfkc",
    "add_dummy_prefix": False,
    "character_coverage": 0.999,
    "pad_id": 0,
    "bos_id": BOS_ID,
    "eos_id": 2,
    "unk_id": 3,
    "num_threads": 1,
    "shuffle_input_sentence": False,
    "input_sentence_size": 0,
    "max_sentence_length": 4192,
}

# --case-ops (case_ops.py): the tokenizer learns and encodes the transformed text, the markers declared as
# user-defined symbols (one token each, ids 4-7). Its normaliser is the identity and keeps every space, so
# that decoding gives back the transformed text exactly and its inverse the original: nmt_nfkc would fold
# runs of spaces and compatibility characters (docs/caseops.md counts what it changes). The bytes BPB
# counts come from the original text through the validation byte sidecar (VAL_BYTES_NAME).
CASE_OPS_TOKENIZER_SETTINGS = {**TOKENIZER_SETTINGS, "normalization_rule_name": "identity",
                               "remove_extra_whitespaces": False, "user_defined_symbols": list(case_ops.MARKERS)}

# Documents are encoded in batches of about this much text; SentencePiece spreads a batch over threads.
ENCODE_BATCH_BYTES = 4 << 20
ENCODE_BATCH_DOCS = 4096
PROGRESS_EVERY_S = 2.0


# ----------------------------------------------------------------------------------------------
# Reading documents
# Every pass over the input (counting, tokenizer training, encoding) re-reads it from the start
# through one generator, so a big .jsonl is never held in memory and every pass sees the same
# documents in the same order.
# ----------------------------------------------------------------------------------------------


def find_input_files(inputs: list[str]) -> list[Path]:
    files = []
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".jsonl"))
            if not found:
                raise InputError(f"--input {given}: the folder holds no .txt or .jsonl files; point --input at files "
                                 "or a folder of them")
            files.extend(found)
        elif path.is_file():
            if path.suffix not in (".txt", ".jsonl"):
                raise InputError(f"--input {given}: unknown file type {path.suffix!r}; give .txt (plain UTF-8 text) "
                                 "or .jsonl (one {\"text\": ...} object a line)")
            files.append(path)
        else:
            raise InputError(f"--input {given}: no such file or folder; check the path")
    return files


def read_txt(path: Path, txt_docs: str) -> Iterator[str]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (invalid byte at offset {e.start}); convert the file to UTF-8") from None
    if txt_docs == "file":
        yield text
    else:
        yield from (p.strip() for p in re.split(r"\n[ \t\r]*\n", text.replace("\r\n", "\n")))


def read_jsonl(path: Path) -> Iterator[str]:
    with open(path, "rb") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                record = json.loads(line)
            except UnicodeDecodeError as e:
                raise InputError(f"{where}: not UTF-8 (invalid byte at column {e.start + 1}); "
                                 "convert the file to UTF-8") from None
            except json.JSONDecodeError as e:
                raise InputError(f"{where}: malformed JSON ({e.msg} at column {e.colno}); fix or delete that line") from None
            if not isinstance(record, dict) or "text" not in record:
                raise InputError(f'{where}: no "text" field; every line must be a JSON object like {{"text": "..."}}')
            if not isinstance(record["text"], str):
                raise InputError(f'{where}: the "text" field is a {type(record["text"]).__name__}, not a string; '
                                 "store the document as a JSON string")
            yield record["text"]


def iter_documents(files: list[Path], builtin: list[str], txt_docs: str, max_docs: int | None,
                   keep_empty: bool = False) -> Iterator[str]:
    """Every non-empty document of the input (with keep_empty every one), in order, at most max_docs of them."""
    def everything() -> Iterator[str]:
        for path in files:
            yield from read_jsonl(path) if path.suffix == ".jsonl" else read_txt(path, txt_docs)
        yield from builtin

    documents = everything() if keep_empty else (doc for doc in everything() if doc.strip())
    return itertools.islice(documents, max_docs)


def count_up_to(documents: Iterable[str], limit: int) -> int:
    return sum(1 for _ in itertools.islice(documents, limit))


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------


def training_sentences(documents: Iterable[str]) -> Iterator[str]:
    """SentencePiece learns from sentences: the non-empty lines of the documents."""
    for doc in documents:
        for line in doc.split("\n"):
            if line.strip():
                yield line


def train_tokenizer(documents: Iterable[str], vocab_size: int,
                    settings: dict = TOKENIZER_SETTINGS) -> tuple[bytes, int]:
    """The serialized model and the number of documents it learned from; the same documents give the same bytes."""
    import sentencepiece as spm

    reading = Progress("tokenizer_read", counts_tokens=False)
    input_error: InputError | None = None

    def counted(docs: Iterable[str]) -> Iterator[str]:
        # SentencePiece turns an exception raised while it reads into its own RuntimeError;
        # keep the input's error so the user sees it, not the trainer's wrapping.
        nonlocal input_error
        try:
            for doc in docs:
                reading.update(1, 0, len(doc.encode("utf-8")))
                yield doc
        except InputError as e:
            input_error = e
            raise

    model = io.BytesIO()
    try:
        # minloglevel only silences the trainer's log; it is not stored in the model.
        spm.SentencePieceTrainer.Train(sentence_iterator=training_sentences(counted(documents)), model_writer=model,
                                       vocab_size=vocab_size, minloglevel=2, **settings)
    except RuntimeError as e:
        if input_error is not None:
            raise input_error from None
        reason = str(e).split("] ", 1)[-1].strip() or "no training text"
        raise InputError(f"SentencePiece could not train a {vocab_size}-token tokenizer on this input: {reason}; "
                         "use more text or another --vocab-size") from None
    return model.getvalue(), reading.documents


def load_tokenizer_file(path: Path, vocab_size: int):
    sp = load_tokenizer(path, vocab_size, path_label="--tokenizer ", vocab_label="--vocab-size ")
    if sp.bos_id() != BOS_ID:
        raise InputError(f"--tokenizer {path}: its BOS id is {sp.bos_id()}, but shards mark documents with id {BOS_ID}; "
                         "use a tokenizer trained with bos_id=1 (as data/prepare.py trains them)")
    return sp


def tokenizer_from_bytes(model: bytes):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(model)
    return sp


# ----------------------------------------------------------------------------------------------
# Encoding and shards
# ----------------------------------------------------------------------------------------------


def encode_documents(sp, texts: list[str]) -> np.ndarray:
    """The documents as one token stream: BOS, then each document's tokens; (sum of lengths + docs,) uint16."""
    return token_stream(encode_ids(sp, texts))


def encode_ids(sp, texts: list[str]) -> list[list[int]]:
    return sp.encode(texts, out_type=int, num_threads=os.cpu_count() or 1)


def token_stream(ids: list[list[int]]) -> np.ndarray:
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    stream = np.empty(int(lengths.sum()) + len(ids), dtype=SHARD_TOKEN_DTYPE)
    bos_positions = np.concatenate(([0], np.cumsum(lengths + 1)[:-1])).astype(np.int64)
    is_token = np.ones(stream.size, dtype=bool)
    is_token[bos_positions] = False
    stream[bos_positions] = BOS_ID
    stream[is_token] = np.fromiter(itertools.chain.from_iterable(ids), dtype=SHARD_TOKEN_DTYPE, count=int(lengths.sum()))
    return stream


class ShardWriter:
    """Cuts one split's token stream into shards of exactly shard_tokens tokens, the last one shorter."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int):
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.shards: list[dict] = []
        self.documents = self.tokens = self.text_bytes = 0

    def add(self, stream: np.ndarray, documents: int, text_bytes: int) -> None:
        self.documents += documents
        self.tokens += stream.size
        self.text_bytes += text_bytes
        self.pending.append(stream)
        self.pending_tokens += stream.size
        if self.pending_tokens >= self.shard_tokens:
            joined, start = np.concatenate(self.pending), 0
            while joined.size - start >= self.shard_tokens:
                self._write(joined[start : start + self.shard_tokens])
                start += self.shard_tokens
            self.pending = [joined[start:]]
            self.pending_tokens = joined.size - start

    def finish(self) -> dict:
        if self.pending_tokens:
            self._write(np.concatenate(self.pending))
            self.pending, self.pending_tokens = [], 0
        return {"documents": self.documents, "tokens": self.tokens, "bytes": self.text_bytes, "shards": self.shards}

    def _write(self, tokens: np.ndarray) -> None:
        path = self.out_dir / f"fineweb_{self.split}_{len(self.shards):06d}.bin"
        write_data_shard(path, tokens)
        self.shards.append({"file": path.name, "tokens": int(tokens.size), "sha256": file_sha256(path)})


class Progress:
    """key:value progress lines, at most one every PROGRESS_EVERY_S seconds, and a final one."""

    def __init__(self, stage: str, counts_tokens: bool = True):
        self.stage, self.counts_tokens, self.start = stage, counts_tokens, time.perf_counter()
        self.last_print = self.start
        self.documents = self.tokens = self.text_bytes = 0

    def update(self, documents: int, tokens: int, text_bytes: int) -> None:
        self.documents += documents
        self.tokens += tokens
        self.text_bytes += text_bytes
        if time.perf_counter() - self.last_print >= PROGRESS_EVERY_S:
            self.print()

    def print(self, final: bool = False) -> None:
        self.last_print = now = time.perf_counter()
        seconds = now - self.start
        megabytes = self.text_bytes / 1e6
        tokens = f" tokens:{self.tokens}" if self.counts_tokens else ""
        print(f"{self.stage}{'_done' if final else ''} docs:{self.documents}{tokens} MB:{megabytes:.2f} "
              f"seconds:{seconds:.2f} MB_per_s:{megabytes / max(seconds, 1e-9):.2f}", flush=True)

    @property
    def megabytes_per_second(self) -> float:
        return self.text_bytes / 1e6 / max(time.perf_counter() - self.start, 1e-9)


def split_of(index: int, val_docs: int) -> str:
    """The split of the document at index (from 0) in input order: the first val_docs are validation."""
    return "val" if index < val_docs else "train"


def token_byte_lengths(sp) -> np.ndarray:
    """(vocab,) int64: the UTF-8 bytes each token decodes to (a byte piece 1, "▁" a space, control 0)."""
    lengths = np.zeros(sp.vocab_size(), dtype=np.int64)
    for i in range(sp.vocab_size()):
        if sp.is_byte(i):
            lengths[i] = 1
        elif not (sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i)):
            lengths[i] = len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
    return lengths


def original_token_bytes(ids: list[int], encoded: str, lengths: np.ndarray, index: int) -> np.ndarray:
    """(len(ids),) int64: the bytes of the ORIGINAL document each token stands for. The tokens decode to the
    transformed text with a literal U+2581 turned into a space (the identity normaliser keeps everything else);
    each token gets the original bytes of its span (case_ops.original_byte_weights: operators 0), so the
    document's tokens add up to exactly its UTF-8 bytes."""
    spans = lengths[np.asarray(ids, dtype=np.int64)]
    ends = np.cumsum(spans)
    weights = case_ops.original_byte_weights(encoded).astype(np.int64)
    raw = np.frombuffer(encoded.encode("utf-8"), dtype=np.uint8)
    lower_eighth = np.flatnonzero((raw[:-2] == 0xE2) & (raw[1:-1] == 0x96) & (raw[2:] == 0x81))  # U+2581
    if lower_eighth.size:  # the tokenizer gives it back as one byte, a space: its 3 bytes go on that byte
        weights[lower_eighth] = 3
        weights = np.delete(weights, np.concatenate([lower_eighth + 1, lower_eighth + 2]))
    if (ends[-1] if ends.size else 0) != weights.size:
        raise InputError(f"validation document #{index:,}: its {len(ids)} tokens decode to {int(ends[-1]) if ends.size else 0} "
                         f"bytes, the transformed text has {weights.size}; --case-ops needs a tokenizer with the identity "
                         "normaliser (let data/prepare.py --case-ops train it, or give one it trained)")
    cumulative = np.concatenate(([0], np.cumsum(weights)))
    return cumulative[ends] - cumulative[ends - spans]


def write_shards(documents: Iterable[str], sp, out_dir: Path, val_docs: int, shard_tokens: int,
                 case_operators: bool = False) -> tuple[dict, Progress, np.ndarray, np.ndarray | None]:
    """Encodes the documents in batches; the first val_docs go to val shards, the rest to train shards.
    Also returns every document's hash (official_split.document_hashes) in input order, for the split check,
    and with case_operators the validation stream's byte sidecar: (val tokens,) uint16, BOS 0, every other
    token the bytes of the original text it stands for (original_token_bytes)."""
    writers = {split: ShardWriter(out_dir, split, shard_tokens) for split in ("val", "train")}
    progress = Progress("encode")
    batch: list[str] = []
    batch_bytes, batch_split = 0, "val"
    hashes: list[np.ndarray] = []
    sidecar: list[np.ndarray] = []
    lengths = token_byte_lengths(sp) if case_operators else None

    def flush() -> None:
        nonlocal batch, batch_bytes
        if batch:
            texts = [case_ops.encode(doc) for doc in batch] if case_operators else batch
            ids = encode_ids(sp, texts)
            stream = token_stream(ids)
            hashes.append(document_hashes(stream))
            if case_operators and batch_split == "val":
                first = sum(h.size for h in hashes[:-1])
                for index, (doc_ids, text) in enumerate(zip(ids, texts), start=first):
                    sidecar.extend((np.zeros(1, np.int64), original_token_bytes(doc_ids, text, lengths, index)))
            writers[batch_split].add(stream, len(batch), batch_bytes)
            progress.update(len(batch), stream.size, batch_bytes)
        batch, batch_bytes = [], 0

    for index, doc in enumerate(documents):
        split = split_of(index, val_docs)
        if split != batch_split:  # a batch never spans the two splits
            flush()
            batch_split = split
        batch.append(doc)
        batch_bytes += len(doc.encode("utf-8"))
        if batch_bytes >= ENCODE_BATCH_BYTES or len(batch) >= ENCODE_BATCH_DOCS:
            flush()
    flush()
    progress.print(final=True)
    splits = {split: writer.finish() for split, writer in writers.items()}
    val_bytes = None
    if case_operators:
        val_bytes = np.concatenate([np.zeros(0, np.int64), *sidecar])
        if val_bytes.size != splits["val"]["tokens"] or int(val_bytes.sum()) != splits["val"]["bytes"]:
            raise InputError(f"the validation byte sidecar holds {val_bytes.size} tokens and {int(val_bytes.sum())} "
                             f"bytes, the shards {splits['val']['tokens']} and the text {splits['val']['bytes']}; "
                             "report this (a tokenizer that drops text?)")
        if val_bytes.size and val_bytes.max() >= 2**16:
            raise InputError("a validation token stands for more than 65,535 bytes of text, which the uint16 byte "
                             "sidecar cannot hold; remove the run of whitespace from the input")
    return splits, progress, np.concatenate([np.zeros(0, np.uint64), *hashes]), val_bytes


# ----------------------------------------------------------------------------------------------
# The output folder, all or nothing
# Everything that goes into --out-dir is written to a staging folder beside it (.NAME.staging-PID,
# in the same parent so that the moves are renames within one file system). Once every file is
# there, the swap renames the old folder to .NAME.old-PID, the staging folder to NAME, and deletes
# the old one. A run that fails or is interrupted deletes its staging folder and never touches
# NAME. A run killed outright (SIGKILL, power cut) can leave a staging folder, which the next run
# deletes, or, killed between the two renames, the old folder set aside and nothing at NAME: the
# next run renames it back before anything else (or deletes it when NAME is there, which means
# the swap had finished). Two runs writing the same folder at the same time are not supported.
# ----------------------------------------------------------------------------------------------


def beside(folder: Path, kind: str, pid: int | None = None) -> Path:
    return folder.with_name(f".{folder.name}.{kind}-{os.getpid() if pid is None else pid}")


def left_beside(folder: Path, kind: str) -> list[Path]:
    """Staging ("staging") or set-aside ("old") folders of earlier runs next to folder."""
    if not folder.parent.is_dir():
        return []
    pattern = re.compile(rf"\.{re.escape(folder.name)}\.{kind}-\d+")
    return sorted(p for p in folder.parent.iterdir() if pattern.fullmatch(p.name))


def recover_output_folder(folder: Path) -> None:
    """Cleans up after an earlier run that was killed (see above); says what it did."""
    for staging in left_beside(folder, "staging"):
        shutil.rmtree(staging)
        print(f"removed {staging} (the unfinished output of an earlier run that was stopped)", flush=True)
    for aside in left_beside(folder, "old"):
        if not os.path.lexists(folder):
            os.rename(aside, folder)
            print(f"restored {folder} from {aside} (an earlier run was stopped while swapping in its output)",
                  flush=True)
        else:
            shutil.rmtree(aside)
            print(f"removed {aside} (the output an earlier run had replaced but not yet deleted)", flush=True)


def carry_over(source: Path, target: Path, top: bool = True) -> None:
    """Hard-links (or copies) into target what source holds and target does not; at the top level not
    the old shards and manifest, which this run replaces."""
    for entry in sorted(source.iterdir()):
        if top and (SHARD_PATTERN.fullmatch(entry.name) or entry.name == MANIFEST_NAME):
            continue
        destination = target / entry.name
        if entry.is_dir() and not entry.is_symlink():
            if os.path.lexists(destination) and not destination.is_dir():
                continue
            destination.mkdir(exist_ok=True)
            carry_over(entry, destination, top=False)
        elif os.path.lexists(destination):
            continue  # written by this run
        elif entry.is_symlink():
            os.symlink(os.readlink(entry), destination)
        else:
            try:
                os.link(entry, destination)
            except OSError:
                shutil.copy2(entry, destination)
        if top:
            print(f"kept {entry.name} from the earlier {source} (not written by prepare.py)", flush=True)


def swap_in(staging: Path, folder: Path) -> None:
    aside = None
    if os.path.lexists(folder):
        carry_over(folder, staging)
        aside = beside(folder, "old")
        os.rename(folder, aside)
    try:
        os.rename(staging, folder)
    except BaseException:
        if aside is not None and not os.path.lexists(folder):
            os.rename(aside, folder)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
        if os.path.lexists(aside):
            print(f"warning: could not delete {aside}, the replaced output; delete it by hand", file=sys.stderr)


class Staging:
    """with Staging(folder) as staging: write into staging, then swap_in(staging, folder). On any
    exception or interrupt the staging folder, and any parent folder it had to create, is deleted."""

    def __init__(self, folder: Path):
        self.folder, self.path = folder, beside(folder, "staging")
        self.created: list[Path] = []  # missing parents, deepest first

    def __enter__(self) -> Path:
        parent = self.folder.parent
        while not parent.exists():
            self.created.append(parent)
            parent = parent.parent
        self.path.mkdir(parents=True)
        return self.path

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None:
            return
        shutil.rmtree(self.path, ignore_errors=True)
        for parent in self.created:
            try:
                parent.rmdir()
            except OSError:
                break


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineErrors(description="Tokenize text into train_gpt.py shards (SPEC sections 3-4).")
    parser.add_argument("--input", action="append", default=[], metavar="PATH",
                        help=".txt or .jsonl file, or a folder of them; repeatable")
    parser.add_argument("--builtin", action="store_true", help="add the built-in corpus (pydoc topics and stdlib docstrings)")
    parser.add_argument("--txt-docs", choices=("file", "paragraph"), default="file",
                        help="a .txt file is one document (file) or one per blank-line-separated paragraph")
    parser.add_argument("--tokenizer", metavar="MODEL", help="use this SentencePiece .model instead of training one")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    parser.add_argument("--out-dir", required=True, help="folder for the shards and manifest.json")
    parser.add_argument("--tokenizer-out", metavar="PATH",
                        help="where the trained tokenizer goes (default: OUT_DIR/sp{VOCAB}_bpe.model)")
    parser.add_argument("--val-docs", type=int,
                        help=f"the first N documents are validation (default {DEFAULT_VAL_DOCS}, "
                             f"at most 1/{DEFAULT_VAL_FRACTION} of the documents)")
    parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS)
    parser.add_argument("--max-docs", type=int, help="read only the first N documents")
    parser.add_argument("--case-ops", action="store_true",
                        help="lossless case operators (case_ops.py) before the tokenizer; writes the validation "
                             f"byte sidecar {VAL_BYTES_NAME}")
    parser.add_argument("--tokenizer-train-docs", type=int, default=DEFAULT_TOKENIZER_TRAIN_DOCS,
                        help="train the tokenizer on at most this many training documents (0: all)")
    args = parser.parse_args(argv)

    if not args.input and not args.builtin:
        parser.error("give --input PATH (repeatable) and/or --builtin")
    if args.tokenizer and args.tokenizer_out:
        parser.error("--tokenizer-out names where a trained tokenizer goes; with --tokenizer nothing is trained")
    for name in ("val_docs", "shard_tokens", "max_docs"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1; give e.g. --{name.replace('_', '-')} "
                         f"{ {'val_docs': 50000, 'shard_tokens': DEFAULT_SHARD_TOKENS, 'max_docs': 1000}[name]}")
    if args.tokenizer_train_docs < 0:
        parser.error("--tokenizer-train-docs must be 0 (all) or more; give e.g. --tokenizer-train-docs 0")
    if not 2 <= args.vocab_size <= 2**16:
        parser.error("--vocab-size must be between 2 and 65536 (token ids are stored as uint16); give e.g. "
                     "--vocab-size 1024")
    return args


class OneLineErrors(argparse.ArgumentParser):
    """Bad arguments end in one line naming the option and the fix (exit 2), as every script here refuses input."""
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def relative_to_or_as_given(path: Path, folder: Path, given: str) -> str:
    """A path the manifest can hold without tying the output to where it was made."""
    try:
        return path.resolve().relative_to(folder.resolve()).as_posix()
    except ValueError:
        return given


def choose_val_docs(args: argparse.Namespace, documents: Callable[[], Iterator[str]],
                    official: OfficialList | None = None) -> int:
    """Checks there is something to validate on and something left to train on; the official list's split
    is its first official.val_docs documents, whatever --val-docs says."""
    wanted = args.val_docs
    if official is not None:
        if wanted is not None and wanted != official.val_docs:
            first, last = sorted((wanted, official.val_docs))
            moved = (f"{document_span(first, last - 1)} would go into the training shards (the accident of "
                     "openai/parameter-golf#2127)" if wanted < official.val_docs else
                     f"{document_span(first, last - 1)} would be taken from training and scored")
            raise InputError(f"--val-docs {wanted}: {official.path} is the official document list, whose validation "
                             f"split is its first {official.val_docs:,} documents; {moved}; drop --val-docs")
        wanted = official.val_docs
        counted = count_up_to(documents(), wanted + 1)
    elif wanted is None:
        counted = count_up_to(documents(), DEFAULT_VAL_DOCS * DEFAULT_VAL_FRACTION)
        wanted = max(1, min(DEFAULT_VAL_DOCS, counted // DEFAULT_VAL_FRACTION))
    else:
        counted = count_up_to(documents(), wanted + 1)
    if counted == 0:
        raise InputError(f"{describe_inputs(args)}: no documents (the input is empty or only whitespace); "
                         "give files with text in them")
    if counted <= wanted and official is not None:
        raise InputError(f"{official.path}: the official split takes its first {wanted:,} documents for validation, "
                         f"and only {counted:,} were read, leaving none to train on; " + (
                             f"raise --max-docs above {wanted:,}" if args.max_docs else
                             "the list is incomplete: download it again with python data/download_fineweb.py --with-docs"))
    if counted <= wanted:
        raise InputError(f"{describe_inputs(args)}: --val-docs {wanted} takes all {counted} documents, leaving none to "
                         f"train on; lower --val-docs below {counted} or add more text")
    return wanted


def document_span(first: int, last: int) -> str:
    return f"document #{first:,}" if first == last else f"documents #{first:,} to #{last:,}"


def find_official_list(args: argparse.Namespace, files: list[Path]) -> OfficialList | None:
    """The official list when the input is it, alone; refuses it mixed with other input."""
    found = [official for official in map(official_list, (p for p in files if p.suffix == ".jsonl")) if official]
    if not found:
        return None
    if len(files) > 1 or args.builtin:
        raise InputError(f"--input {found[0].path}: the official document list must be the only input (its first "
                         f"{found[0].val_docs:,} documents are validation, counted from its first line); prepare "
                         "other text into another --out-dir")
    return found[0]


def describe_inputs(args: argparse.Namespace) -> str:
    return " + ".join([*args.input, *(["--builtin"] if args.builtin else [])])


def prepare_tokenizer(args: argparse.Namespace, documents: Callable[[], Iterator[str]], val_docs: int,
                      out_dir: Path) -> tuple[object, dict, bytes | None]:
    """The given tokenizer, checked, or a new one trained on the training documents; its manifest entry;
    and a trained model's bytes, which the caller writes (nothing is written here)."""
    import sentencepiece

    if args.tokenizer:
        path = Path(args.tokenizer)
        sp = load_tokenizer_file(path, args.vocab_size)
        missing = [f"U+{ord(m):04X}" for m in case_ops.MARKERS if sp.piece_to_id(m) == sp.unk_id()]
        if args.case_ops and missing:
            raise InputError(f"--tokenizer {path}: --case-ops needs the case markers as tokens, and it lacks "
                             f"{', '.join(missing)}; drop --tokenizer to train one, or give one prepared with --case-ops")
        return sp, {"source": "given", "file": relative_to_or_as_given(path, out_dir, args.tokenizer),
                    "sha256": file_sha256(path), "vocab_size": sp.vocab_size(),
                    "sentencepiece_version": sentencepiece.__version__}, None

    path = trained_tokenizer_path(args, out_dir)
    training_docs = itertools.islice(documents(), val_docs, None)
    if args.tokenizer_train_docs:
        training_docs = itertools.islice(training_docs, args.tokenizer_train_docs)
    settings = CASE_OPS_TOKENIZER_SETTINGS if args.case_ops else TOKENIZER_SETTINGS
    if args.case_ops:
        training_docs = map(case_ops.encode, training_docs)
    print(f"tokenizer_training vocab:{args.vocab_size} max_docs:{args.tokenizer_train_docs or 'all'} "
          f"tokenization:{case_ops.NAME if args.case_ops else PLAIN_TOKENIZATION}", flush=True)
    started = time.perf_counter()
    model, used = train_tokenizer(training_docs, args.vocab_size, settings)
    print(f"tokenizer_trained docs:{used} seconds:{time.perf_counter() - started:.2f} path:{log_value(path)}",
          flush=True)
    return tokenizer_from_bytes(model), {
        "source": "trained", "file": relative_to_or_as_given(path, out_dir, args.tokenizer_out or str(path)),
        "sha256": hashlib.sha256(model).hexdigest(), "vocab_size": args.vocab_size, "settings": settings,
        "train_documents": used, "trained_on": "the first train_documents training documents (none of validation)",
        "sentencepiece_version": sentencepiece.__version__}, model


def trained_tokenizer_path(args: argparse.Namespace, out_dir: Path) -> Path:
    return Path(args.tokenizer_out or out_dir / f"sp{args.vocab_size}_bpe.model")


def path_inside(path: Path, folder: Path) -> Path | None:
    """path relative to folder when it lies inside it, else None."""
    try:
        return path.resolve().relative_to(folder.resolve())
    except ValueError:
        return None


def run(args: argparse.Namespace) -> dict:
    out_dir = Path(args.out_dir)
    folder = Path(os.path.realpath(out_dir))  # where the swap happens (a symlinked --out-dir keeps its link)
    if folder.parent == folder:
        raise InputError(f"--out-dir {args.out_dir}: the root folder cannot be replaced; name a folder for the output")
    recover_output_folder(folder)
    if os.path.lexists(folder) and not folder.is_dir():
        raise InputError(f"--out-dir {args.out_dir}: is a file, not a folder; remove it or name another folder")
    files = find_input_files(args.input)
    inputs = [{"kind": path.suffix[1:], "path": str(path), "bytes": path.stat().st_size, "sha256": file_sha256(path)}
              for path in files]
    builtin: list[str] = []
    if args.builtin:
        builtin, sha256 = builtin_documents()
        inputs.append(describe(builtin, sha256))
        if inputs[-1]["bytes"] < MINIMUM_CORPUS_BYTES:
            print(f"warning: the built-in corpus has only {inputs[-1]['bytes']} bytes; this Python may ship "
                  "without its library sources", file=sys.stderr)

    official = find_official_list(args, files)
    if official is not None:
        check_list_file(official, inputs[0]["bytes"], inputs[0]["sha256"])

    def documents() -> Iterator[str]:
        return iter_documents(files, builtin, args.txt_docs, args.max_docs, keep_empty=official is not None)

    val_docs = choose_val_docs(args, documents, official)
    print(f"input source:{log_value(describe_inputs(args))} val_docs:{val_docs} "
          f"split:{'official' if official else 'first_documents'}", flush=True)
    sp, tokenizer, model = prepare_tokenizer(args, documents, val_docs, out_dir)
    tokenizer_path = trained_tokenizer_path(args, out_dir)
    tokenizer_inside = path_inside(tokenizer_path, folder) if model is not None else None

    with Staging(folder) as staging:
        if tokenizer_inside is not None:
            atomic_write_bytes(staging / tokenizer_inside, model)
        splits, progress, hashes, val_bytes = write_shards(documents(), sp, staging, val_docs, args.shard_tokens,
                                                           args.case_ops)
        split = split_record(staging, hashes, official, val_docs, args)
        files_written = {shard["file"]: shard["sha256"] for split in ("val", "train")
                         for shard in splits[split]["shards"]}
        tokenization: dict = {"name": PLAIN_TOKENIZATION}
        if val_bytes is not None:
            write_data_shard(staging / VAL_BYTES_NAME, val_bytes)
            files_written[VAL_BYTES_NAME] = file_sha256(staging / VAL_BYTES_NAME)
            tokenization = {"name": case_ops.NAME, "markers": {name: f"U+{ord(m):04X}" for name, m in zip(
                                ("title", "allcaps", "capnext", "esc"), case_ops.MARKERS)},
                            "val_bytes": {"file": VAL_BYTES_NAME, "sha256": files_written[VAL_BYTES_NAME],
                                          "tokens": int(val_bytes.size), "bytes": int(val_bytes.sum()),
                                          "rule": "uint16 a validation token in the shard format: BOS and case "
                                                  "operators 0, every other token the original text's UTF-8 bytes"}}
        if tokenizer["source"] == "trained":
            files_written[tokenizer["file"]] = tokenizer["sha256"]
        manifest = {
            "format": {"header_bytes": SHARD_HEADER_BYTES, "magic": SHARD_MAGIC, "version": SHARD_VERSION,
                       "token_dtype": "uint16 little-endian", "bos_id": BOS_ID,
                       "document_layout": "BOS then the document's tokens, no EOS"},
            "inputs": inputs,
            "options": {"txt_docs": args.txt_docs, "max_docs": args.max_docs, "val_docs": val_docs,
                        "case_ops": args.case_ops,
                        "shard_tokens": args.shard_tokens},
            "tokenizer": tokenizer,
            "tokenization": tokenization,
            "split": split,
            "splits": splits,
            "files": files_written,
        }
        atomic_write_bytes(staging / MANIFEST_NAME, (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
        if model is not None and tokenizer_inside is None:
            # Outside the folder the tokenizer cannot be swapped in with it: it is written now, when the
            # shards are complete, just before the swap. Should the swap then fail, the folder's manifest
            # still names the old tokenizer's sha256, so the mismatch can be seen.
            atomic_write_bytes(tokenizer_path, model)
        swap_in(staging, folder)

    shards = sum(len(split["shards"]) for split in splits.values())
    print(f"done val_docs:{splits['val']['documents']} val_tokens:{splits['val']['tokens']} "
          f"train_docs:{splits['train']['documents']} train_tokens:{splits['train']['tokens']} "
          f"shards:{shards} MB_per_s:{progress.megabytes_per_second:.2f} manifest:{log_value(out_dir / MANIFEST_NAME)}",
          flush=True)
    tokenizer_path = args.tokenizer or args.tokenizer_out or out_dir / tokenizer["file"]
    print(f"next: DATA_PATH={out_dir} TOKENIZER_PATH={tokenizer_path} VOCAB_SIZE={tokenizer['vocab_size']} "
          "python train_gpt.py", flush=True)
    return manifest


def split_record(folder: Path, hashes: np.ndarray, official: OfficialList | None, val_docs: int,
                 args: argparse.Namespace) -> dict:
    """The shards in folder checked by document hash against the input (official_split.check_split), and the
    manifest's record of the split. The official split's size comes from the list, never from val_docs."""
    if official is None:
        return {"rule": "first_documents", "val_docs": val_docs,
                **check_split(folder, hashes, val_docs, describe_inputs(args), f"--out-dir {args.out_dir}")}
    if official.num_docs is not None and args.max_docs is None and hashes.size != official.num_docs:
        raise InputError(f"{official.path}: {hashes.size:,} documents, its source manifest says {official.num_docs:,}; "
                         "download it again with python data/download_fineweb.py --with-docs")
    facts = {k: official.sidecar[k] for k in ("num_docs", "docs_val", "docs_sha256", "selection_seed")
             if k in official.sidecar}
    return {"rule": "official", "val_docs": official.val_docs, "list": official.path.name, "list_facts": facts,
            **check_split(folder, hashes, official.val_docs, str(official.path), f"--out-dir {args.out_dir}")}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"error: interrupted; --out-dir {args.out_dir} is as it was before this run (rerun to finish)",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
