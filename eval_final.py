"""
eval_final.py: score an int6 + zstd artifact on the validation stream with sliding windows and,
when asked, with the error-correction table applied.

    CHECKPOINT=final_model.int6.ptz python eval_final.py                      # the model's own score
    CHECKPOINT=final_model.int6.ptz USE_CORRECTION=1 python eval_final.py     # + table built inline
    CHECKPOINT=… CORRECTION_TABLE=final_model.int6.ctab python eval_final.py  # + a prebuilt table
    torchrun --standalone --nproc_per_node=8 eval_final.py                    # the same on 8 ranks

An artifact that carries a table applies it without asking. The base score always comes first;
the corrected score is labelled val-derived, and the two-part figure (corrected bits plus the
table's own bits, per byte) says what the table really buys. Settings: EvalSettings in
build_correction_table.py.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import train_gpt
from build_correction_table import (CORRECTION_TABLE_EXTRA, LN2, EvalSettings, ScoredValidation, boosted_losses,
                                    build_table_bytes, code_paths, decode_table, load_for_scoring)
from train_gpt import ARTIFACT_CAP_BYTES, InputError


def windows_scoring(positions: np.ndarray, num_targets: int, seq_len: int, stride: int) -> np.ndarray:
    """Indices of the windows that score the given target positions (each is scored by one window)."""
    starts, scored_from, _ = train_gpt.window_plan(num_targets, seq_len, stride)
    return np.unique(np.searchsorted(starts + scored_from, positions, side="right") - 1)


def table_token_logprobs(scored: ScoredValidation, table, position_losses: np.ndarray,
                         logprobs: np.ndarray | None) -> np.ndarray:
    """log p(table token) at each table position.

    Gathered in the scoring pass when the table was known before it. For a table built from that
    pass, an entry whose token is the one that followed reuses the pass's -loss; any other token
    (none, when the codec is sound) has its windows scored again. Either way the boost goes to the
    table's token, whatever the text says.
    """
    if logprobs is not None:
        return logprobs[table.positions]
    result = -position_losses[table.positions].astype(np.float64)
    other = table.tokens != scored.targets[table.positions]
    if other.any():
        stride = scored.settings.eval_stride
        windows = windows_scoring(table.positions[other], position_losses.size, scored.seq_len, stride)
        wanted = torch.full((position_losses.size,), -1, dtype=torch.int32)
        wanted[torch.from_numpy(table.positions[other])] = torch.from_numpy(table.tokens[other]).int()
        rescored = scored.evaluate(token_of_interest=wanted, window_subset=windows)
        result[other] = rescored.position_token_logprobs.numpy()[table.positions[other]]
    return result


def apply_correction(scored: ScoredValidation, base: train_gpt.EvalResult, table_blob: bytes | None, table,
                     table_source: str, table_path: Path | None):
    """The corrected loss sum in nats, with the table used. Without a table, one is built from this
    pass's losses, written, and read back from its bytes like any other table."""
    s = scored.settings
    losses = base.position_losses.numpy()
    if table is None:
        table_blob = build_table_bytes(scored, losses)
        if not table_blob:
            return float(losses.sum()), b"", None, ""
        if scored.runtime.is_main:
            train_gpt.atomic_write_bytes(table_path, table_blob)
        table_source = str(table_path)
        table = decode_table(table_blob, source=table_source)
    gathered = None if base.position_token_logprobs is None else base.position_token_logprobs.numpy()
    logprobs = table_token_logprobs(scored, table, losses, gathered)
    corrected = losses.astype(np.float64)
    corrected[table.positions] = boosted_losses(losses[table.positions], logprobs,
                                                table.tokens == scored.targets[table.positions], s.correction_boost)
    return float(corrected.sum()), table_blob, table, table_source


def log_path_for(checkpoint: str) -> Path:
    """logs/ beside the checkpoint or, where that cannot be written (a read-only folder), in the
    working directory or the temporary folder: an evaluation never fails for its log."""
    for folder in (Path(checkpoint).parent, Path.cwd(), Path(tempfile.gettempdir())):
        try:
            train_gpt.check_writable(folder / "logs", "")
            return folder / "logs" / f"eval_{Path(checkpoint).stem}.txt"
        except InputError:
            continue
    raise InputError(f"CHECKPOINT={checkpoint}: no folder to write the evaluation log in; run it from a writable one")


def main() -> None:
    s = EvalSettings.from_env()
    building = s.use_correction and not s.correction_table
    table_path, table_note = s.choose_table_path() if building else (None, "")
    scored = load_for_scoring(s)
    rt = scored.runtime
    log_path = log_path_for(s.checkpoint)
    say = train_gpt.Logger(log_path if rt.is_main else None)
    if log_path.parent.parent != Path(s.checkpoint).parent:
        say(f"note: {Path(s.checkpoint).parent} cannot be written; this log is {log_path}")
    meta = scored.artifact.meta
    say(f"{train_gpt.library_versions()} world_size:{rt.world_size} device:{rt.device}")
    say(s.log_line() + f" seed:{meta.get('seed')} run_id:{meta.get('run_id')} seq_len:{scored.seq_len}")
    identity = dict(scored.data_identity)
    say("data " + " ".join(f"{k}:{v}" for k, v in identity.items()) + ("" if "data" in meta else
        " trained_data:unrecorded"))
    if identity["manifest"] == "none":
        say(f"warning: {Path(s.data_path) / train_gpt.MANIFEST_NAME} is missing, so the tokenizer and the shards "
            "are not checked against each other")

    # Which table, if any: a file named by CORRECTION_TABLE, one the artifact carries, or one built here.
    table_blob, table_source = None, ""
    if s.correction_table:
        path = Path(s.correction_table)
        if not path.is_file():
            raise InputError(f"CORRECTION_TABLE={path}: no such file; build one with build_correction_table.py "
                             "or unset CORRECTION_TABLE")
        table_blob, table_source = path.read_bytes(), str(path)
    elif CORRECTION_TABLE_EXTRA in scored.artifact.extras:
        table_blob, table_source = scored.artifact.extras[CORRECTION_TABLE_EXTRA], f"{s.checkpoint} (carried)"
    n_targets = scored.tokens.numel() - 1
    table, wanted = None, None
    if table_blob is not None:
        table = decode_table(table_blob, source=table_source, expect_vocab_size=scored.artifact.model_config.vocab_size,
                             expect_val_length=n_targets, expect_fingerprint=scored.fingerprint)
        wanted = torch.full((n_targets,), -1, dtype=torch.int32)
        wanted[torch.from_numpy(table.positions)] = torch.from_numpy(table.tokens).int()

    correcting = table is not None or s.use_correction
    t0 = time.perf_counter()
    base = scored.evaluate(keep_positions=correcting, token_of_interest=wanted)
    eval_ms = 1000 * (time.perf_counter() - t0)
    say(f"eval_base val_loss:{base.val_loss:.8f} val_bpb:{base.val_bpb:.8f} eval_time:{eval_ms:.0f}ms "
        f"stride:{s.eval_stride} tokens:{base.token_count} bytes:{base.byte_count}")
    code = train_gpt.code_bytes(*code_paths())
    if not correcting:
        total = code + scored.model_bytes
        say(f"artifact_total code_bytes:{code} model_bytes:{scored.model_bytes} table_bytes:0 total_bytes:{total} "
            f"cap_bytes:{ARTIFACT_CAP_BYTES}")
        return

    t0 = time.perf_counter()
    corrected_nats, table_blob, table, table_source = apply_correction(scored, base, table_blob, table, table_source,
                                                                       table_path)
    if table is None:
        say(f"correction entries:0 (select:{s.correction_select}: no entry fits the budget or pays for "
            "itself; no table written; the base score stands)")
        return
    table_ms = 1000 * (time.perf_counter() - t0)
    table_bytes = len(table_blob)
    carried = table_source.endswith("(carried)")
    say(f"correction source:{table_source} entries:{table.positions.size} table_bytes:{table_bytes} "
        f"bytes_per_entry:{table_bytes / max(table.positions.size, 1):.3f} format:{table.fmt} "
        f"select:{s.correction_select} boost:{s.correction_boost} time:{table_ms:.0f}ms"
        + (f" {table_note}" if table_path is not None and table_source == str(table_path) else ""))
    say(f"eval_corrected_valderived val_loss:{corrected_nats / base.token_count:.8f} "
        f"val_bpb:{corrected_nats / LN2 / base.byte_count:.8f} (val-derived: the table was made from validation text)")
    two_part = (corrected_nats / LN2 + 8 * table_bytes) / base.byte_count
    say(f"eval_two_part val_bpb:{two_part:.8f} (corrected bits + 8 x table bytes, per validation byte; "
        f"base {base.val_bpb:.8f})")
    total = code + scored.model_bytes + table_bytes  # a carried table is in the file: counted once
    say(f"artifact_total code_bytes:{code} model_bytes:{scored.model_bytes} table_bytes:{table_bytes} "
        f"total_bytes:{total} cap_bytes:{ARTIFACT_CAP_BYTES} headroom_bytes:{ARTIFACT_CAP_BYTES - total}"
        + (" carried_in_checkpoint" if carried else "") + ("" if total <= ARTIFACT_CAP_BYTES else " OVER_CAP"))


if __name__ == "__main__":
    train_gpt.run_main(main, "eval_final.py")
