"""Tests for data/download_fineweb.py against a local folder laid out like the Hugging Face repository."""

import importlib.util
import io
import json
import pathlib
import random
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from train_gpt import InputError, file_sha256, write_data_shard  # noqa: E402

_spec = importlib.util.spec_from_file_location("data_download_fineweb", REPO_ROOT / "data" / "download_fineweb.py")
download_fineweb = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = download_fineweb  # dataclasses look their module up there
_spec.loader.exec_module(download_fineweb)

SHARD_DIR = "datasets/fineweb10B_sp1024"
TRAIN_SHARDS = 3


@pytest.fixture(scope="module")
def tokenizer_model():
    """A real 1024-token SentencePiece model, trained in a blink on made-up words."""
    import sentencepiece as spm

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(3000)]
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(3000)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.Train(sentence_iterator=iter(lines), model_writer=model, model_type="bpe",
                                   vocab_size=1024, byte_fallback=True, minloglevel=2, num_threads=1)
    return model.getvalue()


def make_mirror(root, tokenizer_model, *, shape="entries", with_hashes=True):
    """root/datasets/{manifest.json, datasets/fineweb10B_sp1024/*.bin, tokenizers/*} as on the hub."""
    base = root / "datasets"
    rng = np.random.default_rng(0)
    relative = [f"{SHARD_DIR}/fineweb_val_000000.bin"] + [f"{SHARD_DIR}/fineweb_train_{i:06d}.bin" for i in range(TRAIN_SHARDS)]
    for i, path in enumerate(relative):
        (base / path).parent.mkdir(parents=True, exist_ok=True)
        write_data_shard(base / path, rng.integers(0, 1024, size=2000 + 100 * i))
    (base / "tokenizers").mkdir(parents=True)
    (base / "tokenizers/fineweb_1024_bpe.model").write_bytes(tokenizer_model)
    (base / "tokenizers/fineweb_1024_bpe.vocab").write_text("<pad>\t0\n<s>\t0\n", encoding="utf-8")
    relative += ["tokenizers/fineweb_1024_bpe.model", "tokenizers/fineweb_1024_bpe.vocab"]

    manifest = {}
    if shape == "entries":
        manifest["datasets"] = [{"name": "fineweb10B_sp1024", "tokenizer_name": "sp_bpe_1024",
                                 "stats": {"files_val": 1, "files_train": TRAIN_SHARDS}}]
        manifest["tokenizers"] = [{"name": "sp_bpe_1024", "model_path": "tokenizers/fineweb_1024_bpe.model",
                                   "vocab_path": "tokenizers/fineweb_1024_bpe.vocab"}]
    if with_hashes or shape == "files":
        manifest["files"] = [{"path": p, **({"bytes": (base / p).stat().st_size, "sha256": file_sha256(base / p)}
                                           if with_hashes else {})} for p in relative]
    (base / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return root


class CountingFetch:
    """The mirror's fetch, remembering which repository paths were asked for."""

    def __init__(self, mirror):
        self.inner = download_fineweb.mirror_fetcher(mirror)
        self.calls = []

    def __call__(self, remote_path, local_path):
        self.calls.append(remote_path)
        self.inner(remote_path, local_path)


def shard_call(split, i):
    return f"datasets/{SHARD_DIR}/fineweb_{split}_{i:06d}.bin"


MANIFEST_CALL = "datasets/manifest.json"
TOKENIZER_CALLS = ["datasets/tokenizers/fineweb_1024_bpe.model", "datasets/tokenizers/fineweb_1024_bpe.vocab"]


def download(mirror, local, train_shards):
    fetch = CountingFetch(mirror)
    summary = download_fineweb.download(fetch, local, "sp1024", train_shards, str(mirror))
    return fetch.calls, summary


def assert_same_files(mirror, local, paths):
    for path in paths:
        assert (local / path).read_bytes() == (mirror / "datasets" / path).read_bytes(), path
    assert not list(local.rglob("*.part"))


@pytest.mark.parametrize("shape", ["entries", "files"])
def test_download_from_mirror_places_verified_files(tmp_path, tokenizer_model, shape):
    mirror = make_mirror(tmp_path / "mirror", tokenizer_model, shape=shape)
    local = tmp_path / "data"
    calls, summary = download(mirror, local, train_shards=2)
    assert calls == [MANIFEST_CALL, shard_call("val", 0), shard_call("train", 0), shard_call("train", 1), *TOKENIZER_CALLS]
    assert summary == {"val_shards": 1, "train_shards": 2, "tokenizer_files": 2, "fetched": 5, "already_present": 0}
    assert_same_files(mirror, local, [f"{SHARD_DIR}/fineweb_val_000000.bin", f"{SHARD_DIR}/fineweb_train_000001.bin",
                                      "tokenizers/fineweb_1024_bpe.model"])
    assert not (local / SHARD_DIR / "fineweb_train_000002.bin").exists()
    assert (local / "datasets" / "manifest.json").is_file()


@pytest.mark.parametrize("with_hashes", [True, False])
def test_interrupted_download_resumes_without_refetching_verified_shards(tmp_path, tokenizer_model, with_hashes):
    mirror = make_mirror(tmp_path / "mirror", tokenizer_model, with_hashes=with_hashes)
    local = tmp_path / "data"
    download(mirror, local, train_shards=TRAIN_SHARDS)
    # An interruption: one shard cut short, the last one never arrived, a partial file left behind.
    truncated = local / SHARD_DIR / "fineweb_train_000001.bin"
    truncated.write_bytes(truncated.read_bytes()[:-300])
    (local / SHARD_DIR / "fineweb_train_000002.bin").unlink()
    (local / SHARD_DIR / "fineweb_train_000002.bin.part").write_bytes(b"half")
    calls, summary = download(mirror, local, train_shards=TRAIN_SHARDS)
    assert calls == [MANIFEST_CALL, shard_call("train", 1), shard_call("train", 2)]
    assert (summary["fetched"], summary["already_present"]) == (2, 4)
    assert_same_files(mirror, local, [f"{SHARD_DIR}/fineweb_train_{i:06d}.bin" for i in range(TRAIN_SHARDS)])
    # A complete folder: nothing but the manifest is fetched again.
    calls, _ = download(mirror, local, train_shards=TRAIN_SHARDS)
    assert calls == [MANIFEST_CALL]


def test_a_local_shard_that_differs_from_the_manifest_hash_is_refetched(tmp_path, tokenizer_model):
    mirror = make_mirror(tmp_path / "mirror", tokenizer_model)
    local = tmp_path / "data"
    download(mirror, local, train_shards=1)
    shard = local / SHARD_DIR / "fineweb_val_000000.bin"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # same size, valid header: only the hash can tell
    shard.write_bytes(bytes(data))
    calls, _ = download(mirror, local, train_shards=1)
    assert calls == [MANIFEST_CALL, shard_call("val", 0)]
    assert_same_files(mirror, local, [f"{SHARD_DIR}/fineweb_val_000000.bin"])


@pytest.mark.parametrize("damage, with_hashes, reason", [
    ("flip", True, "sha256 differs from the manifest"),
    ("truncate", False, "truncated or padded shard"),
    ("bad_magic", False, "not a token shard"),
])
def test_a_corrupted_mirror_shard_is_refused(tmp_path, tokenizer_model, damage, with_hashes, reason):
    mirror = make_mirror(tmp_path / "mirror", tokenizer_model, with_hashes=with_hashes)
    bad = mirror / "datasets" / SHARD_DIR / "fineweb_train_000000.bin"
    data = bytearray(bad.read_bytes())
    if damage == "flip":
        data[2000] ^= 0xFF
    elif damage == "truncate":
        data = data[:-10]
    else:
        data[0] ^= 0xFF
    bad.write_bytes(bytes(data))
    local = tmp_path / "data"
    with pytest.raises(InputError, match=reason) as caught:
        download(mirror, local, train_shards=1)
    assert "fineweb_train_000000.bin" in str(caught.value)
    assert not (local / SHARD_DIR / "fineweb_train_000000.bin").exists()
    assert not list(local.rglob("*.part"))


def test_a_tokenizer_of_the_wrong_size_is_refused(tmp_path, tokenizer_model):
    import sentencepiece as spm

    mirror = make_mirror(tmp_path / "mirror", tokenizer_model, with_hashes=False)
    small = io.BytesIO()
    spm.SentencePieceTrainer.Train(sentence_iterator=iter(["some words to learn from"] * 50), model_writer=small,
                                   model_type="bpe", vocab_size=300, byte_fallback=True, minloglevel=2)
    (mirror / "datasets/tokenizers/fineweb_1024_bpe.model").write_bytes(small.getvalue())
    with pytest.raises(InputError, match="a 300-token tokenizer, expected 1024"):
        download(mirror, tmp_path / "data", train_shards=0)


def test_asking_for_more_train_shards_than_exist_is_refused(tmp_path, tokenizer_model):
    mirror = make_mirror(tmp_path / "mirror", tokenizer_model)
    with pytest.raises(InputError, match=f"has {TRAIN_SHARDS} train shards, fewer than --train-shards 9"):
        download(mirror, tmp_path / "data", train_shards=9)
    with pytest.raises(InputError, match="no shards listed for fineweb10B_sp4096"):
        download_fineweb.download(CountingFetch(mirror), tmp_path / "data", "sp4096", 1, "mirror")


def test_command_line_exit_codes(tmp_path, tokenizer_model):
    mirror = make_mirror(tmp_path / "mirror", tokenizer_model)
    local = tmp_path / "data"

    def cli(*args):
        return subprocess.run([sys.executable, str(REPO_ROOT / "data" / "download_fineweb.py"), "--source-dir",
                               str(mirror), "--local-root", str(local), *args], capture_output=True, text=True)

    ok = cli("--train-shards", "1")
    assert ok.returncode == 0, ok.stderr
    assert "done val_shards:1 train_shards:1 tokenizer_files:2 fetched:4 already_present:0" in ok.stdout
    shutil.rmtree(local)
    bad = mirror / "datasets" / SHARD_DIR / "fineweb_val_000000.bin"
    bad.write_bytes(bad.read_bytes()[:-2])
    refused = cli("--train-shards", "1")
    assert refused.returncode == 2
    assert refused.stderr.startswith("error: ") and "Traceback" not in refused.stderr
    assert "fineweb_val_000000.bin" in refused.stderr


def test_without_huggingface_hub_the_fix_is_named(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes the import fail as if not installed
    assert download_fineweb.main(["--local-root", str(tmp_path), "--train-shards", "1"]) == 2
    assert "pip install huggingface_hub" in capsys.readouterr().err


def test_hub_source_goes_through_hf_hub_download(tmp_path, tokenizer_model, monkeypatch):
    """The hub path end to end, with hf_hub_download answered from a mirror (no network here)."""
    mirror = make_mirror(tmp_path / "mirror", tokenizer_model)
    requests = []

    def fake_hf_hub_download(repo_id, filename, repo_type, revision):
        requests.append((repo_id, filename, repo_type, revision))
        cached = tmp_path / "hf-cache" / filename
        cached.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(mirror / filename, cached)
        return str(cached)

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(hf_hub_download=fake_hf_hub_download))
    assert download_fineweb.main(["--local-root", str(tmp_path / "data"), "--train-shards", "1"]) == 0
    assert requests[0] == (download_fineweb.REPO_ID, "datasets/manifest.json", "dataset", None)
    assert {r[1] for r in requests} == {MANIFEST_CALL, shard_call("val", 0), shard_call("train", 0), *TOKENIZER_CALLS}
    assert_same_files(mirror, tmp_path / "data", [f"{SHARD_DIR}/fineweb_train_000000.bin"])


def dataset_manifest(local):
    return json.loads((local / SHARD_DIR / "manifest.json").read_text(encoding="utf-8"))


def assert_manifest_matches_the_files(local):
    manifest = dataset_manifest(local)
    dataset_dir = local / SHARD_DIR
    assert manifest["source"] == "download_fineweb.py"
    assert set(manifest["files"]) == {p.name for p in dataset_dir.glob("*.bin")}
    for name, sha256 in manifest["files"].items():
        assert file_sha256(dataset_dir / name) == sha256, name
    model = local / "tokenizers" / "fineweb_1024_bpe.model"
    assert (dataset_dir / manifest["tokenizer"]["file"]).resolve() == model.resolve()
    assert manifest["tokenizer"]["sha256"] == file_sha256(model) and manifest["tokenizer"]["vocab_size"] == 1024
    assert (dataset_dir / manifest["remote_manifest"]["file"]).resolve() == (local / "datasets/manifest.json").resolve()
    return manifest


@pytest.mark.parametrize("with_hashes", [True, False])
def test_download_leaves_a_manifest_in_the_dataset_folder(tmp_path, tokenizer_model, with_hashes):
    mirror = make_mirror(tmp_path / "mirror", tokenizer_model, with_hashes=with_hashes)
    local = tmp_path / "data"
    download(mirror, local, train_shards=2)
    manifest = assert_manifest_matches_the_files(local)
    assert sorted(manifest["files"]) == ["fineweb_train_000000.bin", "fineweb_train_000001.bin",
                                         "fineweb_val_000000.bin"]
    before = (local / SHARD_DIR / "manifest.json").stat().st_mtime_ns
    download(mirror, local, train_shards=2)  # nothing changed: the manifest is left alone
    assert (local / SHARD_DIR / "manifest.json").stat().st_mtime_ns == before


def test_the_dataset_manifest_lists_earlier_shards_only_when_they_verify(tmp_path, tokenizer_model, capsys):
    mirror = make_mirror(tmp_path / "mirror", tokenizer_model)
    local = tmp_path / "data"
    download(mirror, local, train_shards=TRAIN_SHARDS)
    calls, _ = download(mirror, local, train_shards=1)  # a smaller download keeps the larger one's shards
    assert calls == [MANIFEST_CALL]
    assert len(assert_manifest_matches_the_files(local)["files"]) == 1 + TRAIN_SHARDS
    # One of those shards damaged, and one the source never had: both are left out, with a warning.
    damaged = local / SHARD_DIR / "fineweb_train_000002.bin"
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(bytes(data))
    shutil.copyfile(local / SHARD_DIR / "fineweb_train_000000.bin", local / SHARD_DIR / "fineweb_train_000099.bin")
    capsys.readouterr()
    download(mirror, local, train_shards=1)
    err = capsys.readouterr().err
    assert f"{damaged}: sha256 differs from the manifest; left out of manifest.json" in err
    assert "fineweb_train_000099.bin: the source's manifest does not list it; left out of manifest.json" in err
    assert sorted(dataset_manifest(local)["files"]) == ["fineweb_train_000000.bin", "fineweb_train_000001.bin",
                                                        "fineweb_val_000000.bin"]


def test_a_dataset_manifest_that_disagrees_is_rewritten(tmp_path, tokenizer_model, capsys):
    mirror = make_mirror(tmp_path / "mirror", tokenizer_model)
    local = tmp_path / "data"
    download(mirror, local, train_shards=1)
    path = local / SHARD_DIR / "manifest.json"
    stale = dataset_manifest(local)
    stale["files"]["fineweb_val_000000.bin"] = "0" * 64
    stale["files"]["fineweb_train_000007.bin"] = "1" * 64
    stale["tokenizer"]["sha256"] = "2" * 64
    path.write_text(json.dumps(stale), encoding="utf-8")
    capsys.readouterr()
    download(mirror, local, train_shards=1)
    out = capsys.readouterr().out
    assert (f"note: {path} disagreed with the verified files (tokenizer sha256 differs, 1 shard sha256 differs, "
            "1 shard listed but not here); rewritten") in out
    assert_manifest_matches_the_files(local)
    path.write_text("{not json", encoding="utf-8")
    download(mirror, local, train_shards=1)
    assert "not a manifest with a files mapping" in capsys.readouterr().out
    assert_manifest_matches_the_files(local)


# ---- the official documents and other variants ----


DOCS_CALLS = ["datasets/docs_selected.source_manifest.json", "datasets/docs_selected.jsonl"]


def add_docs(mirror, docs_val=50_000, listed=False):
    """The official document list and its source manifest, as the hub holds them (a few documents here)."""
    base = mirror / "datasets"
    data = "".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(7)).encode()
    (base / "docs_selected.jsonl").write_bytes(data)
    facts = {"num_docs": 7, "docs_val": docs_val, "docs_bytes": len(data),
             "docs_sha256": download_fineweb.file_sha256(base / "docs_selected.jsonl")}
    (base / "docs_selected.source_manifest.json").write_text(json.dumps(facts))
    if listed:  # the repository manifest lists them too
        manifest = json.loads((base / "manifest.json").read_text())
        manifest["files"] += [{"path": p, "bytes": (base / p).stat().st_size, "sha256": file_sha256(base / p)}
                              for p in ("docs_selected.jsonl", "docs_selected.source_manifest.json")]
        (base / "manifest.json").write_text(json.dumps(manifest))
    return data


@pytest.mark.parametrize("listed", [False, True])
def test_the_official_documents_are_fetched_verified_and_resumed(tmp_path, tokenizer_model, listed):
    mirror = make_mirror(tmp_path / "mirror", tokenizer_model)
    data = add_docs(mirror, listed=listed)
    local = tmp_path / "data"
    fetch = CountingFetch(mirror)
    summary = download_fineweb.download(fetch, local, "sp1024", 1, str(mirror), with_docs=True)
    assert fetch.calls[:3] == [MANIFEST_CALL, *DOCS_CALLS] and summary["docs"] == 2
    assert (local / "docs_selected.jsonl").read_bytes() == data  # where the challenge's scripts put it
    # A second run fetches the documents only when the copy here does not verify.
    fetch = CountingFetch(mirror)
    download_fineweb.download(fetch, local, "sp1024", 1, str(mirror), with_docs=True, shards=False)
    assert "datasets/docs_selected.jsonl" not in fetch.calls
    (local / "docs_selected.jsonl").write_bytes(data[:-3])  # an interrupted copy
    fetch = CountingFetch(mirror)
    summary = download_fineweb.download(fetch, local, "sp1024", 1, str(mirror), with_docs=True, shards=False)
    assert fetch.calls[-1] == "datasets/docs_selected.jsonl" and (local / "docs_selected.jsonl").read_bytes() == data
    assert not any("fineweb_" in call for call in fetch.calls)  # --docs-only: no shards


@pytest.mark.parametrize("damage, reason", [("documents", "the fetched copy is bad"),
                                            ("docs_val", "docs_val is 10000, but the official split is the first")])
def test_official_documents_that_do_not_verify_are_refused(tmp_path, tokenizer_model, damage, reason):
    mirror = make_mirror(tmp_path / "mirror", tokenizer_model)
    add_docs(mirror, docs_val=10_000 if damage == "docs_val" else 50_000)
    if damage == "documents":
        path = mirror / "datasets" / "docs_selected.jsonl"
        path.write_bytes(path.read_bytes().replace(b"document 3", b"document 8"))  # same size, other documents
    with pytest.raises(InputError, match=reason):
        download_fineweb.download(CountingFetch(mirror), tmp_path / "data", "sp1024", 0, str(mirror), with_docs=True,
                                  shards=False)
    assert not (tmp_path / "data" / "docs_selected.jsonl").exists()


def test_a_published_sp8192_variant_downloads_with_its_own_tokenizer(tmp_path):
    """Another vocabulary from another repository (as kevclark/parameter-golf publishes sp8192): the
    variant's folder, its 8192-token tokenizer checked for its size, a manifest train_gpt.py reads."""
    from test_data_prepare import builtin_corpus, prepare

    docs, _ = builtin_corpus.builtin_documents()
    model, _ = prepare.train_tokenizer(iter(docs), 8192)
    base = tmp_path / "mirror" / "datasets"
    rng = np.random.default_rng(1)
    paths = ["datasets/fineweb10B_sp8192/fineweb_val_000000.bin", "datasets/fineweb10B_sp8192/fineweb_train_000000.bin"]
    for path in paths:
        write_data_shard(base / path, rng.integers(0, 8192, size=3000))
    (base / "tokenizers").mkdir(parents=True)
    (base / "tokenizers/fineweb_8192_bpe.model").write_bytes(model)
    manifest = {"num_val_docs": 50_000,
                "datasets": [{"name": "fineweb10B_sp8192", "tokenizer_name": "sp_bpe_8192",
                              "stats": {"files_val": 1, "files_train": 1}}],
                "tokenizers": [{"name": "sp_bpe_8192", "model_path": "tokenizers/fineweb_8192_bpe.model"}]}
    (base / "manifest.json").write_text(json.dumps(manifest))
    local = tmp_path / "data"
    summary = download_fineweb.download(CountingFetch(tmp_path / "mirror"), local, "sp8192", 1, "mirror")
    assert summary["fetched"] == 3
    written = json.loads((local / "datasets/fineweb10B_sp8192/manifest.json").read_text())
    assert written["tokenizer"]["vocab_size"] == 8192 and written["variant"] == "sp8192"
    assert written["split"] == {"rule": "published", "val_docs": 50_000, "check": "none"}
    import train_gpt

    identity = train_gpt.data_identity(str(local / "datasets/fineweb10B_sp8192"),
                                       str(local / "tokenizers/fineweb_8192_bpe.model"))
    assert identity["manifest"] == "checked" and identity["split"] == "published"
