"""
download_fineweb.py: the official cached FineWeb export (SPEC section 3), fetched and verified.

    python data/download_fineweb.py                          # val shards, 80 train shards, tokenizer
    python data/download_fineweb.py --train-shards 1         # a quick start: val shards and one train shard
    python data/download_fineweb.py --source-dir /mnt/pg     # copy from a local mirror instead of the hub
    python data/download_fineweb.py --docs-only              # the official documents alone (48 GB), to retokenize
    python data/download_fineweb.py --repo-id kevclark/parameter-golf --variant sp8192 --train-shards 128

The source is the Hugging Face dataset repository willdepueoai/parameter-golf (needs
`pip install huggingface_hub`), or with --source-dir a local folder laid out the same way:
    datasets/manifest.json
    datasets/datasets/fineweb10B_sp1024/fineweb_val_000000.bin, fineweb_train_000000.bin, ...
    datasets/tokenizers/fineweb_1024_bpe.model, ...
Files land under --local-root (default: this data/ folder) at the same relative place:
data/datasets/fineweb10B_sp1024/ and data/tokenizers/; the manifest is kept as
data/datasets/manifest.json.

The manifest says what to fetch. Two shapes are read, alone or together:
  - entries: "datasets": [{"name": "fineweb10B_sp1024", "tokenizer_name": "sp_bpe_1024",
    "stats": {"files_val": V, "files_train": T}}] and "tokenizers": [{"name": "sp_bpe_1024",
    "model_path": "tokenizers/fineweb_1024_bpe.model", "vocab_path": ...}];
  - a file list: "files": [{"path": "datasets/fineweb10B_sp1024/fineweb_val_000000.bin",
    "bytes": N, "sha256": "..."}, ...] (or a mapping from path to {"bytes", "sha256"}).
Paths are relative to the datasets/ folder. Sizes and sha256s, where the manifest gives them,
are checked.

Variants: --variant names any dataset the manifest lists (sp1024 in willdepueoai/parameter-golf;
sp4096 and sp8192 were published by a record's author in kevclark/parameter-golf, 143 and 128 train
shards: --repo-id kevclark/parameter-golf). The manifest is fetched fresh every run, so one left by
another repository never hides a variant.

The official documents (--with-docs, or --docs-only for them alone): docs_selected.jsonl, the
challenge's document list in its fixed order (15,368,808 documents, 48 GB; the first 50,000 are
validation), and its source manifest docs_selected.source_manifest.json (num_docs, docs_val,
docs_bytes, docs_sha256), both from the repository's datasets/ folder, placed in --local-root as
the challenge's scripts place them (data/docs_selected.jsonl). The source manifest is fetched first
and must say docs_val 50,000; the document list is then verified by its size and sha256 against it
(and against the repository manifest, where that lists them), fetched again when it does not
match, and refused when a fresh copy does not either. data/prepare.py builds any vocabulary from it
and enforces the official split.

Resumable: a file already present that verifies (shard header and exact size, plus size and
sha256 where the manifest gives them) is not fetched again; a missing, truncated or corrupt one
is. Each fetched file is verified before it is moved into place, so a file under its final name
is always a complete one, and a corrupt source is refused with exit 2.

Once every file verifies, the dataset folder gets its own manifest.json, the one train_gpt.py and
eval_final.py check the data against (the same keys data/prepare.py writes): "tokenizer" with the
.model's path relative to the dataset folder and its sha256, and "files", each shard in the folder
by name with its sha256. Shards left by an earlier, larger download are checked against the source's
manifest too; one that fails, or that the source does not list, is left out with a warning. A
manifest.json already there that disagrees is rewritten, with a note.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

DATA_DIR = Path(__file__).resolve().parent
REPO_ROOT = DATA_DIR.parent
if str(REPO_ROOT) not in sys.path:  # train_gpt.py, from any working folder
    sys.path.insert(0, str(REPO_ROOT))

from train_gpt import MANIFEST_NAME, InputError, atomic_write_bytes, file_sha256, log_value, read_shard_header  # noqa: E402

if str(DATA_DIR) not in sys.path:  # official_split.py, beside this file
    sys.path.insert(0, str(DATA_DIR))
from official_split import DOCS_NAME, official_list, sidecar_path  # noqa: E402

REPO_ID = "willdepueoai/parameter-golf"
REMOTE_ROOT = "datasets"  # the folder of the repository that holds the manifest, shards and tokenizers
DEFAULT_VARIANT = "sp1024"
DEFAULT_TRAIN_SHARDS = 80  # the export used by the public records: 8B training tokens
SHARD_PATTERN = re.compile(r"fineweb_(train|val)_\d{6}\.bin")

# fetch(remote_path, local_path): put the bytes of the repository file remote_path (relative to
# the repository root) at local_path. The caller verifies the file and moves it into place.
Fetch = Callable[[str, Path], None]


class MissingDependency(InputError):
    """An optional package needed for this way of running is not installed."""


# ----------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------


def mirror_fetcher(source_dir: Path) -> Fetch:
    """Copies from a local folder laid out like the repository."""
    def fetch(remote_path: str, local_path: Path) -> None:
        source = source_dir / remote_path
        if not source.is_file():
            raise InputError(f"{source}: not in the mirror; --source-dir must be laid out like the {REPO_ID} "
                             f"repository ({REMOTE_ROOT}/{MANIFEST_NAME}, {REMOTE_ROOT}/datasets/..., {REMOTE_ROOT}/tokenizers/...)")
        try:
            shutil.copyfile(source, local_path)
        except OSError as e:
            raise InputError(f"{source}: could not copy it to {local_path} ({e.strerror}); check the disk space "
                             "and permissions") from None

    return fetch


def hub_fetcher(repo_id: str, revision: str | None) -> Fetch:
    """Downloads through huggingface_hub's cache and links (or copies) the file out of it."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise MissingDependency("huggingface_hub is not installed: pip install huggingface_hub "
                                "(or copy from a local mirror with --source-dir)") from None

    def fetch(remote_path: str, local_path: Path) -> None:
        try:
            cached = Path(hf_hub_download(repo_id=repo_id, filename=remote_path, repo_type="dataset",
                                          revision=revision)).resolve()
        except Exception as e:  # network, authentication or missing-file errors all end the same way
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InputError(f"{repo_id}/{remote_path}: download failed ({reason}); check the network and run "
                             "again, files already fetched are kept") from None
        try:
            os.link(cached, local_path)  # the cache holds the bytes already; a link costs no space
        except OSError:
            shutil.copyfile(cached, local_path)

    return fetch


# ----------------------------------------------------------------------------------------------
# The manifest
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteFile:
    path: str  # relative to REMOTE_ROOT, e.g. "datasets/fineweb10B_sp1024/fineweb_val_000000.bin"
    size_bytes: int | None = None
    sha256: str | None = None


@dataclass
class Plan:
    val: list[RemoteFile]
    train: list[RemoteFile]
    tokenizer: list[RemoteFile]
    other_train: list[RemoteFile] = field(default_factory=list)  # the source's train shards not asked for


def listed_files(manifest: dict, entry: dict | None) -> dict[str, RemoteFile]:
    """Files the manifest lists with their sizes and hashes, at the top level or in the dataset entry."""
    found = {}
    for listing in (manifest.get("files"), (entry or {}).get("files")):
        if isinstance(listing, dict):
            listing = [{"path": path, **(info if isinstance(info, dict) else {})} for path, info in listing.items()]
        for item in listing or []:
            if isinstance(item, dict) and isinstance(item.get("path"), str):
                found[item["path"]] = RemoteFile(item["path"], item.get("bytes"), item.get("sha256"))
    return found


def plan_downloads(manifest: dict, variant: str, train_shards: int, where: str) -> Plan:
    """Which files to fetch: every val shard, the first train_shards train shards, the tokenizer files."""
    dataset = f"fineweb10B_{variant}"
    entry = next((d for d in manifest.get("datasets", []) if isinstance(d, dict) and d.get("name") == dataset), None)
    listed = listed_files(manifest, entry)

    def shard_paths(split: str) -> list[str]:
        stats = (entry or {}).get("stats") or {}
        if isinstance(stats.get(f"files_{split}"), int):
            return [f"datasets/{dataset}/fineweb_{split}_{i:06d}.bin" for i in range(stats[f"files_{split}"])]
        pattern = re.compile(rf"datasets/{re.escape(dataset)}/fineweb_{split}_\d{{6}}\.bin")
        return sorted(path for path in listed if pattern.fullmatch(path))

    val, train = shard_paths("val"), shard_paths("train")
    if not val and not train:
        names = sorted({d.get("name") for d in manifest.get("datasets", []) if isinstance(d, dict)} - {None})
        raise InputError(f"{where}: no shards listed for {dataset}; the manifest has {names or 'no dataset entries'}; "
                         "pick --variant from those")
    if not val:
        raise InputError(f"{where}: no validation shards listed for {dataset}; the manifest is incomplete")
    if train_shards > len(train):
        raise InputError(f"{where}: {dataset} has {len(train)} train shards, fewer than --train-shards {train_shards}; "
                         f"pass --train-shards {len(train)} or fewer")

    tokenizer_paths = []
    tokenizer_entry = next((t for t in manifest.get("tokenizers", []) if isinstance(t, dict)
                            and entry and t.get("name") == entry.get("tokenizer_name")), None)
    if tokenizer_entry:
        tokenizer_paths = [tokenizer_entry[key] for key in ("model_path", "vocab_path", "path")
                           if isinstance(tokenizer_entry.get(key), str)]
    else:
        vocab = variant[2:] if variant.startswith("sp") else variant
        tokenizer_paths = sorted(p for p in listed if p.startswith(f"tokenizers/fineweb_{vocab}_"))
    if not tokenizer_paths:
        raise InputError(f"{where}: no tokenizer files listed for {dataset}; the manifest is incomplete")

    def described(paths: list[str]) -> list[RemoteFile]:
        return [listed.get(path, RemoteFile(path)) for path in paths]

    return Plan(val=described(val), train=described(train[:train_shards]), tokenizer=described(tokenizer_paths),
                other_train=described(train[train_shards:]))


# ----------------------------------------------------------------------------------------------
# Verification and the download loop
# ----------------------------------------------------------------------------------------------


class Hashes:
    """sha256 of files, each read once per run: the key (inode, size, mtime) follows a fetched file
    through its rename into place. Only for one run, in which nothing else writes the files."""

    def __init__(self):
        self.known: dict[tuple, str] = {}

    def __call__(self, path: Path) -> str:
        st = path.stat()
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if key not in self.known:
            self.known[key] = file_sha256(path)
        return self.known[key]


def problem_with(local: Path, expected: RemoteFile, vocab_size: int | None,
                 sha256: Callable[[Path], str] = file_sha256) -> str | None:
    """Why local is not a good copy of expected, or None when it is."""
    if not local.is_file():
        return "missing"
    size = local.stat().st_size
    if expected.size_bytes is not None and size != expected.size_bytes:
        return f"{size} bytes, the manifest says {expected.size_bytes}"
    if expected.path.endswith(".bin"):
        try:
            read_shard_header(local)
        except InputError as e:
            return f"not a sound shard ({e})"
    if expected.sha256 and sha256(local) != expected.sha256:
        return "sha256 differs from the manifest"
    if expected.path.endswith(".model") and vocab_size is not None:
        return tokenizer_problem(local, vocab_size)
    return None


def tokenizer_problem(path: Path, vocab_size: int) -> str | None:
    try:
        import sentencepiece as spm
    except ImportError:
        return None  # nothing more to check without it; train_gpt.py checks again when it loads the file
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(path.read_bytes())
    except Exception:
        return "not a SentencePiece model"
    if sp.vocab_size() != vocab_size:
        return f"a {sp.vocab_size()}-token tokenizer, expected {vocab_size}"
    return None


def ensure_file(expected: RemoteFile, local_root: Path, fetch: Fetch, vocab_size: int | None, source: str,
                sha256: Callable[[Path], str] = file_sha256) -> bool:
    """Makes local_root/expected.path a verified copy; True when it had to be fetched."""
    local = local_root / expected.path
    problem = problem_with(local, expected, vocab_size, sha256)
    if problem is None:
        print(f"present {expected.path} (verified)", flush=True)
        return False
    if problem != "missing":
        print(f"refetch {expected.path}: {problem}", flush=True)
    local.parent.mkdir(parents=True, exist_ok=True)
    partial = local.with_name(f"{local.name}.part")
    partial.unlink(missing_ok=True)
    started = time.perf_counter()
    try:
        fetch(f"{REMOTE_ROOT}/{expected.path}", partial)
        problem = problem_with(partial, expected, vocab_size, sha256)
        if problem is not None:
            raise InputError(f"{source}/{REMOTE_ROOT}/{expected.path}: the fetched copy is bad ({problem}); "
                             "the source is corrupt or incomplete: repair the mirror or run again")
        os.replace(partial, local)
    finally:
        partial.unlink(missing_ok=True)
    seconds = time.perf_counter() - started
    megabytes = local.stat().st_size / 1e6
    print(f"fetched {expected.path} MB:{megabytes:.1f} seconds:{seconds:.2f} "
          f"MB_per_s:{megabytes / max(seconds, 1e-9):.1f}", flush=True)
    return True


def load_manifest(local_root: Path, fetch: Fetch, source: str) -> dict:
    """The source's manifest, fetched fresh each run and kept locally; the local copy if the source is out of reach."""
    local = local_root / "datasets" / MANIFEST_NAME
    local.parent.mkdir(parents=True, exist_ok=True)
    partial = local.with_name(f"{local.name}.part")
    try:
        fetch(f"{REMOTE_ROOT}/{MANIFEST_NAME}", partial)
        raw = partial.read_bytes()
    except InputError as e:
        if not local.is_file() or isinstance(e, MissingDependency):
            raise
        print(f"warning: {e}; using the manifest fetched before, {local}", file=sys.stderr)
        raw = local.read_bytes()
    finally:
        partial.unlink(missing_ok=True)
    try:
        manifest = json.loads(raw)
    except ValueError as e:
        raise InputError(f"{source}/{REMOTE_ROOT}/{MANIFEST_NAME}: not valid JSON ({e}); the source is corrupt") from None
    if not isinstance(manifest, dict):
        raise InputError(f"{source}/{REMOTE_ROOT}/{MANIFEST_NAME}: not a JSON object; the source is corrupt")
    atomic_write_bytes(local, raw)
    return manifest


def write_dataset_manifest(local_root: Path, variant: str, plan: Plan, vocab_size: int | None, source: str,
                           sha256: Callable[[Path], str]) -> Path:
    """DATASET/manifest.json for the verified files (see the header); returns its path."""
    dataset_dir = local_root / "datasets" / f"fineweb10B_{variant}"
    verified = {Path(f.path).name for f in [*plan.val, *plan.train]}
    others = {Path(f.path).name: f for f in plan.other_train}
    files = {}
    for shard in sorted(p for p in dataset_dir.iterdir() if SHARD_PATTERN.fullmatch(p.name)):
        if shard.name not in verified:  # left by an earlier download: checked here, never fetched
            problem = (problem_with(shard, others[shard.name], vocab_size, sha256) if shard.name in others
                       else "the source's manifest does not list it")
            if problem is not None:
                print(f"warning: {shard}: {problem}; left out of {MANIFEST_NAME}; delete it, or fetch it again with "
                      "a larger --train-shards", file=sys.stderr)
                continue
        files[shard.name] = sha256(shard)

    manifest: dict = {"source": "download_fineweb.py", "variant": variant}
    remote_copy = local_root / "datasets" / MANIFEST_NAME
    manifest["remote_manifest"] = {"file": os.path.relpath(remote_copy, dataset_dir).replace(os.sep, "/"),
                                   "sha256": file_sha256(remote_copy), "from": f"{source}/{REMOTE_ROOT}/{MANIFEST_NAME}"}
    # The published export's own split (the challenge's exporter: the first num_val_docs documents), as its
    # manifest states it; data/prepare.py's document-hash check needs the documents and is not run here.
    published_val_docs = json.loads(remote_copy.read_bytes()).get("num_val_docs", "unrecorded")
    manifest["split"] = {"rule": "published", "val_docs": published_val_docs, "check": "none"}
    model = next((f for f in plan.tokenizer if f.path.endswith(".model")), None)
    if model is not None:
        manifest["tokenizer"] = {"source": "downloaded",
                                 "file": os.path.relpath(local_root / model.path, dataset_dir).replace(os.sep, "/"),
                                 "sha256": sha256(local_root / model.path)}
        if vocab_size is not None:
            manifest["tokenizer"]["vocab_size"] = vocab_size
    else:
        print(f"warning: the source lists no .model tokenizer for fineweb10B_{variant}; {MANIFEST_NAME} names none",
              file=sys.stderr)
    manifest["files"] = files

    path = dataset_dir / MANIFEST_NAME
    data = (json.dumps(manifest, indent=2) + "\n").encode("utf-8")
    if path.is_file():
        old = path.read_bytes()
        if old == data:
            return path
        disagreement = manifest_disagreement(old, manifest)
        if disagreement:
            print(f"note: {path} disagreed with the verified files ({disagreement}); rewritten", flush=True)
    atomic_write_bytes(path, data)
    return path


def manifest_disagreement(old_bytes: bytes, new: dict) -> str:
    """How an earlier manifest's tokenizer and file hashes differ from new's; empty when they agree."""
    try:
        old = json.loads(old_bytes)
        old_files = old["files"]
        old_tokenizer = (old.get("tokenizer") or {}).get("sha256")
        if not isinstance(old_files, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError, AttributeError):
        return "not a manifest with a files mapping"
    reasons = []
    if old_tokenizer != (new.get("tokenizer") or {}).get("sha256"):
        reasons.append("tokenizer sha256 differs")
    names, old_names = set(new["files"]), set(old_files)
    differing = sum(1 for name in names & old_names if old_files[name] != new["files"][name])
    for count, what in ((differing, "sha256 differs"), (len(names - old_names), "not listed"),
                        (len(old_names - names), "listed but not here")):
        if count:
            reasons.append(f"{count} shard{'s' if count > 1 else ''} {what}")
    return ", ".join(reasons)


def download_docs(fetch: Fetch, local_root: Path, manifest: dict, source: str,
                  sha256: Callable[[Path], str]) -> tuple[int, int]:
    """The official documents and their source manifest, verified (see the header); (fetched, present)."""
    listed = listed_files(manifest, None)
    docs_path = sidecar_path(Path(DOCS_NAME))
    sidecar = listed.get(docs_path.name, RemoteFile(docs_path.name))
    sidecar_local = local_root / sidecar.path
    if sidecar_local.is_file() and sidecar.sha256 is None:  # unverifiable: take the source's copy each run
        sidecar_local.unlink()
    fetched = int(ensure_file(sidecar, local_root, fetch, None, source, sha256))
    facts = official_list(local_root / DOCS_NAME).sidecar  # refuses a source manifest that is not the challenge's
    docs = listed.get(DOCS_NAME, RemoteFile(DOCS_NAME))
    docs = RemoteFile(DOCS_NAME, docs.size_bytes if docs.size_bytes is not None else facts.get("docs_bytes"),
                      docs.sha256 or facts.get("docs_sha256"))
    for key, ours, theirs in (("bytes", docs.size_bytes, facts.get("docs_bytes")),
                              ("sha256", docs.sha256, facts.get("docs_sha256"))):
        if theirs is not None and ours != theirs:
            raise InputError(f"{source}/{REMOTE_ROOT}: {MANIFEST_NAME} and {sidecar.path} disagree on the {key} of "
                             f"{DOCS_NAME}; the source is inconsistent: try another --revision or mirror")
    if docs.sha256 is None:
        print(f"warning: neither {MANIFEST_NAME} nor {sidecar.path} gives the sha256 of {DOCS_NAME}; only its size "
              "is checked", file=sys.stderr)
    fetched += ensure_file(docs, local_root, fetch, None, source, sha256)
    return fetched, 2 - fetched


def download(fetch: Fetch, local_root: Path, variant: str, train_shards: int, source: str,
             with_docs: bool = False, shards: bool = True) -> dict:
    """Fetches what is missing or bad; returns counts of fetched and already-present files."""
    manifest = load_manifest(local_root, fetch, source)
    sha256 = Hashes()
    fetched = present = 0
    if with_docs:
        fetched, present = download_docs(fetch, local_root, manifest, source, sha256)
        print(f"docs path:{log_value(local_root / DOCS_NAME)}", flush=True)
        print(f"next: python data/prepare.py --input {local_root / DOCS_NAME} --vocab-size 8192 --out-dir "
              f"{local_root / 'datasets/fineweb10B_sp8192'} --tokenizer-out {local_root / 'tokenizers/fineweb_8192_bpe.model'}",
              flush=True)
    if not shards:
        summary = {"docs": 2, "fetched": fetched, "already_present": present}
        print("done " + " ".join(f"{key}:{value}" for key, value in summary.items()), flush=True)
        return summary
    plan = plan_downloads(manifest, variant, train_shards, f"{source}/{REMOTE_ROOT}/{MANIFEST_NAME}")
    vocab_size = int(variant[2:]) if re.fullmatch(r"sp\d+", variant) else None
    for expected in [*plan.val, *plan.train, *plan.tokenizer]:
        if ensure_file(expected, local_root, fetch, vocab_size, source, sha256):
            fetched += 1
        else:
            present += 1
    manifest_path = write_dataset_manifest(local_root, variant, plan, vocab_size, source, sha256)
    print(f"manifest {manifest_path}", flush=True)
    summary = {"val_shards": len(plan.val), "train_shards": len(plan.train), "tokenizer_files": len(plan.tokenizer),
               **({"docs": 2} if with_docs else {}), "fetched": fetched, "already_present": present}
    print("done " + " ".join(f"{key}:{value}" for key, value in summary.items())
          + f" data:{local_root / 'datasets' / f'fineweb10B_{variant}'}", flush=True)
    return summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Fetch and verify the official cached FineWeb shards and tokenizer.")
    parser.add_argument("--train-shards", type=int, default=DEFAULT_TRAIN_SHARDS,
                        help=f"how many train shards (100M tokens each) to fetch; default {DEFAULT_TRAIN_SHARDS}; "
                             "the val shards always come")
    parser.add_argument("--variant", default=DEFAULT_VARIANT, help="tokenization of the export (sp1024: fineweb10B_sp1024)")
    parser.add_argument("--with-docs", action="store_true",
                        help=f"also fetch the official documents, {DOCS_NAME} and its source manifest (48 GB)")
    parser.add_argument("--docs-only", action="store_true", help="fetch only the official documents, no shards")
    parser.add_argument("--source-dir", help="copy from this local mirror of the repository instead of the hub")
    parser.add_argument("--repo-id", default=REPO_ID)
    parser.add_argument("--revision", help="a branch, tag or commit of the repository (default: main)")
    parser.add_argument("--local-root", default=str(DATA_DIR), help="where datasets/ and tokenizers/ go (default: data/)")
    args = parser.parse_args(argv)
    if args.train_shards < 0:
        parser.error("--train-shards must be 0 or more")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.source_dir:
            if not Path(args.source_dir).is_dir():
                raise InputError(f"--source-dir {args.source_dir}: no such folder; point it at a local mirror of {REPO_ID}")
            fetch, source = mirror_fetcher(Path(args.source_dir)), args.source_dir
        else:
            fetch, source = hub_fetcher(args.repo_id, args.revision), args.repo_id
        download(fetch, Path(args.local_root), args.variant, args.train_shards, source,
                 with_docs=args.with_docs or args.docs_only, shards=not args.docs_only)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
