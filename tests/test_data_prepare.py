"""Tests for data/prepare.py and data/builtin_corpus.py: shards, splits, manifest, determinism, errors."""

import importlib.util
import json
import pathlib
import random
import subprocess
import sys

import numpy as np
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from train_gpt import SHARD_HEADER_BYTES, load_data_shard, read_shard_header  # noqa: E402


def load_script(name, relative_path):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / relative_path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


prepare = load_script("data_prepare", "data/prepare.py")
builtin_corpus = load_script("data_builtin_corpus", "data/builtin_corpus.py")

SMALL_VOCAB = 384  # 256 byte pieces + 4 specials + the alphabet, with room for merges
WORDS = ("the river ran past old stone houses where people kept small gardens and talked about weather "
         "markets songs trains letters children winter summer bread music paper light water").split()


def make_documents(count, seed):
    """Single-spaced sentences, so SentencePiece's normalization gives back exactly this text."""
    rng = random.Random(seed)
    documents = []
    for _ in range(count):
        sentences = []
        for _ in range(rng.randint(1, 5)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(4, 12))]
            if rng.random() < 0.3:
                words.append(f"in {rng.randint(1800, 2024)}")
            if rng.random() < 0.1:
                words.append("café")  # rare enough to go through byte fallback
            sentences.append(" ".join(words).capitalize() + ".")
        documents.append(" ".join(sentences))
    return documents


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)), encoding="utf-8")
    return path


def read_split(out_dir, split):
    shards = sorted(out_dir.glob(f"fineweb_{split}_*.bin"))
    return np.concatenate([load_data_shard(p, 1 << 16) for p in shards]) if shards else np.zeros(0, np.uint16)


def split_on_bos(stream):
    assert stream[0] == prepare.BOS_ID, "a split must start with BOS"
    starts = np.flatnonzero(stream == prepare.BOS_ID)
    return [stream[a + 1 : b] for a, b in zip(starts, [*starts[1:], stream.size])]


def run_prepare(*args):
    return prepare.main([str(a) for a in args])


def run_cli(*args):
    return subprocess.run([sys.executable, str(REPO_ROOT / "data" / "prepare.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=REPO_ROOT)


@pytest.fixture(scope="module")
def documents():
    return make_documents(120, seed=1)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, documents):
    """Two identical runs over a .jsonl and two .txt files, with small shards so each split has several."""
    root = tmp_path_factory.mktemp("prepared")
    jsonl = write_jsonl(root / "docs.jsonl", documents[:100])
    (root / "a.txt").write_text(documents[100], encoding="utf-8")
    (root / "b.txt").write_text("\n\n".join(documents[101:]) + "\n", encoding="utf-8")
    outs = []
    for run in ("one", "two"):
        out = root / run
        args = ["--input", jsonl, "--input", root / "a.txt", "--vocab-size", SMALL_VOCAB, "--out-dir", out,
                "--val-docs", 30, "--shard-tokens", 1500]
        assert run_prepare(*args) == 0
        outs.append(out)
    # b.txt holds several paragraphs; only a run in paragraph mode splits it.
    paragraphs = root / "paragraphs"
    assert run_prepare("--input", root / "b.txt", "--txt-docs", "paragraph", "--tokenizer",
                       outs[0] / f"sp{SMALL_VOCAB}_bpe.model", "--vocab-size", SMALL_VOCAB,
                       "--out-dir", paragraphs, "--val-docs", 5) == 0
    return {"root": root, "out": outs[0], "again": outs[1], "paragraphs": paragraphs,
            "docs": documents[:101], "paragraph_docs": documents[101:]}


def tokenizer(path):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(path))


def test_shard_writer_roundtrip(tmp_path):
    stream = np.arange(0, 2500, dtype=np.uint16) % 1024
    writer = prepare.ShardWriter(tmp_path, "train", shard_tokens=1000)
    writer.add(stream[:700], documents=3, text_bytes=10)
    writer.add(stream[700:], documents=4, text_bytes=20)
    summary = writer.finish()
    shards = sorted(tmp_path.glob("fineweb_train_*.bin"))
    assert [p.name for p in shards] == ["fineweb_train_000000.bin", "fineweb_train_000001.bin", "fineweb_train_000002.bin"]
    assert [read_shard_header(p) for p in shards] == [1000, 1000, 500]
    assert [p.stat().st_size for p in shards] == [SHARD_HEADER_BYTES + 2 * n for n in (1000, 1000, 500)]
    np.testing.assert_array_equal(np.concatenate([load_data_shard(p, 1024) for p in shards]), stream)
    assert (summary["documents"], summary["tokens"], summary["bytes"]) == (7, 2500, 30)


def test_encode_puts_bos_before_each_document():
    class FakeTokenizer:
        def encode(self, texts, out_type, num_threads):
            return [[10 + len(t)] * len(t) for t in texts]

    stream = prepare.encode_documents(FakeTokenizer(), ["ab", "", "xyz"])
    assert stream.tolist() == [1, 12, 12, 1, 1, 13, 13, 13]


def test_each_document_is_bos_then_its_tokens(prepared):
    sp = tokenizer(prepared["out"] / f"sp{SMALL_VOCAB}_bpe.model")
    stream = np.concatenate([read_split(prepared["out"], "val"), read_split(prepared["out"], "train")])
    decoded = [sp.decode(doc.tolist()) for doc in split_on_bos(stream)]
    assert decoded == prepared["docs"]
    assert int((stream == prepare.TOKENIZER_SETTINGS["eos_id"]).sum()) == 0


def test_validation_is_the_first_documents(prepared):
    sp = tokenizer(prepared["out"] / f"sp{SMALL_VOCAB}_bpe.model")
    val = [sp.decode(doc.tolist()) for doc in split_on_bos(read_split(prepared["out"], "val"))]
    train = [sp.decode(doc.tolist()) for doc in split_on_bos(read_split(prepared["out"], "train"))]
    assert val == prepared["docs"][:30]
    assert train == prepared["docs"][30:]


def test_shards_have_the_asked_size_except_the_last(prepared):
    for split in ("val", "train"):
        sizes = [read_shard_header(p) for p in sorted(prepared["out"].glob(f"fineweb_{split}_*.bin"))]
        assert len(sizes) >= 2
        assert all(n == 1500 for n in sizes[:-1]) and 0 < sizes[-1] <= 1500


def test_manifest_matches_the_files(prepared):
    out = prepared["out"]
    manifest = json.loads((out / "manifest.json").read_text())
    on_disk = {p.name for p in out.iterdir()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk
    for name, sha256 in manifest["files"].items():
        assert prepare.file_sha256(out / name) == sha256
    val, train = manifest["splits"]["val"], manifest["splits"]["train"]
    assert (val["documents"], train["documents"]) == (30, 71)
    assert val["tokens"] == read_split(out, "val").size and train["tokens"] == read_split(out, "train").size
    assert val["bytes"] + train["bytes"] == sum(len(d.encode()) for d in prepared["docs"])
    assert manifest["tokenizer"]["settings"]["normalization_rule_name"] == "nmt_nfkc"
    assert manifest["tokenizer"]["vocab_size"] == SMALL_VOCAB
    assert [i["kind"] for i in manifest["inputs"]] == ["jsonl", "txt"]


def test_two_runs_are_byte_identical(prepared):
    first, second = prepared["out"], prepared["again"]
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    assert f"sp{SMALL_VOCAB}_bpe.model" in names
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_paragraph_mode_makes_one_document_per_paragraph(prepared):
    out = prepared["paragraphs"]
    sp = tokenizer(prepared["out"] / f"sp{SMALL_VOCAB}_bpe.model")
    stream = np.concatenate([read_split(out, "val"), read_split(out, "train")])
    assert [sp.decode(doc.tolist()) for doc in split_on_bos(stream)] == prepared["paragraph_docs"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokenizer"]["source"] == "given"
    assert set(manifest["files"]) == {p.name for p in out.glob("*.bin")}


def test_a_smaller_rerun_removes_stale_shards(prepared, tmp_path):
    out = tmp_path / "out"
    jsonl = prepared["root"] / "docs.jsonl"
    model = prepared["out"] / f"sp{SMALL_VOCAB}_bpe.model"
    common = ["--input", jsonl, "--tokenizer", model, "--vocab-size", SMALL_VOCAB, "--out-dir", out, "--val-docs", 10]
    assert run_prepare(*common, "--shard-tokens", 500) == 0
    assert run_prepare(*common, "--shard-tokens", 100_000) == 0
    assert sorted(p.name for p in out.glob("*.bin")) == ["fineweb_train_000000.bin", "fineweb_val_000000.bin"]


def test_malformed_jsonl_line_names_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": "broken\n', encoding="utf-8")
    result = run_cli("--input", bad, "--out-dir", tmp_path / "out", "--vocab-size", SMALL_VOCAB, "--val-docs", 1)
    assert result.returncode == 2
    assert f"{bad}:3: malformed JSON" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content, expected", [
    ('{"text": "ok"}\n{"body": "no text"}\n', ':2: no "text" field'),
    ('{"text": "ok"}\n{"text": 5}\n', ':2: the "text" field is a int'),
    ('{"text": "ok"}\n[1, 2]\n', ':2: no "text" field'),
])
def test_jsonl_without_text_is_refused(tmp_path, capsys, content, expected):
    path = tmp_path / "docs.jsonl"
    path.write_text(content, encoding="utf-8")
    assert run_prepare("--input", path, "--out-dir", tmp_path / "out", "--val-docs", 1) == 2
    assert f"{path}{expected}" in capsys.readouterr().err


def test_empty_input_is_refused(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n", encoding="utf-8")
    assert run_prepare("--input", empty, "--out-dir", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "no documents" in err and str(empty) in err


def test_validation_taking_everything_is_refused(prepared, tmp_path, capsys):
    jsonl = prepared["root"] / "docs.jsonl"
    assert run_prepare("--input", jsonl, "--out-dir", tmp_path / "out", "--val-docs", 100) == 2
    assert "--val-docs 100 takes all 100 documents" in capsys.readouterr().err


def test_tokenizer_of_another_size_is_refused(prepared, tmp_path, capsys):
    model = prepared["out"] / f"sp{SMALL_VOCAB}_bpe.model"
    jsonl = prepared["root"] / "docs.jsonl"
    assert run_prepare("--input", jsonl, "--tokenizer", model, "--vocab-size", 1024, "--out-dir", tmp_path / "out",
                       "--val-docs", 10) == 2
    err = capsys.readouterr().err
    assert f"has {SMALL_VOCAB} tokens but --vocab-size 1024" in err and str(model) in err


def test_other_input_errors_are_one_clear_line(tmp_path, capsys):
    not_utf8 = tmp_path / "latin1.txt"
    not_utf8.write_bytes("caf\xe9 au lait".encode("latin-1"))
    assert run_prepare("--input", not_utf8, "--out-dir", tmp_path / "out") == 2
    assert "not UTF-8 text (invalid byte at offset 3)" in capsys.readouterr().err
    assert run_prepare("--input", tmp_path / "nowhere.jsonl", "--out-dir", tmp_path / "out") == 2
    assert "no such file or folder" in capsys.readouterr().err
    tiny = write_jsonl(tmp_path / "tiny.jsonl", ["one short line", "and another"])
    assert run_prepare("--input", tiny, "--out-dir", tmp_path / "out", "--val-docs", 1) == 2
    assert "could not train a 1024-token tokenizer" in capsys.readouterr().err


@pytest.fixture(scope="module")
def builtin():
    return builtin_corpus.builtin_documents()


def test_builtin_corpus_is_big_enough_and_deterministic(builtin):
    documents, sha256 = builtin
    assert sum(len(d.encode("utf-8")) for d in documents) >= builtin_corpus.MINIMUM_CORPUS_BYTES
    assert len(documents) > 100 and all(d.strip() for d in documents)
    assert builtin_corpus.corpus_sha256(documents) == sha256
    # Once more in a fresh interpreter, from another folder and under -OO: the same text.
    result = subprocess.run([sys.executable, "-OO", str(REPO_ROOT / "data" / "builtin_corpus.py")],
                            capture_output=True, text=True, cwd="/", check=True)
    assert f"sha256:{sha256}" in result.stdout


def test_prepare_on_the_builtin_corpus(builtin, tmp_path):
    documents, sha256 = builtin
    out = tmp_path / "builtin"
    assert run_prepare("--builtin", "--max-docs", 150, "--val-docs", 20, "--out-dir", out) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"] == [{**builtin_corpus.describe(documents, sha256)}]
    assert manifest["splits"]["val"]["documents"] == 20 and manifest["splits"]["train"]["documents"] == 130
    assert manifest["tokenizer"]["vocab_size"] == 1024 and manifest["tokenizer"]["train_documents"] == 130
    sp = tokenizer(out / "sp1024_bpe.model")
    assert sp.vocab_size() == 1024 and sp.bos_id() == 1 and sp.pad_id() == 0 and sp.eos_id() == 2 and sp.unk_id() == 3
    assert len(split_on_bos(read_split(out, "val"))) == 20


# ----------------------------------------------------------------------------------------------
# All or nothing: a run that stops leaves the output folder as it was.
# ----------------------------------------------------------------------------------------------


def folder_hashes(folder):
    """Every file under folder, by relative path, with its sha256."""
    return {p.relative_to(folder).as_posix(): prepare.file_sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers_beside(folder):
    """Staging or set-aside folders a run left next to folder."""
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


@pytest.fixture
def earlier_run(tmp_path):
    """A folder prepared once (tokenizer trained into it), to be rerun over with other text."""
    out = tmp_path / "out"
    first = write_jsonl(tmp_path / "first.jsonl", make_documents(80, seed=3))
    assert run_prepare("--input", first, "--vocab-size", SMALL_VOCAB, "--out-dir", out, "--val-docs", 20,
                       "--shard-tokens", 1500) == 0
    (out / "notes.txt").write_text("the user's own file\n", encoding="utf-8")
    return out


def rerun_input(tmp_path, bad_line):
    """100 good documents, unlike the earlier run's, then (optionally) a malformed last line."""
    path = write_jsonl(tmp_path / "second.jsonl", make_documents(100, seed=4))
    if bad_line:
        with open(path, "a", encoding="utf-8") as f:
            f.write('{"text": "cut off\n')
    return path


@pytest.mark.parametrize("tokenizer_outside", [False, True])
def test_a_bad_line_at_the_end_leaves_the_folder_as_it_was(earlier_run, tmp_path, capsys, tokenizer_outside):
    out = earlier_run
    before = folder_hashes(out)
    second = rerun_input(tmp_path, bad_line=True)
    outside = tmp_path / "tokenizers" / "new.model"
    # The tokenizer learns from 40 documents and the shards fill up long before line 101 is read.
    args = ["--input", second, "--vocab-size", SMALL_VOCAB, "--out-dir", out, "--val-docs", 20,
            "--shard-tokens", 500, "--tokenizer-train-docs", 40]
    if tokenizer_outside:
        args += ["--tokenizer-out", outside]
    capsys.readouterr()
    assert run_prepare(*args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {second}:101: malformed JSON"), err
    assert folder_hashes(out) == before
    assert leftovers_beside(out) == []
    assert not outside.exists()


def test_an_interrupt_part_way_leaves_the_folder_as_it_was(earlier_run, tmp_path, capsys, monkeypatch):
    out = earlier_run
    before = folder_hashes(out)
    second = rerun_input(tmp_path, bad_line=False)
    written = []
    real_write = prepare.write_data_shard

    def write_then_interrupt(path, tokens):
        if len(written) == 3:
            raise KeyboardInterrupt
        real_write(path, tokens)
        written.append(path)

    monkeypatch.setattr(prepare, "write_data_shard", write_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        prepare.run(prepare.parse_args(["--input", str(second), "--vocab-size", str(SMALL_VOCAB), "--out-dir", str(out),
                                        "--val-docs", "20", "--shard-tokens", "500"]))
    assert len(written) == 3
    assert folder_hashes(out) == before
    assert leftovers_beside(out) == []
    # Through main, the interrupt is one line and exit 130.
    written.clear()
    capsys.readouterr()
    assert run_prepare("--input", second, "--vocab-size", SMALL_VOCAB, "--out-dir", out, "--val-docs", 20,
                       "--shard-tokens", 500) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "interrupted" in err[0] and str(out) in err[0], err
    assert folder_hashes(out) == before
    assert leftovers_beside(out) == []


def test_a_finished_rerun_replaces_the_output_and_keeps_other_files(earlier_run, tmp_path):
    out = earlier_run
    old_model = (out / f"sp{SMALL_VOCAB}_bpe.model").read_bytes()
    second = rerun_input(tmp_path, bad_line=False)
    assert run_prepare("--input", second, "--vocab-size", SMALL_VOCAB, "--out-dir", out, "--val-docs", 20,
                       "--shard-tokens", 100_000) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert (out / f"sp{SMALL_VOCAB}_bpe.model").read_bytes() != old_model
    assert sorted(p.name for p in out.glob("*.bin")) == ["fineweb_train_000000.bin", "fineweb_val_000000.bin"]
    assert set(manifest["files"]) | {"manifest.json", "notes.txt"} == {p.name for p in out.iterdir()}
    assert (out / "notes.txt").read_text(encoding="utf-8") == "the user's own file\n"
    assert leftovers_beside(out) == []


def test_a_given_tokenizer_inside_the_folder_survives_the_rerun(earlier_run, tmp_path):
    out = earlier_run
    model = out / f"sp{SMALL_VOCAB}_bpe.model"
    model_bytes = model.read_bytes()
    second = rerun_input(tmp_path, bad_line=False)
    assert run_prepare("--input", second, "--tokenizer", model, "--vocab-size", SMALL_VOCAB, "--out-dir", out,
                       "--val-docs", 20) == 0
    assert model.read_bytes() == model_bytes
    assert json.loads((out / "manifest.json").read_text())["tokenizer"]["file"] == model.name


def test_a_stale_staging_folder_is_removed_by_the_next_run(earlier_run, tmp_path, capsys):
    out = earlier_run
    stale = out.parent / f".{out.name}.staging-4194305"  # above Linux's largest pid: no live run has it
    stale.mkdir()
    (stale / "fineweb_val_000000.bin").write_bytes(b"half a shard")
    capsys.readouterr()
    second = rerun_input(tmp_path, bad_line=False)
    assert run_prepare("--input", second, "--vocab-size", SMALL_VOCAB, "--out-dir", out, "--val-docs", 20) == 0
    assert f"removed {stale}" in capsys.readouterr().out
    assert leftovers_beside(out) == []
    assert json.loads((out / "manifest.json").read_text())["splits"]["train"]["documents"] == 80


def test_a_folder_set_aside_by_a_killed_swap_is_restored(earlier_run, tmp_path, capsys):
    out = earlier_run
    before = folder_hashes(out)
    aside = out.parent / f".{out.name}.old-4194305"
    out.rename(aside)  # as if killed between moving the old folder aside and moving the new one in
    capsys.readouterr()
    # Even a run that then fails on its input puts the folder back first.
    assert run_prepare("--input", rerun_input(tmp_path, bad_line=True), "--vocab-size", SMALL_VOCAB,
                       "--out-dir", out, "--val-docs", 20, "--shard-tokens", 500, "--tokenizer-train-docs", 40) == 2
    assert f"restored {out} from {aside}" in capsys.readouterr().out
    assert folder_hashes(out) == before
    assert leftovers_beside(out) == []
    # Killed after the new folder was in place: the old one is only deleted.
    (out.parent / f".{out.name}.old-4194305").mkdir()
    assert run_prepare("--input", rerun_input(tmp_path, bad_line=True), "--vocab-size", SMALL_VOCAB,
                       "--out-dir", out, "--val-docs", 20, "--shard-tokens", 500, "--tokenizer-train-docs", 40) == 2
    assert leftovers_beside(out) == []
    assert folder_hashes(out) == before


def test_an_out_dir_that_is_a_file_is_refused(tmp_path, capsys):
    not_a_folder = tmp_path / "out"
    not_a_folder.write_text("x", encoding="utf-8")
    docs = write_jsonl(tmp_path / "docs.jsonl", make_documents(30, seed=5))
    assert run_prepare("--input", docs, "--out-dir", not_a_folder, "--vocab-size", SMALL_VOCAB, "--val-docs", 5) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out-dir {not_a_folder}: ") and "Traceback" not in err
    assert not_a_folder.read_text(encoding="utf-8") == "x"
