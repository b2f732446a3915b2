"""
case_ops.py: lossless case operators (SPEC section 12.1, "CaseOps"), the transform and its inverse.

Capitals are factored out of the text into marker characters, so that "The", "THE" and "the" share
the lowercase token and the model predicts case separately. Over every maximal run of ASCII letters:

    lowercase             unchanged                          river     -> river
    Titlecase             TITLE + the run in lowercase       River     -> T river
    all capitals (2+)     ALLCAPS + the run in lowercase     RIVER     -> A river
    mixed case            TITLE when the first letter is a   McDonald  -> T m C donald
                          capital, then CAPNEXT before       iPhone    -> i C phone
                          each later capital, lowercased
    a marker character    ESC + the character                (any text; an escaped marker is literal)

Everything else (digits, punctuation, space, non-ASCII letters) is left as it is. Markers are the
private-use characters U+E001 (TITLE), U+E002 (ALLCAPS), U+E003 (CAPNEXT) and U+E004 (ESC); a
tokenizer declares them as user-defined symbols so that each is one token. decode(encode(t)) == t for
every string t. Uppercasing and lowercasing ASCII letters keeps their byte count, so the original text's
UTF-8 bytes are the transformed text's less 3 for every marker that is an operator (not an escaped
literal): original_byte_weights says which bytes of the transformed text stand for original bytes.
"""

from __future__ import annotations

import re

import numpy as np

TITLE, ALLCAPS, CAPNEXT, ESC = "\ue001", "\ue002", "\ue003", "\ue004"
MARKERS = (TITLE, ALLCAPS, CAPNEXT, ESC)
NAME = "case_ops_v1"  # what the manifest and the artifact record as the tokenization
MARKER_UTF8_BYTES = 3  # U+E001..U+E004 are three bytes each in UTF-8

_RUN_OR_MARKER = re.compile("[A-Za-z]+|[\ue001-\ue004]")
_UPPER = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _encode_run(run: str) -> str:
    if run[0] in MARKERS:
        return ESC + run
    if run.islower():
        return run
    lower = run.lower()
    if run[0] in _UPPER and lower[1:] == run[1:]:
        return TITLE + lower
    if len(run) >= 2 and run.isupper():
        return ALLCAPS + lower
    out = [TITLE + lower[0] if run[0] in _UPPER else run[0]]
    out.extend(CAPNEXT + lower[i] if c in _UPPER else c for i, c in enumerate(run[1:], start=1))
    return "".join(out)


def encode(text: str) -> str:
    """The text with its ASCII capitals as case operators and its marker characters escaped."""
    return _RUN_OR_MARKER.sub(lambda m: _encode_run(m.group()), text)


class CaseOpsError(ValueError):
    """Text that encode() cannot have produced (a marker with nothing it could apply to)."""


_LETTERS = re.compile("[a-z]+")


def decode(text: str) -> str:
    """The inverse of encode(): operators applied and removed, escaped markers kept as text."""
    out, i, n = [], 0, len(text)
    while i < n:
        j = i
        while j < n and text[j] not in MARKERS:
            j += 1
        out.append(text[i:j])
        if j == n:
            break
        marker = text[j]
        if j + 1 == n:
            raise CaseOpsError(f"a marker U+{ord(marker):04X} ends the text at character {j}")
        following = text[j + 1]
        if marker == ESC:
            if following not in MARKERS:
                raise CaseOpsError(f"ESC at character {j} is followed by {following!r}, not a marker character")
            out.append(following)
            i = j + 2
        elif marker == ALLCAPS:
            run = _LETTERS.match(text, j + 1)
            if run is None:
                raise CaseOpsError(f"ALLCAPS at character {j} is followed by {following!r}, not a lowercase letter")
            out.append(run.group().upper())
            i = run.end()
        else:  # TITLE or CAPNEXT: the next letter is a capital
            if not ("a" <= following <= "z"):
                raise CaseOpsError(f"U+{ord(marker):04X} at character {j} is followed by {following!r}, "
                                   "not a lowercase letter")
            out.append(following.upper())
            i = j + 2
    return "".join(out)


def original_byte_weights(text: str) -> np.ndarray:
    """(len(text.encode("utf-8")),) uint8 for a transformed text: 1 for every byte that stands for a byte of
    the original text, 0 for the three bytes of each operator (an ESC, and TITLE/ALLCAPS/CAPNEXT unless
    escaped). The sum is len(decode(text).encode("utf-8"))."""
    raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    weights = np.ones(raw.size, dtype=np.uint8)
    if raw.size < MARKER_UTF8_BYTES:
        return weights
    # U+E001..U+E004 are EE 80 81..84; UTF-8 never holds that sequence inside another character
    starts = np.flatnonzero((raw[:-2] == 0xEE) & (raw[1:-1] == 0x80) & (raw[2:] >= 0x81) & (raw[2:] <= 0x84))
    literal_at = -1  # where the marker an ESC escapes starts
    for start in starts.tolist():
        if start == literal_at:  # a literal marker: its bytes are the original's
            continue
        weights[start : start + MARKER_UTF8_BYTES] = 0
        if raw[start + 2] == 0x84:  # ESC: the marker right after it is literal
            literal_at = start + MARKER_UTF8_BYTES
    return weights
