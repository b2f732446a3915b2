"""Case operators (data/case_ops.py): the transform is lossless on the built-in corpus and on text made to
stress it (mixed case, capitals, non-ASCII, the marker characters themselves), it does what SPEC 12.1 says
word by word, and a transform without the escape rule loses text."""

import re

import numpy as np
import pytest

from test_data_prepare import builtin_corpus, load_script

case_ops = load_script("data_case_ops", "data/case_ops.py")
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
