"""
token_data.py: the text as every script reads it: token shards (read, written, checked against their
manifest), the training stream and its loader, the tokenizer, and the bytes each scored target stands
for (BPB's denominator: the tokenizer's tables, or a case-operator preparation's validation sidecar).

A job that outgrew train_gpt.py (1,738 lines once depth recurrence, case operators and the rate-
distortion export had landed); train_gpt.py re-exports its names, and its bytes count wherever
train_gpt.py's do (code_size.EVALUATION_BASE).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from run_files import InputError, atomic_write_bytes, file_sha256

# ----------------------------------------------------------------------------------------------
# Data
# Shards are a 256-int32 header (magic, version, token count) followed by uint16 token ids. The
# reader refuses a wrong header, a truncated file or an id outside the vocabulary, up front.

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
SHARD_HEADER_INTS = 256
SHARD_HEADER_BYTES = SHARD_HEADER_INTS * 4
SHARD_TOKEN_DTYPE = np.dtype("<u2")

def write_data_shard(path: Path | str, tokens: np.ndarray) -> None:
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise InputError(f"{path}: token ids must fit in uint16 to be written to a shard")
    header = np.zeros(SHARD_HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = SHARD_MAGIC, SHARD_VERSION, tokens.size
    atomic_write_bytes(path, header.tobytes() + tokens.astype(SHARD_TOKEN_DTYPE).tobytes())

def read_shard_header(path: Path) -> int:
    """Checks magic, version and exact file size; returns the number of tokens."""
    size, remake = path.stat().st_size, "re-create it with data/prepare.py or re-download it"
    if size < SHARD_HEADER_BYTES:
        raise InputError(f"{path}: truncated shard ({size} bytes, shorter than the {SHARD_HEADER_BYTES}-byte "
                         f"header); {remake}")
    header = np.fromfile(path, dtype="<i4", count=SHARD_HEADER_INTS)
    if header[0] != SHARD_MAGIC:
        raise InputError(f"{path}: not a token shard (magic {header[0]}, expected {SHARD_MAGIC}); "
                         "point DATA_PATH at a folder written by data/prepare.py or data/download_fineweb.py")
    if header[1] != SHARD_VERSION:
        raise InputError(f"{path}: shard version {header[1]} is not supported (expected {SHARD_VERSION}); "
                         "re-create it with data/prepare.py")
    num_tokens = int(header[2])
    if num_tokens <= 0:
        raise InputError(f"{path}: the shard holds no tokens (header count {num_tokens}); remove it, or re-create "
                         "the folder with data/prepare.py")
    expected = SHARD_HEADER_BYTES + 2 * num_tokens
    if size != expected:
        raise InputError(f"{path}: truncated or padded shard ({size} bytes, the header promises {expected}); {remake}")
    return num_tokens

def load_data_shard(path: Path, vocab_size: int) -> np.ndarray:
    """The shard's tokens, memory-mapped (pages are read when used), ids checked against the vocabulary."""
    num_tokens = read_shard_header(path)
    tokens = np.memmap(path, dtype=SHARD_TOKEN_DTYPE, mode="r", offset=SHARD_HEADER_BYTES, shape=(num_tokens,))
    if int(tokens.max()) >= vocab_size:
        bad = int(np.argmax(tokens >= vocab_size))
        raise InputError(f"{path}: token id {int(tokens[bad])} at index {bad} is outside the vocabulary "
                         f"(VOCAB_SIZE={vocab_size}); use the tokenizer these shards were made with and its VOCAB_SIZE")
    return tokens

def list_shards(data_path: str, split: str) -> list[Path]:
    folder = Path(data_path)
    if not folder.is_dir():
        raise InputError(f"DATA_PATH={data_path}: no such folder; run data/prepare.py (built-in corpus) or "
                         "data/download_fineweb.py (official data), or set DATA_PATH")
    shards = sorted(folder.glob(f"fineweb_{split}_*.bin"))
    if not shards:
        raise InputError(f"DATA_PATH={data_path}: no fineweb_{split}_*.bin shards in this folder; "
                         "run data/prepare.py or data/download_fineweb.py, or set DATA_PATH")
    for shard in shards:
        read_shard_header(shard)
    return shards

def load_validation_tokens(data_path: str, vocab_size: int, seq_len: int, max_tokens: int = 0) -> Tensor:
    """All val shards in name order, trimmed so the targets fill whole sequences: (N*seq_len + 1,)."""
    stream = np.concatenate([load_data_shard(p, vocab_size) for p in list_shards(data_path, "val")])
    stream = stream[:max_tokens] if max_tokens > 0 else stream
    usable = (stream.size - 1) // seq_len * seq_len
    if usable <= 0:
        raise InputError(f"DATA_PATH={data_path}: the validation stream has {stream.size} tokens, "
                         f"fewer than one sequence of {seq_len} + 1; lower TRAIN_SEQ_LEN or add validation data")
    return torch.from_numpy(stream[: usable + 1].astype(np.int64))

MANIFEST_NAME = "manifest.json"  # written by data/prepare.py and data/download_fineweb.py
VAL_BYTES_NAME = "val_bytes.bin"  # case-operator data: each validation token's original bytes (data/prepare.py)
PLAIN_TOKENIZATION = "plain"  # a manifest or artifact that names none

def data_identity(data_path: str, tokenizer_path: str) -> dict[str, str]:
    """sha256 of the tokenizer and of the validation shards, checked against DATA_PATH/manifest.json: other data
    scores a wrong BPB without any error. Training shards are checked by name, not hashed (gigabytes)."""
    folder, tokenizer = Path(data_path), file_sha256(tokenizer_path)
    val = {p.name: file_sha256(p) for p in list_shards(data_path, "val")}
    identity = {"tokenizer_sha256": tokenizer, "val_sha256": hashlib.sha256(json.dumps(val).encode()).hexdigest()}
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        return identity | {"tokenization": PLAIN_TOKENIZATION, "manifest": "none"}
    fix = "re-create the data with data/prepare.py or data/download_fineweb.py"
    try:
        manifest = json.loads(manifest_path.read_text())
        listed, listed_tokenizer = dict(manifest["files"]), str(manifest["tokenizer"]["sha256"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{manifest_path}: not a readable manifest ({type(e).__name__}: {e}); {fix}") from None
    if listed_tokenizer != tokenizer:
        raise InputError(f"TOKENIZER_PATH={tokenizer_path}: its sha256 {tokenizer[:16]} is not the "
                         f"{listed_tokenizer[:16]} that {manifest_path} says these shards were made with; point "
                         f"TOKENIZER_PATH at that tokenizer, or {fix}")
    present = {p.name for p in list_shards(data_path, "train")} | set(val)
    for name in sorted(present | {n for n in listed if n.startswith("fineweb_")}):
        if name not in listed:
            problem = "is not listed in the manifest (left by another preparation?)"
        elif name not in present:
            problem = "is listed in the manifest but missing"
        elif name in val and val[name] != listed[name]:
            problem = f"has sha256 {val[name][:16]}, not the {str(listed[name])[:16]} the manifest lists"
        else:
            continue
        raise InputError(f"{folder / name} {problem} ({manifest_path}); {fix}")
    for split, entry in (manifest.get("splits") or {}).items():  # the per-split shard list must say what files says
        for shard in entry.get("shards", []):
            if listed.get(shard.get("file")) != shard.get("sha256"):
                raise InputError(f"{manifest_path}: splits.{split} gives {shard.get('file')} another sha256 than "
                                 f"its files entry (an edited manifest?); {fix}")
    tokenization = manifest.get("tokenization") or {"name": PLAIN_TOKENIZATION}
    identity["tokenization"] = str(tokenization.get("name"))
    if "val_bytes" in tokenization:  # the byte sidecar is scored like the shards: checked like them
        sidecar, listed_sha = folder / VAL_BYTES_NAME, str(tokenization["val_bytes"].get("sha256"))
        if not sidecar.is_file():
            raise InputError(f"{sidecar}: missing; {manifest_path} says the validation bytes are counted from it; "
                             f"{fix}")
        if file_sha256(sidecar) != listed_sha or listed.get(VAL_BYTES_NAME) != listed_sha:
            raise InputError(f"{sidecar} has sha256 {file_sha256(sidecar)[:16]}, not the {listed_sha[:16]} the "
                             f"manifest lists ({manifest_path}); {fix}")
        identity["val_bytes_sha256"] = listed_sha
    split = manifest.get("split") or {}  # which validation split the data holds (data/prepare.py, download_fineweb.py)
    return identity | {"manifest": "checked", "split": split.get("rule", "unrecorded"),
                       "split_val_docs": split.get("val_docs", "unrecorded"), "split_check": split.get("check", "none")}

class TokenStream:
    """The training shards read in order as one endless stream of tokens. Shards are memory-mapped;
    the next one is opened and checked (a 200 MB vocabulary scan, once per process) on a thread."""
    def __init__(self, shards: list[Path], vocab_size: int):
        self.shards, self.vocab_size = shards, vocab_size
        self.opened, self.prefetcher = {}, ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-prefetch")
        self.reset()
    def open(self, index: int) -> np.ndarray:
        if index not in self.opened:
            self.opened = {index: load_data_shard(self.shards[index], self.vocab_size), **self.opened}
        return self.opened[index]
    def reset(self) -> None:
        self.shard_index, self.pos, self.tokens = 0, 0, self.open(0)
        self.upcoming = self.prefetcher.submit(self.open, 1 % len(self.shards))
    def take(self, n: int) -> np.ndarray:
        parts = []
        while n > 0:
            if self.pos >= self.tokens.size:
                self.shard_index = (self.shard_index + 1) % len(self.shards)
                self.tokens, self.pos = self.upcoming.result(), 0  # a bad shard raises its error here
                self.upcoming = self.prefetcher.submit(self.open, (self.shard_index + 1) % len(self.shards))
                continue
            part = self.tokens[self.pos : self.pos + n]
            parts.append(part)
            self.pos += part.size
            n -= part.size
        return np.concatenate(parts)

class DistributedTokenLoader:
    """Each micro-step takes the next world_size chunks of the global stream; rank r gets chunk r:
    an optimizer step sees the same tokens whatever the world size, so 1 and N processes agree."""
    def __init__(self, shards: list[Path], vocab_size: int, rank: int, world_size: int, device: torch.device):
        self.stream = TokenStream(shards, vocab_size)
        self.rank, self.world_size, self.device = rank, world_size, device
    def next_batch(self, local_tokens: int, seq_len: int) -> tuple[Tensor, Tensor]:
        span = local_tokens + 1  # one extra token so the targets are the inputs shifted by one
        chunk = self.stream.take(span * self.world_size)[self.rank * span : (self.rank + 1) * span]
        chunk = torch.from_numpy(chunk.astype(np.int64))
        if self.device.type == "cuda":
            chunk = chunk.pin_memory()  # so the copy below really runs alongside the GPU's work
        chunk = chunk.to(self.device, non_blocking=True)
        return chunk[:-1].view(-1, seq_len), chunk[1:].view(-1, seq_len)

# ----------------------------------------------------------------------------------------------
# Tokenizer and bits per byte
# BPB divides the summed loss by the UTF-8 bytes the targets stand for (SPEC section 5): fixed by
# each target's piece and whether the previous token is a boundary, so three lookup tables.

def load_tokenizer(path: str | Path, vocab_size: int, path_label: str = "TOKENIZER_PATH=",
                   vocab_label: str = "VOCAB_SIZE="):
    """A SentencePiece model whose vocabulary is vocab_size; the labels name the setting in errors."""
    import sentencepiece as spm
    where = f"{path_label}{path}"
    if not Path(path).is_file():
        raise InputError(f"{where}: no such file; run data/prepare.py or data/download_fineweb.py, "
                         f"or point {path_label.strip(' =')} at a .model file")
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except Exception:
        raise InputError(f"{where}: not a SentencePiece model; point it at the .model file") from None
    if sp.vocab_size() != vocab_size:
        raise InputError(f"{where}: the tokenizer has {sp.vocab_size()} tokens but {vocab_label}{vocab_size}; "
                         f"use {vocab_label}{sp.vocab_size()} or a tokenizer with {vocab_size} tokens")
    return sp

@dataclass
class ByteTables:
    """The bytes each scored target stands for: the SPEC section 5 rule from three tables, or, for case-operator
    data, the validation byte sidecar (the original text's bytes of the target at each stream position). Every
    scorer (Scores.record) asks target_bytes with the targets' positions, so both rules reach them all."""
    base_bytes: Tensor  # (vocab,) int64: UTF-8 bytes of the piece without its leading "▁"
    has_leading_space: Tensor  # (vocab,) bool: the piece starts with "▁"
    is_boundary: Tensor  # (vocab,) bool: control, unknown and unused ids
    target_sidecar: Tensor | None = None  # (targets,) int32: target i (token i + 1) of the validation stream
    def to(self, device: torch.device) -> "ByteTables":
        # fields one by one (dataclasses.astuple would deep-copy the sidecar: 248 MB on the official stream),
        # and Tensor.to keeps a tensor that is already on `device` without a copy
        return ByteTables(*(None if (t := getattr(self, f.name)) is None else t.to(device)
                            for f in dataclasses.fields(self)))
    def target_bytes(self, prev: Tensor, target: Tensor, target_pos: Tensor | None = None) -> Tensor:
        """(…) bytes of each target; target_pos (same shape): its index among the stream's targets, which the
        sidecar needs (positions outside the stream, in padding, give 0)."""
        if self.target_sidecar is not None:
            if target_pos is None:
                raise ValueError("these byte tables count the validation sidecar: give the targets' positions")
            n = self.target_sidecar.numel()
            inside = (target_pos >= 0) & (target_pos < n)
            return torch.where(inside, self.target_sidecar[target_pos.clamp(0, max(n - 1, 0))], 0)
        space = self.has_leading_space[target] & ~self.is_boundary[prev]
        return self.base_bytes[target] + space.long()

CASE_MARKERS = "\ue001\ue002\ue003\ue004"  # data/case_ops.py's MARKERS (a test keeps the two equal)

def is_case_ops_tokenizer(sp) -> bool:
    """The four case markers are tokens 4-7, where data/prepare.py --case-ops declares them."""
    return sp.vocab_size() > 7 and "".join(sp.id_to_piece(i) for i in range(4, 8)) == CASE_MARKERS

def validation_byte_tables(sp, data_path: str, identity: dict, tokens: Tensor) -> ByteTables:
    """The byte rule for the validation stream `tokens` (as load_validation_tokens trimmed it) of DATA_PATH:
    the tokenizer's tables, with the byte sidecar when data_identity found case-operator data."""
    tables = build_byte_tables(sp)
    if "val_bytes_sha256" not in identity:
        if is_case_ops_tokenizer(sp):  # its tables would count every marker's 3 bytes: a wrong BPB, no error
            raise InputError(f"DATA_PATH={data_path}: no validation byte sidecar ({VAL_BYTES_NAME} in its manifest), "
                             "but the tokenizer is a case-operator one (markers U+E001-U+E004 as tokens 4-7); prepare "
                             "the data with data/prepare.py --case-ops")
        return tables
    path = Path(data_path) / VAL_BYTES_NAME
    sidecar = load_data_shard(path, 1 << 16)
    stream_tokens = sum(read_shard_header(p) for p in list_shards(data_path, "val"))
    if sidecar.size != stream_tokens:
        raise InputError(f"{path}: {sidecar.size} entries for {stream_tokens} validation tokens; re-create the data "
                         "with data/prepare.py --case-ops")
    # int32: 4 bytes a target on the device (the official stream: 248 MB), summed in int64 / float64 by the scorers
    return dataclasses.replace(tables,
                               target_sidecar=torch.from_numpy(sidecar[1 : tokens.numel()].astype(np.int32)))

def build_byte_tables(sp) -> ByteTables:
    vocab = sp.vocab_size()
    base, space, boundary = (torch.zeros(vocab, dtype=dtype) for dtype in (torch.int64, torch.bool, torch.bool))
    for i in range(vocab):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            boundary[i] = True
            continue
        if sp.is_byte(i):
            base[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith("\u2581"):
            space[i], piece = True, piece[1:]
        base[i] = len(piece.encode("utf-8"))
    return ByteTables(base, space, boundary)
