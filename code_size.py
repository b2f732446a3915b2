"""
code_size.py: what the 16,000,000-byte cap counts of the code (SPEC section 8: every byte the
evaluation runs), and how a record ships it.

One table says which scripts each kind of evaluation imports and which extras it reads from the
artifact; the export's ladder (train_gpt.py), eval_final.py's artifact_total, make_record and
gpu_check all ask counted_code, so the export fits the cap for the evaluation the record will run
(EXPORT_FOR_EVAL; legal, the largest, by default). A record may ship its code compressed, as the
public records do (one packed 78,688 bytes of code into 23,095): code_bundle writes one self-
extracting script holding the evaluation's scripts byte for byte (SHIP_CODE=bundle, the default).

Imports nothing of the project, so train_gpt.py can import it; its bytes count with the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


# Every evaluation imports these: the trainer (model, data, scoring), its quantizer, this file, the table's codec.
EVALUATION_BASE = ("train_gpt.py", "token_data.py", "allocation.py", "artifact.py", "quantize.py", "code_size.py", "run_files.py", "eval_final.py",
                   "correction_table.py")
EVALUATION_CODE = {
    "base": EVALUATION_BASE,
    "ttt": EVALUATION_BASE + ("score_first_ttt.py", "phased_ttt.py"),  # TTT_MODE=phased imports phased_ttt.py
    "hints": EVALUATION_BASE + ("causal_hints.py",),
    "legal": EVALUATION_BASE + ("score_first_ttt.py", "phased_ttt.py", "causal_hints.py"),
}
# The causal hint knobs ride in the artifact (7 + 11 bytes an order, at most 16 orders: 183 bytes), added
# by the builder after the export, which re-compresses the file with one more header entry: the file grew
# by 241-446 bytes for a 183-byte blob in a review's measurement (zstd-22, six model states). The export
# keeps 1,024 bytes of room.
HINT_KNOBS_RESERVE_BYTES = 1024
EVALUATION_RESERVE_BYTES = {"base": 0, "ttt": 0, "hints": HINT_KNOBS_RESERVE_BYTES, "legal": HINT_KNOBS_RESERVE_BYTES}
SHIP_CODE = ("bundle", "raw")  # how a record ships its counted code (SHIP_CODE)
BUNDLE_NAME = "code_bundle.py"

# The bundle: the scripts' bytes one after another, xz-compressed and base85-encoded, with their names and
# sizes; run, it unpacks them into a temporary folder and runs the one named. make_record writes it.
BUNDLE_SCRIPT = '''"""The code this record counts: NAMES, xz-compressed.
Run any of them as you would run it alone: python code_bundle.py eval_final.py (or under torchrun).
code_size.code_bundle wrote this file; the readable scripts beside it are the same bytes."""
import atexit, base64, lzma, os, runpy, shutil, sys, tempfile
SIZES = INDEX
data = lzma.decompress(base64.b85decode("PAYLOAD"))
folder = tempfile.mkdtemp(prefix="code_bundle_")
atexit.register(shutil.rmtree, folder, True)
offset = 0
for name, size in SIZES:
    with open(os.path.join(folder, name), "wb") as f:
        f.write(data[offset : offset + size])
    offset += size
if len(sys.argv) < 2 or sys.argv[1] not in dict(SIZES):
    sys.exit(f"usage: python {sys.argv[0]} SCRIPT [ARGS], SCRIPT one of: {', '.join(n for n, _ in SIZES)}")
sys.path.insert(0, folder)
sys.argv = [os.path.join(folder, sys.argv[1])] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''

def code_bundle(scripts: dict[str, bytes]) -> bytes:
    """The self-extracting script carrying `scripts` (name -> bytes, in that order): deterministic, so
    the same scripts always count the same bytes."""
    import base64
    import lzma
    payload = base64.b85encode(lzma.compress(b"".join(scripts.values()), preset=9 | lzma.PRESET_EXTREME))
    index = repr([(name, len(data)) for name, data in scripts.items()])
    text = BUNDLE_SCRIPT.replace("NAMES", ", ".join(scripts)).replace("INDEX", index)
    return text.replace("PAYLOAD", payload.decode()).encode()

def code_bytes(*paths: Path | str) -> int:
    return sum(Path(p).stat().st_size for p in paths)

@dataclass(frozen=True)
class CountedCode:
    evaluation: str  # a key of EVALUATION_CODE
    ship: str  # SHIP_CODE: bundle or raw
    paths: tuple[Path, ...]
    raw_bytes: int  # the scripts, byte for byte
    bundle_bytes: int  # the same scripts as one self-extracting script (code_bundle)
    reserve_bytes: int  # room kept for extras added to the artifact after the export (the hint knobs)
    @property
    def code_bytes(self) -> int:
        """What the cap counts for the code, as the record ships it."""
        return self.bundle_bytes if self.ship == "bundle" else self.raw_bytes
    def log_fields(self) -> str:
        return (f"counted_for:{self.evaluation} shipped_as:{self.ship} counted_code_bytes:{self.code_bytes} "
                f"raw_code_bytes:{self.raw_bytes} bundle_code_bytes:{self.bundle_bytes} reserve_bytes:{self.reserve_bytes}")

def counted_code(evaluation: str, ship: str = "bundle") -> CountedCode:
    here = Path(__file__).resolve().parent
    paths = tuple(here / name for name in EVALUATION_CODE[evaluation])
    bundle = code_bundle({p.name: p.read_bytes() for p in paths})
    return CountedCode(evaluation, ship, paths, code_bytes(*paths), len(bundle), EVALUATION_RESERVE_BYTES[evaluation])
