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
import struct

import torch
from torch import Tensor

from quantize import EXPORT_LADDER, ExportRung, Quantized, dequantize_rows, quantize_state, read_correction, \
    stored_tensors, tensor_bits
from run_files import InputError

ARTIFACT_MAGIC = b"PGI6"
# 2: each integer tensor records its bit width; 3: low-rank corrections (roles lqer_a, lqer_b), and the JSON
# header after the tensors, so the tensors always start at byte 12: zstd-22's size for the same tensors moved
# by up to 3% with the header's length when the header came first (measured), and adding the hint knobs (one
# more header entry) could then grow the file by tens of kilobytes.
ARTIFACT_VERSION = 3
READABLE_ARTIFACT_VERSIONS = (2, 3)  # a version 2 file is a version 3 file without corrections
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

def assemble_artifact(header: dict, body: bytes, extras: dict[str, bytes], zstd_level: int) -> bytes:
    """Prefix, body, the named byte strings `extras` (replacing any of the same name) after the
    tensors, then the JSON header, compressed."""
    import zstandard
    tensors = [e for e in header["tensors"] if e["name"] not in extras]
    offset = max((e["offset"] + e["nbytes"] for e in tensors), default=0)
    body = bytes(body[:offset])  # without the bytes of replaced extras
    for key, data in extras.items():
        tensors.append({"name": key, "role": "extra", "offset": offset, "nbytes": len(data)})
        offset += len(data)
    text = json.dumps({**header, "tensors": tensors}, sort_keys=True).encode()
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
    header, body = artifact_parts(blob, source)
    arrays, extras, scales, corrections = {}, {}, {}, {}
    for e in header["tensors"]:
        chunk = body[e["offset"] : e["offset"] + e["nbytes"]]
        if e["role"] == "extra":
            extras[e["name"]] = bytes(chunk)
            continue
        t = torch.frombuffer(bytearray(chunk), dtype=getattr(torch, e["dtype"])).reshape(e["shape"])
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
    return state, header["meta"], extras
