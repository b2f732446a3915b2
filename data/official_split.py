"""
official_split.py: the official validation split, recognised and enforced.

The challenge validates on the first 50,000 documents of its document list, docs_selected.jsonl (SPEC
section 3). Every vocabulary built from that list must keep exactly those documents for validation
and none of them for training: a preparation script whose default put the first 10,000 documents in
validation sent the other 40,000 into training for 15 of 34 submissions (openai/parameter-golf#2127).

  - The official list is recognised by its name, docs_selected.jsonl, or by its source manifest beside
    it (docs_selected.source_manifest.json: num_docs, docs_val, docs_bytes, docs_sha256), which, when
    present, is checked against the file.
  - The check reads the shards back, cuts them at each BOS into documents and compares each
    document's hash (blake2b-64 of its token ids) with the hashes of the input's documents in input
    order: the validation shards must hold exactly the first val_docs documents, in order, and the
    training shards none of them (a training document whose text the list itself repeats after the
    boundary is the list's own, and allowed). A count can agree while the documents do not; hashes
    cannot.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from train_gpt import InputError, load_data_shard

DOCS_NAME = "docs_selected.jsonl"  # the challenge's document list, in the datasets/ folder of the hub repository
SIDECAR_SUFFIX = ".source_manifest.json"  # docs_selected.source_manifest.json: its counts and sha256
OFFICIAL_VAL_DOCS = 50_000
BOS_ID = 1
NAMED_AT_MOST = 5  # documents a refusal names; the count says how many more


@dataclass(frozen=True)
class OfficialList:
    path: Path
    val_docs: int
    num_docs: int | None  # from the source manifest; None without one
    sidecar: dict  # the source manifest as read ({} without one)


def sidecar_path(docs: Path) -> Path:
    return docs.with_name(docs.stem + SIDECAR_SUFFIX)


def official_list(path: Path) -> OfficialList | None:
    """The official list's facts when path is the official document list, else None."""
    sidecar = sidecar_path(path)
    if path.name != DOCS_NAME and not sidecar.is_file():
        return None
    facts: dict = {}
    if sidecar.is_file():
        try:
            facts = json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise InputError(f"{sidecar}: not readable JSON ({e}); download it again with "
                             "python data/download_fineweb.py --with-docs") from None
        if not isinstance(facts, dict):
            raise InputError(f"{sidecar}: not a JSON object; download it again with "
                             "python data/download_fineweb.py --with-docs")
    val_docs = facts.get("docs_val", OFFICIAL_VAL_DOCS)
    if val_docs != OFFICIAL_VAL_DOCS:
        raise InputError(f"{sidecar}: docs_val is {val_docs}, but the official split is the first "
                         f"{OFFICIAL_VAL_DOCS:,} documents; this is not the challenge's list: download it again with "
                         "python data/download_fineweb.py --with-docs")
    num_docs = facts.get("num_docs")
    return OfficialList(path, val_docs, int(num_docs) if num_docs is not None else None, facts)


def check_list_file(official: OfficialList, size_bytes: int, sha256: str) -> None:
    """The file against its source manifest's docs_bytes and docs_sha256, where it gives them."""
    where = f"{official.path} (against {sidecar_path(official.path).name})"
    fix = "download it again with python data/download_fineweb.py --with-docs"
    expected_bytes, expected_sha = official.sidecar.get("docs_bytes"), official.sidecar.get("docs_sha256")
    if expected_bytes is not None and int(expected_bytes) != size_bytes:
        raise InputError(f"{where}: {size_bytes} bytes, the source manifest says {expected_bytes}; {fix}")
    if expected_sha is not None and expected_sha != sha256:
        raise InputError(f"{where}: sha256 {sha256[:16]}…, the source manifest says {str(expected_sha)[:16]}…; {fix}")


def document_hashes(stream: np.ndarray) -> np.ndarray:
    """(documents,) uint64: blake2b-64 of each document's token ids in a stream that starts with BOS."""
    starts = np.flatnonzero(stream == BOS_ID)
    ends = [*starts[1:], stream.size]
    return np.fromiter((int.from_bytes(hashlib.blake2b(stream[a + 1 : b].tobytes(), digest_size=8).digest(), "little")
                        for a, b in zip(starts, ends)), dtype=np.uint64, count=starts.size)


def shard_documents(shards: Iterable[Path]) -> Iterable[np.ndarray]:
    """The hashes of the documents in shards read in order; a document cut between two shards is joined."""
    carry = np.zeros(0, dtype=np.uint16)
    for path in shards:
        tokens = np.concatenate([carry, np.asarray(load_data_shard(path, 1 << 16))])
        if tokens.size and tokens[0] != BOS_ID:
            raise InputError(f"{path}: its split does not start with BOS; the shards are not data/prepare.py's")
        last = np.flatnonzero(tokens == BOS_ID)
        cut = int(last[-1]) if last.size else 0
        yield document_hashes(tokens[:cut])
        carry = tokens[cut:]
    if carry.size:
        yield document_hashes(carry)


def numbered(indices: np.ndarray) -> str:
    shown = ", ".join(f"#{int(i):,}" for i in indices[:NAMED_AT_MOST])
    return shown + (f" and {indices.size - NAMED_AT_MOST:,} more" if indices.size > NAMED_AT_MOST else "")


def check_split(folder: Path, input_hashes: np.ndarray, val_docs: int, source: str, name: str = "") -> dict:
    """Refuses (InputError, naming `name` or folder) shards in folder whose training holds one of the first
    val_docs documents of input_hashes, or whose validation is not exactly those documents in order; the
    manifest's record of the check otherwise."""
    where = name or str(folder)
    fix = ("nothing was written: the output folder is as it was; rerun data/prepare.py without --val-docs "
           f"(the split must be the first {val_docs:,} documents)")
    expected_val, rest = input_hashes[:val_docs], input_hashes[val_docs:]
    order = np.argsort(expected_val, kind="stable")
    sorted_val = expected_val[order]
    repeated_after = np.isin(expected_val, rest)  # the list's own repeats across the boundary
    leaked, train_docs = [], 0
    for hashes in shard_documents(sorted(folder.glob("fineweb_train_*.bin"))):
        train_docs += hashes.size
        if not sorted_val.size:
            continue
        at = np.searchsorted(sorted_val, hashes).clip(max=sorted_val.size - 1)
        leaked.extend(int(order[i]) for i in at[sorted_val[at] == hashes] if not repeated_after[order[i]])
    if leaked:
        indices = np.unique(np.array(leaked))
        raise InputError(f"{where}: the training shards hold {indices.size:,} validation document"
                         f"{'s' if indices.size > 1 else ''} ({numbered(indices)} of {source}, counted from 0); {fix}")
    val = np.concatenate([np.zeros(0, np.uint64), *shard_documents(sorted(folder.glob("fineweb_val_*.bin")))])
    if not np.array_equal(val, expected_val):
        common = min(val.size, expected_val.size)
        differ = np.flatnonzero(val[:common] != expected_val[:common])
        first = int(differ[0]) if differ.size else common
        raise InputError(f"{where}: the validation shards hold {val.size:,} documents, not exactly documents #0 to "
                         f"#{val_docs - 1:,} of {source} (they first differ at validation document #{first:,}); {fix}")
    if train_docs != rest.size:
        raise InputError(f"{where}: the training shards hold {train_docs:,} documents, {source} has {rest.size:,} "
                         f"after the first {val_docs:,}; {fix}")
    digest = hashlib.sha256(expected_val.astype("<u8").tobytes()).hexdigest()
    return {"check": "document_hash", "val_documents": int(val.size), "train_documents": train_docs,
            "val_document_hashes_sha256": digest, "repeats_across_split": int(repeated_after.sum())}
