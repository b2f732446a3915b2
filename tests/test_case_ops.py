"""Case operators (data/case_ops.py): the transform is lossless on the built-in corpus and on text made to
stress it (mixed case, capitals, non-ASCII, the marker characters themselves), it does what SPEC 12.1 says
word by word, and a transform without the escape rule loses text."""

import dataclasses
import re

import numpy as np
import pytest

from test_data_prepare import builtin_corpus, prepare

case_ops = prepare.case_ops  # the module data/prepare.py transforms with
T, A, C, E = case_ops.TITLE, case_ops.ALLCAPS, case_ops.CAPNEXT, case_ops.ESC

# Every case the transform distinguishes, and text around the edges of a letter run.
STRESS_CORPUS = [
    "The RIVER ran past McDonald's; iPhone, eBay and NASA's JSON-RPC API. I am A OK.",
    "HTTPServer XMLHttpRequest getElementById aBC AbC ABc x y Z",
    "Naïve CAFÉ owners in ÉCOLE and Straße — the Ω of 東京, ΑΘΗΝΑ; Ünïcödé UPPERcase.",
    f"markers in the text: {T}, {A}x, {C}Y, {E}, {E}{E}{T}Title, {T}{T}, end{E}",
    f"{T}", f"{E}{T}", "A", "AB", "", "   leading  spaces\tand\ttabs\n\n\nTRAILING   ",
    "MiXeD cAsE wOrDs 123ABC456def 7Ghi a1B2c3D4",
    "line\r\nbreaks\rand\x00nul\x1fcontrol \U0001F600 emoji",
]


def second_corpus() -> list[str]:
    return STRESS_CORPUS


def without_escape(text: str) -> str:
    """The broken variant: encode() without the escape of marker characters already in the text."""
    return re.sub(f"{E}([{T}{A}{C}{E}])", r"\1", case_ops.encode(text))


@pytest.mark.parametrize("corpus", ["builtin", "stress"])
def test_decode_inverts_encode_byte_for_byte(corpus):
    docs = builtin_corpus.builtin_documents()[0] if corpus == "builtin" else second_corpus()
    for doc in docs:
        encoded = case_ops.encode(doc)
        assert case_ops.decode(encoded).encode("utf-8") == doc.encode("utf-8")
        assert int(case_ops.original_byte_weights(encoded).sum()) == len(doc.encode("utf-8"))
    if corpus == "builtin":  # the corpus has capitals of every kind
        joined = "".join(map(case_ops.encode, docs))
        assert all(joined.count(m) > 100 for m in (T, A, C))


def gives_back(encoded: str, doc: str) -> bool:
    try:
        return case_ops.decode(encoded) == doc
    except case_ops.CaseOpsError:
        return False


def test_a_variant_without_the_escape_loses_text():
    lost = [doc for doc in second_corpus() if not gives_back(without_escape(doc), doc)]
    assert lost and all(any(m in doc for m in case_ops.MARKERS) for doc in lost)


@pytest.mark.parametrize("word, expected", [
    ("river", "river"), ("River", T + "river"), ("RIVER", A + "river"), ("I", T + "i"), ("a", "a"),
    ("McDonald", T + "mc" + C + "donald"), ("iPhone", "i" + C + "phone"), ("ABc", T + "a" + C + "bc"),
    ("ÉCOLE", "É" + A + "cole"), ("Straße", T + "stra" + "ße"), ("x" + T, "x" + E + T), (E, E + E),
    ("R2D2", T + "r2" + T + "d2")])
def test_each_kind_of_word(word, expected):
    assert case_ops.encode(word) == expected and case_ops.decode(expected) == word


def test_byte_weights_count_escaped_markers_and_not_operators():
    encoded = case_ops.encode(f"Ab{T}")  # TITLE a b ESC TITLE
    assert encoded == f"{T}ab{E}{T}"
    assert case_ops.original_byte_weights(encoded).tolist() == [0, 0, 0, 1, 1, 0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("bad", [T, f"{T}1", f"{A} x", f"{E}a", f"x{C}"])
def test_decode_refuses_text_encode_cannot_make(bad):
    with pytest.raises(case_ops.CaseOpsError):
        case_ops.decode(bad)


# ----------------------------------------------------------------------------------------------
# The tokenizer (data/prepare.py --case-ops) and the bytes BPB counts
# ----------------------------------------------------------------------------------------------

import torch  # noqa: E402

import train_gpt  # noqa: E402
from conftest import BUILTIN_VAL_DOCS  # noqa: E402


def utf8_bytes(docs) -> int:
    return sum(len(d.encode("utf-8")) for d in docs)


@pytest.mark.parametrize("vocab", [1024, 8192])
def test_tokens_decode_and_invert_to_the_original_byte_for_byte(case_ops_tokenizers, builtin_tokenizers, vocab):
    """Every document of both corpora: encode -> tokens -> SentencePiece decode -> inverse transform is the
    original; the markers are tokens 4-7 and every one of them is a single token."""
    sp = prepare.tokenizer_from_bytes(case_ops_tokenizers[vocab])
    assert [sp.id_to_piece(i) for i in range(4, 8)] == list(case_ops.MARKERS)
    docs = builtin_tokenizers[0] + second_corpus()
    for doc in docs:
        ids = sp.encode(case_ops.encode(doc))
        assert case_ops.decode(sp.decode(ids)).encode("utf-8") == doc.encode("utf-8")
    marked = sp.encode(case_ops.encode(STRESS_CORPUS[3]))
    assert sum(i in (4, 5, 6, 7) for i in marked) == sum(case_ops.encode(STRESS_CORPUS[3]).count(m)
                                                          for m in case_ops.MARKERS)


def written_validation(sp, docs, folder):
    """data/prepare.py's writer on docs (all validation, one training document after them): (stream, sidecar)."""
    splits, _, _, val_bytes = prepare.write_shards(iter(docs + ["One training document."]), sp, folder, len(docs),
                                                   10**9, case_operators=True)
    stream = train_gpt.load_data_shard(folder / "fineweb_val_000000.bin", sp.vocab_size())
    return torch.from_numpy(stream.astype(np.int64)), val_bytes


@pytest.mark.parametrize("vocab", [1024, 8192])
def test_the_validation_byte_total_is_the_original_texts(case_ops_tokenizers, builtin_tokenizers, tmp_path, vocab):
    """The sidecar's total over the whole validation stream is the text's UTF-8 bytes (runs of spaces, tabs,
    marker characters and a literal U+2581 included), and on text the plain tokenizer's normaliser leaves as
    it is (single spaces) it equals the plain tokenizer's SPEC section 5 count too."""
    sp = prepare.tokenizer_from_bytes(case_ops_tokenizers[vocab])
    docs = builtin_tokenizers[0][:BUILTIN_VAL_DOCS] + second_corpus() + ["a \u2581 lower eighth BLOCK\u2581x"]
    stream, val_bytes = written_validation(sp, docs, tmp_path / "raw")
    positions = torch.arange(stream.numel() - 1)
    tables = train_gpt.ByteTables(*dataclasses.astuple(train_gpt.build_byte_tables(sp))[:3],
                                  target_sidecar=torch.from_numpy(val_bytes[1:].astype(np.int64)))
    assert int(tables.target_bytes(stream[:-1], stream[1:], positions).sum()) == utf8_bytes(docs)
    ids = stream.numpy()
    operators = np.isin(ids, (4, 5, 6)) & (np.roll(ids, 1) != 7)  # not escaped: ESC is token 7
    literals = np.isin(ids, (4, 5, 6, 7)) & (np.roll(ids, 1) == 7) & (np.roll(ids, 2) != 7)
    assert val_bytes[ids == 1].sum() == 0 and val_bytes[operators].sum() == 0 and (val_bytes[literals] == 3).all()

    plain = builtin_tokenizers[1][vocab]
    single = [" ".join(d.split()) for d in builtin_tokenizers[0][:BUILTIN_VAL_DOCS]]
    single = [t for t in single if plain.decode(plain.encode(t)) == t]
    assert len(single) > BUILTIN_VAL_DOCS // 2
    plain_stream = torch.from_numpy(np.concatenate([np.array([1] + plain.encode(t), np.int64) for t in single]))
    plain_total = int(train_gpt.build_byte_tables(plain).target_bytes(plain_stream[:-1], plain_stream[1:]).sum())
    _, single_bytes = written_validation(sp, single, tmp_path / "single")
    assert plain_total == int(single_bytes.sum()) == utf8_bytes(single)


def test_the_table_rule_would_miscount_case_operator_text(case_ops_tokenizers, builtin_tokenizers, tmp_path):
    """Why the sidecar: the tokenizer's tables count each marker's three bytes (and miss a document's leading
    space after BOS), so on case-operator tokens they are not the original text's bytes."""
    sp = prepare.tokenizer_from_bytes(case_ops_tokenizers[1024])
    docs = builtin_tokenizers[0][:BUILTIN_VAL_DOCS]
    stream, val_bytes = written_validation(sp, docs, tmp_path)
    tables = train_gpt.build_byte_tables(sp)
    assert int(tables.target_bytes(stream[:-1], stream[1:]).sum()) != int(val_bytes.sum()) == utf8_bytes(docs)


def test_every_scorer_sums_the_sidecar(case_ops_tokenizers, builtin_tokenizers, tmp_path):
    """train_gpt.evaluate (the sliding evaluation, through Scores.record, which chunked and phased TTT call too)
    counts the sidecar's bytes of exactly the targets it scores; byte tables with a sidecar refuse a caller
    that gives no positions."""
    from conftest import tiny_gpt

    sp = prepare.tokenizer_from_bytes(case_ops_tokenizers[1024])
    stream, val_bytes = written_validation(sp, builtin_tokenizers[0][:3], tmp_path)
    tokens = stream[: 4 * 64 + 1]
    tables = dataclasses.replace(train_gpt.build_byte_tables(sp),
                                 target_sidecar=torch.from_numpy(val_bytes[1 : tokens.numel()].astype(np.int64)))
    result = train_gpt.evaluate(tiny_gpt(1024), tokens, tables, 64, 32, 4, torch.device("cpu"), False)
    assert result.byte_count == int(val_bytes[1 : tokens.numel()].sum()) and result.token_count == 4 * 64
    with pytest.raises(ValueError, match="positions"):
        tables.target_bytes(tokens[:-1], tokens[1:])


# ----------------------------------------------------------------------------------------------
# End to end: prepare --case-ops -> train -> export -> hints -> TTT settings -> the legal evaluation
# ----------------------------------------------------------------------------------------------


def ok(run) -> str:
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    return run.stdout


@pytest.fixture(scope="module")
def case_ops_run(case_ops_tokenizers, tmp_path_factory):
    """The built-in corpus prepared with case operators at 1024 (the shared tokenizer given), and a tiny model
    trained on it."""
    import os

    from conftest import run_script, tiny_env

    root = tmp_path_factory.mktemp("case_ops_run")
    model = root / "case_ops_1024.model"
    model.write_bytes(case_ops_tokenizers[1024])
    data = root / "data"
    ok(run_script(["data/prepare.py", "--builtin", "--case-ops", "--tokenizer", str(model), "--vocab-size", "1024",
                   "--val-docs", str(BUILTIN_VAL_DOCS), "--shard-tokens", "400000", "--out-dir", str(data)],
                  dict(os.environ, OMP_NUM_THREADS="1")))
    out = root / "run"
    env = tiny_env({"data_path": str(data), "tokenizer_path": str(model), "vocab_size": 1024}, out, ITERATIONS=8,
                   AUTOCAST_BF16=0)
    log = ok(run_script(["train_gpt.py"], env))
    return {"env": dict(env, CHECKPOINT=str(out / train_gpt.ARTIFACT_NAME)), "log": log, "data": data, "out": out}


def test_a_case_operator_run_goes_from_training_to_the_legal_evaluation(case_ops_run):
    from conftest import log_format, log_value, run_script

    env, log = case_ops_run["env"], case_ops_run["log"]
    data_line = log_format.last_line(log, "data").fields
    assert data_line["tokenization"] == "case_ops_v1" and data_line["manifest"] == "checked"
    sidecar = train_gpt.load_data_shard(case_ops_run["data"] / train_gpt.VAL_BYTES_NAME, 1 << 16)
    assert int(data_line["val_bytes"]) == int(sidecar[1 : 4097].sum())  # VAL_MAX_TOKENS=4097: the scored targets
    final = log_format.last_line(log, "final_int6_zstd_roundtrip_exact").fields
    assert train_gpt.read_artifact(env["CHECKPOINT"]).meta["data"]["tokenization"] == "case_ops_v1"

    base = ok(run_script(["eval_final.py"], env))
    assert log_format.last_line(base, "eval_base").fields["val_bpb"] == final["val_bpb"]  # digit for digit

    ok(run_script(["build_correction_table.py"], dict(env, CORRECTION_MODE="causal", HINT_TRAIN_TOKENS="3000")))
    hinted = str(case_ops_run["out"] / "final_model.int6.with_hints.ptz")
    ok(run_script(["build_ttt_settings.py"], dict(env, CHECKPOINT=hinted, CALIBRATE_TTT_TOKENS="3000",
                                                  TTT_DOC_CHUNK_TOKENS="32")))
    legal = ok(run_script(["eval_final.py"], dict(env, CHECKPOINT=str(case_ops_run["out"] /
                                                                      "final_model.int6.with_hints.with_ttt.ptz"),
                                                  USE_CORRECTION="1", CORRECTION_MODE="causal", USE_TTT="1")))
    assert log_format.last_line(legal, "eval_base").fields["val_bpb"] == final["val_bpb"]
    assert log_format.last_line(legal, "ttt").fields["mode"] == "phased"
    for tag in ("eval_causal", "eval_ttt", "eval_ttt_causal"):
        assert np.isfinite(log_value(legal, tag, "val_bpb"))
    chunked = ok(run_script(["eval_final.py"], dict(env, USE_TTT="1", TTT_MODE="full", TTT_CHUNK_TOKENS="1024",
                                                    TTT_LR="0.05", USE_CORRECTION="1")))
    # eval_final asserts that TTT scored the base pass's bytes; the val-derived table divides by them too
    assert np.isfinite(log_value(chunked, "eval_ttt", "val_bpb"))
    assert np.isfinite(log_value(chunked, "eval_corrected_valderived", "val_bpb"))


def test_a_case_operator_model_on_plain_data_is_refused_in_one_line(case_ops_run, tmp_path):
    """The same shards and tokenizer with a manifest that says plain (the sidecar gone): refused before any
    scoring, naming the preparation to use; and the reverse, a plain model on case-operator data."""
    import json
    import shutil

    from conftest import run_script

    plain = tmp_path / "plain"
    shutil.copytree(case_ops_run["data"], plain)
    manifest = json.loads((plain / "manifest.json").read_text())
    manifest["tokenization"] = {"name": "plain"}
    del manifest["files"][train_gpt.VAL_BYTES_NAME]
    (plain / "manifest.json").write_text(json.dumps(manifest))
    (plain / train_gpt.VAL_BYTES_NAME).unlink()
    run = run_script(["eval_final.py"], dict(case_ops_run["env"], DATA_PATH=str(plain)))
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == 2 and len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    assert "plain data" in lines[0] and "trained on case_ops_v1 data" in lines[0] and "--case-ops" in lines[0]

    import eval_final

    settings = eval_final.EvalSettings(checkpoint="plain.ptz", data_path="co")
    with pytest.raises(train_gpt.InputError, match="case_ops_v1 data, and CHECKPOINT=plain.ptz was trained on plain "
                                                   "data.*without --case-ops"):
        eval_final.check_same_data({"data": {"tokenization": "plain"}}, {"tokenization": "case_ops_v1"}, settings)
    eval_final.check_same_data({}, {"tokenization": "plain"}, settings)  # an artifact from before: plain


def test_a_sidecar_that_is_not_the_manifests_is_refused(case_ops_run, tmp_path):
    import shutil

    from conftest import run_script

    changed = tmp_path / "changed"
    shutil.copytree(case_ops_run["data"], changed)
    sidecar = train_gpt.load_data_shard(changed / train_gpt.VAL_BYTES_NAME, 1 << 16).copy()
    sidecar[5] += 1
    train_gpt.write_data_shard(changed / train_gpt.VAL_BYTES_NAME, sidecar)
    run = run_script(["eval_final.py"], dict(case_ops_run["env"], DATA_PATH=str(changed)))
    assert run.returncode == 2 and "val_bytes.bin has sha256" in run.stderr and "data/prepare.py" in run.stderr


def test_a_case_operator_tokenizer_without_a_sidecar_is_refused(case_ops_tokenizers, builtin_tokenizers):
    """Data with no sidecar (no manifest, or a plain one) and a case-operator tokenizer: its tables would count
    3 bytes a marker, so the byte rule refuses; a plain tokenizer gets its tables."""
    assert train_gpt.CASE_MARKERS == "".join(case_ops.MARKERS)
    sp = prepare.tokenizer_from_bytes(case_ops_tokenizers[1024])
    assert train_gpt.is_case_ops_tokenizer(sp) and not train_gpt.is_case_ops_tokenizer(builtin_tokenizers[1][1024])
    tokens = torch.tensor([1, 4, 10, 11])
    with pytest.raises(train_gpt.InputError, match="no validation byte sidecar.*data/prepare.py --case-ops"):
        train_gpt.validation_byte_tables(sp, "some/data", {"tokenization": "plain"}, tokens)
    plain = train_gpt.validation_byte_tables(builtin_tokenizers[1][1024], "some/data", {"tokenization": "plain"},
                                             tokens)
    assert plain.target_sidecar is None
