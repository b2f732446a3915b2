"""
artifact.py: the artifact's file format, what train_gpt.py writes and every evaluation reads.

    prefix (magic "PGI6", version, header length) | tensors | extras | JSON header     -> zstd

The tensors are the quantizer's (quantize.py): per-row integers and their fp16 scales, float tensors
as they are, low-rank corrections; each entry of the header names its tensor, role, dtype, bit width,
shape and place. Extras are named byte strings carried inside the file (a correction table, the
causal hint knobs). The header comes last so that the tensors always start at byte 12 (zstd-22's size
for the same tensors moved with the header's length when it came first). Every damage to a file is
one line naming it (run_files.InputError).

A job that outgrew train_gpt.py (which keeps the Artifact record, the model built from it, and the
export ladder's search); its bytes count wherever train_gpt.py's do (code_size.EVALUATION_CODE).
"""

from __future__ import annotations

import json
import math
import os
import struct
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from quantize import EXPORT_LADDER, ExportRung, Quantized, dequantize_rows, quantize_state, read_correction, \
    stored_tensors, tensor_bits, weight_group
from run_files import InputError

ARTIFACT_MAGIC = b"PGI6"
# 2: each integer tensor records its bit width; 3: low-rank corrections (roles lqer_a, lqer_b), and the JSON
# header after the tensors, so the tensors always start at byte 12: zstd-22's size for the same tensors moved
# by up to 3% with the header's length when the header came first (measured), and adding the hint knobs (one
# more header entry) could then grow the file by tens of kilobytes.
ARTIFACT_VERSION = 3
# 4: per group (grouped_artifact): a raw prefix, a zstd-compressed JSON header, then one stream per group of
# integers (quantize.weight_group: layers concatenated, transposed where it compresses better), the scales,
# the float tensors, the extras, each compressed by the codec measured best for it
GROUPED_VERSION = 4
READABLE_ARTIFACT_VERSIONS = (2, 3, 4)  # a version 2 file is a version 3 file without corrections
ARTIFACT_PREFIX = struct.Struct("<4sII")  # magic, version, header length in bytes
ARTIFACT_NAME = "final_model.int6.ptz"

def pack_artifact(state: dict[str, Tensor], meta: dict, extras: dict[str, bytes] | None = None,
                  zstd_level: int = 22, rung: ExportRung = EXPORT_LADDER[0],
                  quantized: dict[str, Quantized] | None = None) -> bytes:
    """The artifact of `state` at `rung`: rounded to nearest, or as `quantized` (quantize_state) says."""
    if quantized is None:
        quantized = quantize_state(state, {n: tensor_bits(n, t, rung) for n, t in state.items()})
    entries, payloads, offset = [], [], 0
    for name, role, t, bits in stored_tensors(state, quantized):
        payloads.append(data := t.contiguous().cpu().numpy().tobytes())
        entries.append({"name": name, "role": role, "dtype": str(t.dtype).removeprefix("torch."), "bits": bits,
                        "shape": list(t.shape), "offset": offset, "nbytes": len(data)})
        offset += len(data)
    return assemble_artifact({"meta": meta, "tensors": entries}, b"".join(payloads), extras or {}, zstd_level)

# The header's length in the prefix is padded to a multiple of this: the prefix comes first, and zstd-22 in one
# call re-decides the whole file when its first bytes change (a trained-like 2-layer state grew by 62,396
# bytes when the builder added 183 bytes of hint knobs and the prefix's length moved with them; with the length
# padded, by 239-243 bytes on seeds 0-2, 2026-12-07, tests/test_causal_hints.py). The spaces compress to a few bytes.
HEADER_PAD_BYTES = 1 << 16

def assemble_artifact(header: dict, body: bytes, extras: dict[str, bytes], zstd_level: int) -> bytes:
    """Prefix, body, the named byte strings `extras` (replacing any of the same name) after the
    tensors, then the JSON header (padded with spaces), compressed."""
    import zstandard
    tensors = [e for e in header["tensors"] if e["name"] not in extras]
    offset = max((e["offset"] + e["nbytes"] for e in tensors), default=0)
    body = bytes(body[:offset])  # without the bytes of replaced extras
    for key, data in extras.items():
        tensors.append({"name": key, "role": "extra", "offset": offset, "nbytes": len(data)})
        offset += len(data)
    text = json.dumps({**header, "tensors": tensors}, sort_keys=True).encode()
    text += b" " * (-len(text) % HEADER_PAD_BYTES)  # JSON ends in spaces as well as without them
    raw = ARTIFACT_PREFIX.pack(ARTIFACT_MAGIC, ARTIFACT_VERSION, len(text)) + body + b"".join(extras.values()) + text
    return zstandard.ZstdCompressor(level=zstd_level, write_checksum=True).compress(raw)

def artifact_parts(blob: bytes, source: str) -> tuple[dict, memoryview]:
    """(header, body) of an artifact file's bytes, or a one-line error naming `source`."""
    import zstandard
    fix = "re-export it with train_gpt.py or copy it again"
    try:
        raw = zstandard.ZstdDecompressor().decompress(blob, max_output_size=1 << 34)
    except zstandard.ZstdError as e:
        raise InputError(f"{source}: not a readable int6+zstd artifact ({e}); {fix}") from None
    if len(raw) < ARTIFACT_PREFIX.size or raw[:4] != ARTIFACT_MAGIC:
        raise InputError(f"{source}: not a train_gpt.py artifact (bad magic); {fix}")
    _, version, header_len = ARTIFACT_PREFIX.unpack_from(raw)
    if version not in READABLE_ARTIFACT_VERSIONS:
        raise InputError(f"{source}: artifact version {version} is not supported (this reader reads "
                         f"{', '.join(map(str, READABLE_ARTIFACT_VERSIONS))}); {fix}")
    start = ARTIFACT_PREFIX.size
    header_at, body_at = (start, start + header_len) if version == 2 else (len(raw) - header_len, start)
    body_end = len(raw) if version == 2 else header_at
    try:
        if header_len > len(raw) - start:
            raise ValueError(header_len)
        header = json.loads(raw[header_at : header_at + header_len])
    except ValueError:
        raise InputError(f"{source}: the artifact header is corrupted; {fix}") from None
    body = memoryview(raw)[body_at:body_end]
    for e in header["tensors"]:
        if e["offset"] + e["nbytes"] > len(body):
            raise InputError(f"{source}: the artifact is truncated inside {e['name']}; {fix}")
        if e["role"] != "extra" and math.prod(e["shape"]) * getattr(torch, e["dtype"]).itemsize != e["nbytes"]:
            raise InputError(f"{source}: the {e['role']} entry of {e['name']} has shape {e['shape']}, which its "
                             f"{e['nbytes']} bytes do not hold; {fix}")
    return header, body

def unpack(blob: bytes, source: str) -> tuple[dict[str, Tensor], dict, dict[str, bytes]]:
    """(dequantized float32 weights with their low-rank corrections added, the header's meta, the extras)."""
    if is_grouped(blob):
        meta, chunks = grouped_parts(blob, source)
    else:
        header, body = artifact_parts(blob, source)
        meta, chunks = header["meta"], [(e, body[e["offset"] : e["offset"] + e["nbytes"]]) for e in header["tensors"]]
    arrays, extras, scales, corrections = {}, {}, {}, {}
    for e, chunk in chunks:
        if e["role"] == "extra":
            extras[e["name"]] = bytes(chunk)
            continue
        dtype = getattr(torch, e["dtype"])  # an empty tensor (a 1-layer model's skip_weights) has no buffer
        t = torch.frombuffer(bytearray(chunk), dtype=dtype) if len(chunk) else torch.empty(0, dtype=dtype)
        t = t.reshape(e["shape"][::-1]).T if e.get("transposed") else t.reshape(e["shape"])
        if e["role"].startswith("lqer_"):
            corrections.setdefault(e["name"], {})[e["role"]] = t
        else:
            (scales if e["role"] == "int_scales" else arrays)[e["name"]] = t
    state = {n: dequantize_rows(t, scales[n]) if n in scales else t.float() for n, t in arrays.items()}
    for n, entries in corrections.items():
        correction, problem = read_correction(entries, tuple(arrays[n].shape) if n in scales else None)
        if problem:
            raise InputError(f"{source}: the low-rank correction of {n} is damaged ({problem}); re-export it "
                             "with train_gpt.py or copy it again")
        state[n] += correction.delta()
    return state, meta, extras

# ----------------------------------------------------------------------------------------------
# Version 4: one compressed stream per group
#     prefix (magic, 4, header length) | header: zstd(JSON) | the groups' streams, in the header's order
# Each group names its codec, its compressed and raw lengths and its entries (offsets in its raw bytes; a
# transposed entry holds its matrix's transpose, rows of the stored matrix one after another). The codecs'
# own checks (zstd's checksum, xz's CRC64) catch a damaged stream; the reader refuses it in one line.

def zstd_compress(data: bytes, level: int) -> bytes:
    import zstandard
    return zstandard.ZstdCompressor(level=level, write_checksum=True).compress(data)

def zstd_decompress(data: bytes, size: int) -> bytes:
    import zstandard
    return zstandard.ZstdDecompressor().decompress(data, max_output_size=size)

def lzma_compress(data: bytes, level: int) -> bytes:
    import lzma
    return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=9 | lzma.PRESET_EXTREME)

def lzma_decompress(data: bytes, size: int) -> bytes:
    import lzma
    return lzma.decompress(data, format=lzma.FORMAT_XZ)

# tag -> (compress(data, zstd level), decompress(data, raw size)): zstandard (a requirement) and the standard
# library's lzma (xz, preset 9e): what every evaluation can rely on (brotli is not installed: docs/export.md)
CODECS = {"zstd": (zstd_compress, zstd_decompress), "lzma": (lzma_compress, lzma_decompress)}
# on the block matrices' integers zstd-22 beat xz -9e by 1-2% (docs/export.md), and xz on the frontier shape's
# 36.5 M integers took 15 minutes on the shared test machine: xz is tried on the smaller groups only
LZMA_MAX_RAW = 1 << 21

def is_grouped(blob: bytes) -> bool:
    return blob[:4] == ARTIFACT_MAGIC and len(blob) >= ARTIFACT_PREFIX.size and \
        ARTIFACT_PREFIX.unpack_from(blob)[1] == GROUPED_VERSION

def stored_bytes(t: Tensor, transposed: bool) -> bytes:
    return (t.T if transposed else t).contiguous().cpu().numpy().tobytes()

def compress_best(data: bytes, codecs: tuple[str, ...], zstd_level: int) -> tuple[str, bytes]:
    """(codec tag, stream): the smallest of `codecs` on data, measured."""
    return min(((c, CODECS[c][0](data, zstd_level)) for c in codecs), key=lambda pair: len(pair[1]))

def storage_group(name: str, role: str) -> str:
    return weight_group(name) if role == "int_values" else "scales" if role == "int_scales" else \
        "extras" if role == "extra" else "lqer" if role.startswith("lqer_") else "float"

POOL_MAX_WORKERS = 16  # each job holds a group's tensors (on the export's device too): a 200-core host runs 16

def pool_workers() -> int:
    """Threads for compressing groups and candidates: one a core this process may run on, at most POOL_MAX_WORKERS."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, POOL_MAX_WORKERS))

def grouped_artifact(state: dict[str, Tensor], meta: dict, quantized: dict[str, Quantized],
                     extras: dict[str, bytes] | None = None, zstd_level: int = 22,
                     codecs: tuple[str, ...] = tuple(CODECS), orientation: str = "auto",
                     lzma_max_raw: int = LZMA_MAX_RAW) -> tuple[bytes, list[dict]]:
    """The version 4 artifact of `state` as `quantized` says, and its groups (name, codec, bytes, orientation).
    orientation: auto (each integer group transposed where its measured stream is smaller), plain, transposed.
    xz is tried only on groups of at most lzma_max_raw bytes (its preset 9e runs at about 1 MB/s)."""
    groups: dict[str, list] = {}
    for name, role, t, bits in stored_tensors(state, quantized):
        groups.setdefault(storage_group(name, role), []).append((name, role, t, bits))
    for name, data in (extras or {}).items():
        groups.setdefault("extras", []).append((name, "extra", data, 0))
    def pack(group: str, members: list) -> tuple[dict, bytes]:
        choices = (False, True) if orientation == "auto" and members[0][1] == "int_values" else \
            (orientation == "transposed" and members[0][1] == "int_values",)
        best = None
        for transposed in choices:
            entries, parts, offset = [], [], 0
            for name, role, t, bits in members:
                data = t if role == "extra" else stored_bytes(t, transposed and t.ndim == 2)
                entry = {"name": name, "role": role, "offset": offset, "nbytes": len(data)}
                if role != "extra":
                    entry.update(dtype=str(t.dtype).removeprefix("torch."), bits=bits, shape=list(t.shape),
                                 transposed=transposed and t.ndim == 2)
                entries.append(entry)
                parts.append(data)
                offset += len(data)
            raw = b"".join(parts)
            allowed = tuple(c for c in codecs if c != "lzma" or len(raw) <= lzma_max_raw) or codecs[:1]
            codec, stream = compress_best(raw, allowed, zstd_level)
            if best is None or len(stream) < len(best[1]):
                best = (codec, stream, entries, len(raw), transposed)
        codec, stream, entries, raw_nbytes, transposed = best
        return {"name": group, "codec": codec, "nbytes": len(stream), "raw_nbytes": raw_nbytes,
                "transposed": transposed, "entries": entries}, stream
    # the groups compress in threads (zstd and lzma release the GIL); the file's order is the groups' order
    with ThreadPoolExecutor(min(len(groups), pool_workers()) or 1) as pool:
        packed = list(pool.map(lambda item: pack(*item), groups.items()))
    described, streams = [d for d, _ in packed], [stream for _, stream in packed]
    text = zstd_compress(json.dumps({"meta": meta, "groups": described}, sort_keys=True).encode(), 22)
    blob = ARTIFACT_PREFIX.pack(ARTIFACT_MAGIC, GROUPED_VERSION, len(text)) + text + b"".join(streams)
    return blob, [{k: g[k] for k in ("name", "codec", "nbytes", "raw_nbytes", "transposed")} for g in described]

def grouped_header(blob: bytes, source: str) -> tuple[dict, int]:
    """(the JSON header of a version 4 artifact, where its first stream starts), or a one-line error."""
    fix = "re-export it with train_gpt.py or copy it again"
    _, _, header_len = ARTIFACT_PREFIX.unpack_from(blob)
    start = ARTIFACT_PREFIX.size
    try:
        if header_len > len(blob) - start:
            raise ValueError(header_len)
        header = json.loads(zstd_decompress(blob[start : start + header_len], 1 << 26))
        groups = header["groups"]
    except Exception:  # noqa: BLE001 -- any damage to the header is the same one line
        raise InputError(f"{source}: the artifact header is corrupted; {fix}") from None
    return header, start + header_len

def grouped_parts(blob: bytes, source: str) -> tuple[dict, list[tuple[dict, memoryview]]]:
    """(meta, [(entry, its bytes)]) of a version 4 artifact; any damaged group or tag refused in one line."""
    fix = "re-export it with train_gpt.py or copy it again"
    header, at = grouped_header(blob, source)
    chunks = []
    for g in header["groups"]:
        if g.get("codec") not in CODECS:
            raise InputError(f"{source}: group {g.get('name')} names compressor {g.get('codec')!r}, which this "
                             f"reader does not know ({', '.join(CODECS)}); {fix}")
        stream = blob[at : at + g["nbytes"]]
        at += g["nbytes"]
        try:
            if len(stream) != g["nbytes"]:
                raise ValueError("truncated")
            raw = CODECS[g["codec"]][1](stream, g["raw_nbytes"])
            if len(raw) != g["raw_nbytes"]:
                raise ValueError("length")
        except Exception:  # noqa: BLE001 -- zstd, xz and length errors alike
            raise InputError(f"{source}: the artifact's group {g['name']} is damaged or truncated; {fix}") from None
        body = memoryview(raw)
        for e in g["entries"]:
            if e["offset"] + e["nbytes"] > len(body) or (e["role"] != "extra" and math.prod(e["shape"]) * getattr(
                    torch, e["dtype"]).itemsize != e["nbytes"]):
                raise InputError(f"{source}: the {e['role']} entry of {e['name']} does not fit its group's bytes; {fix}")
            chunks.append((e, body[e["offset"] : e["offset"] + e["nbytes"]]))
    if at != len(blob):
        raise InputError(f"{source}: the artifact has {len(blob) - at} bytes its header does not name; {fix}")
    return header["meta"], chunks

def replace_extras(blob: bytes, extras: dict[str, bytes], source: str, zstd_level: int = 22) -> bytes:
    """A copy of an artifact (any readable version) with the named byte strings `extras` inside (replacing any
    of the same name); the weights' bytes are untouched."""
    if not is_grouped(blob):
        header, body = artifact_parts(blob, source)
        return assemble_artifact(header, bytes(body), extras, zstd_level)
    header, at = grouped_header(blob, source)
    groups, streams = [], []
    for g in header["groups"]:
        stream = blob[at : at + g["nbytes"]]
        at += g["nbytes"]
        if g["name"] == "extras":
            old = {e["name"]: bytes(c) for e, c in grouped_parts(blob, source)[1] if e["role"] == "extra"}
            extras = {**{k: v for k, v in old.items() if k not in extras}, **extras}
            continue
        groups.append(g)
        streams.append(stream)
    if extras:
        entries, offset = [], 0
        for name, data in extras.items():
            entries.append({"name": name, "role": "extra", "offset": offset, "nbytes": len(data)})
            offset += len(data)
        raw = b"".join(extras.values())
        stream = zstd_compress(raw, zstd_level)
        groups.append({"name": "extras", "codec": "zstd", "nbytes": len(stream), "raw_nbytes": len(raw),
                       "transposed": False, "entries": entries})
        streams.append(stream)
    text = zstd_compress(json.dumps({**header, "groups": groups}, sort_keys=True).encode(), 22)
    return ARTIFACT_PREFIX.pack(ARTIFACT_MAGIC, GROUPED_VERSION, len(text)) + text + b"".join(streams)
