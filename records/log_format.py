"""The log grammar every script of this project writes, and its one reader.

A log line is a tag, then key:value fields, then, optionally, a comment for people:

    eval_base val_loss:3.26005134 val_bpb:1.85278201 eval_time:59173ms stride:64
    swa snapshots:13 # the average is exported

tag: lower-case letters, digits and underscores, no colon. key: a letter or underscore, then
letters, digits, underscores or dots. value: anything but white space (it may be empty, it may
hold colons); a value that needs a space writes it as %20 (and a % as %25: train_gpt.log_value),
which the reader undoes. A comment starts at " # " and runs to the end of the line. A line without any field, or
whose first word is no word ("|", "-", "$"), is prose (a table, a message from a library) and is
no log line; one that has fields must follow the grammar, or the reader refuses it.

A log carries the source of the code that ran (train_gpt.py in the training log; the scripts
an evaluation runs in eval_final.py's): a line `code file:NAME bytes:B sha256:H lines:L
final_newline:0|1`, then exactly L lines of that file, which the reader skips and code_blocks
returns, checked against H.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from urllib.parse import unquote

TAG = re.compile(r"[a-z][a-z0-9_]*")
KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*:?")  # what a tag, right or wrong, looks like
COMMENT = " # "
CODE_TAG = "code"
CODE_KEYS = {"file", "bytes", "sha256", "lines"}


class LogFormatError(ValueError):
    """A line that has fields but breaks the grammar: where, and what."""


@dataclass(frozen=True)
class LogLine:
    tag: str
    fields: dict = field(default_factory=dict)  # key -> value text, %-escapes undone
    comment: str = ""
    line_number: int = 0


def parse_line(text: str, tags=None, line_number: int = 0) -> LogLine | None:
    """The line's tag and fields, or None for prose. With `tags`, the tag may stand after a prefix
    (a timestamp, a rank) and only those tags count; without, the first word is the tag."""
    body, _, comment = text.rstrip("\n").partition(COMMENT)
    words = body.split()
    if tags is None:
        start = 0
    else:
        start = next((i for i, w in enumerate(words) if w in tags), None)
        if start is None:
            return None
    prefixed, words = start > 0, words[start:]
    if not words or not any(":" in w for w in words[1:]) or not WORD.fullmatch(words[0]):
        return None  # no fields, or a first word that is no word ("|", "-", "$"): prose
    tag = words[0]
    if not TAG.fullmatch(tag):
        raise LogFormatError(f"line {line_number}: {tag!r} is not a tag (lower-case letters, digits and _, no "
                             f"colon after it): {text.strip()!r}")
    fields = {}
    for word in words[1:]:
        key, colon, value = word.partition(":")
        if not colon or not KEY.fullmatch(key):
            if prefixed:
                return None  # a tag's word in the middle of someone else's message: prose
            raise LogFormatError(f"line {line_number}: {word!r} is not a key:value field (a value with a space "
                                 f"in it?): {text.strip()!r}")
        fields[key] = unquote(value)
    return LogLine(tag, fields, comment.strip(), line_number)


def code_header(raw: str, line_number: int = 0) -> int | None:
    """How many source lines follow a `code` line, or None for any other line."""
    if not raw.startswith(CODE_TAG + " "):
        return None
    line = parse_line(raw, None, line_number)
    if line is None or line.tag != CODE_TAG:
        return None
    if not (line.fields.get("lines", "").isdigit() and CODE_KEYS <= set(line.fields)):
        raise LogFormatError(f"line {line_number}: a code line needs {', '.join(sorted(CODE_KEYS))} (lines a whole "
                             f"number): {raw.strip()!r}")
    return int(line.fields["lines"])


def read_lines(text: str, tags=None, first_word=None) -> list[LogLine]:
    """Every log line of a log's text, code blocks skipped. first_word: only lines that start with it
    are read (a reader that wants one tag ignores a library's message that breaks the grammar)."""
    found, skip = [], 0
    for number, raw in enumerate(text.splitlines(), start=1):
        if skip:
            skip -= 1
            continue
        count = code_header(raw, number)  # a code block is skipped whichever lines are asked for
        if count is not None:
            skip = count
            found.append(parse_line(raw, None, number))
            continue
        if first_word is not None and raw.split(maxsplit=1)[:1] != [first_word]:
            continue
        line = parse_line(raw, tags, number)
        if line is not None:
            found.append(line)
    return found


def code_blocks(text: str) -> dict[str, str]:
    """{file name: source} of every code block in a log, each checked against its sha256. Read the log
    with open(..., newline="") so that a carriage return in the source survives."""
    lines, blocks, i = text.splitlines(keepends=True), {}, 0
    while i < len(lines):
        count = code_header(lines[i], i + 1)
        i += 1
        if count is None:
            continue
        header = parse_line(lines[i - 1], None, i)
        source = "".join(lines[i:i + count])
        if header.fields.get("final_newline") == "0":
            source = source.removesuffix("\n")  # the newline the log added after a file that had none
        i += count
        if hashlib.sha256(source.encode("utf-8")).hexdigest() != header.fields["sha256"]:
            raise LogFormatError(f"line {header.line_number}: the code of {header.fields['file']} does not hash to "
                                 "its sha256 (the log was cut or edited)")
        blocks[header.fields["file"]] = source
    return blocks


def last_line(text_or_lines, tag: str) -> LogLine:
    """The last `tag` line of a log (its text, or its lines); LookupError when there is none."""
    text = text_or_lines if isinstance(text_or_lines, str) else "\n".join(text_or_lines)
    found = [line for line in read_lines(text, first_word=tag) if line.tag == tag]
    if not found:
        raise LookupError(f"no '{tag}' line")
    return found[-1]
