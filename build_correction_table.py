"""
build_correction_table.py: the standalone builder of the error-correction table (SPEC section 9).

    CHECKPOINT=final_model.int6.ptz python build_correction_table.py                # table file beside it
    CHECKPOINT=final_model.int6.ptz CORRECTION_EMBED=1 python build_correction_table.py   # inside a copy

The table lists validation positions where the model does worst, each with the correct token;
at evaluation the table's token gets a large logit boost there. It is derived from validation
text, which the challenge's rules forbid in a record: every figure it produces is labelled
val-derived and printed beside the model's own score and the two-part cost of the table.

One scoring pass (eval_final.py's), the selection and the bytes (correction_table.py's), then the
file: this script adds only where the table goes. eval_final.py with USE_CORRECTION=1 builds the
same table inline and applies it. Settings: eval_final.EvalSettings.
"""

from __future__ import annotations

import time
from pathlib import Path

import train_gpt
from train_gpt import log_value
from correction_table import TABLE_EXTRA_NAME, CorrectionTableError, decode_table
from eval_final import EvalSettings, build_table_bytes, load_for_scoring, no_table_line


def add_artifact_extras(blob: bytes, extras: dict[str, bytes], source: str, zstd_level: int = 22) -> bytes:
    """A copy of the artifact with more named byte strings inside; the weights' bytes are untouched."""
    train_gpt.unpack_artifact(blob, source)  # refuses anything that is not a sound artifact
    header, body = train_gpt.artifact_parts(blob, source)
    return train_gpt.assemble_artifact(header, bytes(body), extras, zstd_level)


def main() -> None:
    s = EvalSettings.from_env(scope="build")  # the seed's builder names (SEED_SETTINGS)
    table_path, table_note = s.choose_table_path()
    scored = load_for_scoring(s)
    rt = scored.runtime
    say = print if rt.is_main else (lambda *a, **k: None)
    for line in (s.log_line(), *s.seed_notes):
        say(line)
    t0 = time.perf_counter()
    result = scored.evaluate(keep_positions=True)
    say(f"scoring_pass val_loss:{result.val_loss:.8f} val_bpb:{result.val_bpb:.8f} "
        f"eval_time:{1000 * (time.perf_counter() - t0):.0f}ms")
    blob = build_table_bytes(scored, result.position_losses.numpy())
    if not rt.is_main:
        return
    if not blob:
        say(no_table_line(s))
        return
    table = decode_table(blob, source="the table just built")
    train_gpt.atomic_write_bytes(table_path, blob)
    say(f"correction entries:{table.positions.size} table_bytes:{len(blob)} "
        f"bytes_per_entry:{len(blob) / table.positions.size:.3f} format:{table.fmt} select:{s.correction_select} "
        f"path:{log_value(table_path)} written:{log_value(table_note)}")
    if s.correction_embed:
        path = Path(s.checkpoint)
        copy_path = path.with_name(path.name.removesuffix(".ptz") + ".with_table.ptz")
        carried = add_artifact_extras(path.read_bytes(), {TABLE_EXTRA_NAME: blob}, str(path))
        train_gpt.atomic_write_bytes(copy_path, carried)
        say(f"artifact_with_table path:{log_value(copy_path)} bytes:{len(carried)}")


if __name__ == "__main__":
    train_gpt.run_main(main, "build_correction_table.py", CorrectionTableError)
