"""The official validation split (data/official_split.py, enforced by data/prepare.py): a fake official
document list of 50,400 documents with its source manifest; validation must be exactly its first 50,000
documents and training none of them, checked by document hash: an off-by-one, a wrong --val-docs or a
split with the right count and the wrong documents is refused, and nothing is written."""

import hashlib
import json
import random

import pytest

from test_data_prepare import SMALL_VOCAB, WORDS, prepare, read_split, run_prepare, split_on_bos, tokenizer

OFFICIAL_VAL = 50_000
TRAIN_DOCS = 400
EMPTY_AT = 7  # an empty document inside validation: it counts, as in the challenge's export
REPEATED = (12, OFFICIAL_VAL + 100)  # the list itself repeats document 12 after the boundary


def official_documents() -> list[str]:
    rng = random.Random(5)
    docs = []
    for i in range(OFFICIAL_VAL + TRAIN_DOCS):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8 if i < OFFICIAL_VAL else 40)))
        docs.append(f"Document {i} {words}.")
    docs[EMPTY_AT] = ""
    docs[REPEATED[1]] = docs[REPEATED[0]]
    return docs


def write_official_list(folder, docs, **sidecar_overrides):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "docs_selected.jsonl"
    data = "".join(json.dumps({"text": t}) + "\n" for t in docs).encode()
    path.write_bytes(data)
    sidecar = {"num_docs": len(docs), "docs_val": OFFICIAL_VAL, "docs_train": len(docs) - OFFICIAL_VAL,
               "docs_bytes": len(data), "docs_sha256": hashlib.sha256(data).hexdigest(), "selection_seed": 1337}
    sidecar.update(sidecar_overrides)
    (folder / "docs_selected.source_manifest.json").write_text(json.dumps(sidecar))
    return path


@pytest.fixture(scope="module", params=["plain", "case_ops"])
def official(tmp_path_factory, request):
    """The list prepared as it is, and with case operators (data/case_ops.py): every check below holds for both."""
    root = tmp_path_factory.mktemp("official")
    docs = official_documents()
    docs[OFFICIAL_VAL + 7] = "ALL CAPS, McMixed and a marker \ue001 in a training DOCUMENT"
    listing = write_official_list(root / "hub", docs)
    out = root / "sp"
    options = ("--case-ops",) if request.param == "case_ops" else ()
    assert run_prepare("--input", listing, "--vocab-size", SMALL_VOCAB, "--out-dir", out, "--shard-tokens", 200_000,
                       *options) == 0
    transform = prepare.case_ops.encode if options else (lambda text: text)
    return {"root": root, "docs": docs, "list": listing, "out": out, "model": out / f"sp{SMALL_VOCAB}_bpe.model",
            "options": options, "transform": transform}


def prepare_again(official, out, *extra):
    return run_prepare("--input", official["list"], "--tokenizer", official["model"], "--vocab-size", SMALL_VOCAB,
                       "--out-dir", out, "--shard-tokens", 200_000, *official["options"], *extra)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_the_official_list_validates_on_exactly_its_first_50000_documents(official):
    manifest = json.loads((official["out"] / "manifest.json").read_text())
    split = manifest["split"]
    assert split["rule"] == "official" and split["val_docs"] == OFFICIAL_VAL and split["check"] == "document_hash"
    assert split["val_documents"] == OFFICIAL_VAL and split["train_documents"] == TRAIN_DOCS
    assert split["repeats_across_split"] == 1 and split["list_facts"]["selection_seed"] == 1337
    sp = tokenizer(official["model"])
    val, train = split_on_bos(read_split(official["out"], "val")), split_on_bos(read_split(official["out"], "train"))
    assert len(val) == OFFICIAL_VAL and len(train) == TRAIN_DOCS
    docs, transform = official["docs"], official["transform"]
    for index in (0, EMPTY_AT, OFFICIAL_VAL - 1):
        assert val[index].tolist() == sp.encode(transform(docs[index]))
    assert train[0].tolist() == sp.encode(transform(docs[OFFICIAL_VAL])) and train[-1].tolist() == sp.encode(transform(docs[-1]))
    assert train[7].tolist() == sp.encode(transform(docs[OFFICIAL_VAL + 7]))
    assert manifest["tokenization"]["name"] == ("case_ops_v1" if official["options"] else "plain")
    assert manifest["tokenizer"]["train_documents"] == TRAIN_DOCS  # the tokenizer never saw a validation document


@pytest.mark.parametrize("val_docs, named", [(OFFICIAL_VAL - 1, "document #49,999 would go into the training shards"),
                                             (10_000, "documents #10,000 to #49,999 would go into the training"),
                                             (OFFICIAL_VAL + 1, "document #50,000 would be taken from training")])
def test_a_wrong_val_docs_is_refused_naming_the_documents_and_the_fix(official, tmp_path, capsys, val_docs, named):
    assert prepare_again(official, tmp_path / "out", "--val-docs", val_docs) == 2
    line = one_error_line(capsys)
    assert named in line and "drop --val-docs" in line and "official document list" in line
    assert not (tmp_path / "out").exists()


def off_by_one_late(index, val_docs):
    return "val" if index <= val_docs else "train"


def off_by_one_early(index, val_docs):
    return "val" if index < val_docs - 1 else "train"


def right_count_wrong_documents(index, val_docs):
    return "train" if index == 3 else "val" if index <= val_docs else "train"


@pytest.mark.parametrize("split_of, expected", [
    (off_by_one_early, "the training shards hold 1 validation document (#49,999 of"),
    (off_by_one_late, "the validation shards hold 50,001 documents, not exactly documents #0 to #49,999"),
    (right_count_wrong_documents, "the training shards hold 1 validation document (#3 of")])
def test_the_hash_check_refuses_a_wrong_split_and_writes_nothing(official, tmp_path, capsys, monkeypatch,
                                                                 split_of, expected):
    """The writer made to split wrongly: the check, which reads the shards back, refuses; the output folder is
    left as it was. The last case has the right count (50,000 validation documents) and a wrong document."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("kept")
    monkeypatch.setattr(prepare, "split_of", split_of)
    assert prepare_again(official, out) == 2
    line = one_error_line(capsys)
    assert expected in line and "nothing was written" in line, line
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_the_check_does_not_take_the_split_from_the_count_it_was_given(official, tmp_path, capsys, monkeypatch):
    """--val-docs 10000 (#2127's default) let past the guard: the check's 50,000 comes from the official list,
    not from the run, and it names the 40,000 documents the split would have trained on."""
    monkeypatch.setattr(prepare, "choose_val_docs", lambda *args: 10_000)
    assert prepare_again(official, tmp_path / "out") == 2
    line = one_error_line(capsys)
    assert "the training shards hold 40,000 validation documents (#10,000, #10,001, #10,002, #10,003, #10,004 and " \
           "39,995 more of" in line


def test_the_check_names_leaked_documents(tmp_path):
    """check_split on its own, on hand-made shards: training that holds validation documents is refused
    naming them; the right split passes."""
    import numpy as np

    def stream(ids):  # document i: BOS, then two tokens that no other document has
        return np.concatenate([np.array([1, 100 + i % 50, 200 + i // 50], np.uint16) for i in ids])
    input_hashes = prepare.document_hashes(stream(range(10)))
    for name, train_from in (("leaky", 2), ("right", 4)):
        folder = tmp_path / name
        prepare.write_data_shard(folder / "fineweb_val_000000.bin", stream(range(4)))
        prepare.write_data_shard(folder / "fineweb_train_000000.bin", stream(range(train_from, 10)))
    with pytest.raises(prepare.InputError, match=r"the training shards hold 2 validation documents \(#2, #3 of list"):
        prepare.check_split(tmp_path / "leaky", input_hashes, 4, "list.jsonl")
    assert prepare.check_split(tmp_path / "right", input_hashes, 4, "list.jsonl")["train_documents"] == 6


@pytest.mark.parametrize("sidecar, expected", [({"docs_sha256": "0" * 64}, "sha256"),
                                               ({"docs_bytes": 12}, "bytes, the source manifest says 12"),
                                               ({"num_docs": 60_000}, "documents, its source manifest says 60,000"),
                                               ({"docs_val": 10_000}, "docs_val is 10000")])
def test_a_list_that_disagrees_with_its_source_manifest_is_refused(official, tmp_path, capsys, sidecar, expected):
    listing = write_official_list(tmp_path / "hub", official["docs"], **sidecar)
    assert run_prepare("--input", listing, "--tokenizer", official["model"], "--vocab-size", SMALL_VOCAB,
                       "--out-dir", tmp_path / "out", *official["options"]) == 2
    line = one_error_line(capsys)
    assert expected in line and "download_fineweb.py --with-docs" in line, line


def test_the_official_list_must_be_the_only_input(official, tmp_path, capsys):
    assert run_prepare("--input", official["list"], "--builtin", "--out-dir", tmp_path / "out") == 2
    assert "must be the only input" in one_error_line(capsys)
