"""
build_correction_table.py: the standalone builder of the error-correction table (SPEC section 9), and
of the legal causal hint cache's knobs.

    CHECKPOINT=final_model.int6.ptz python build_correction_table.py                # table file beside it
    CHECKPOINT=final_model.int6.ptz CORRECTION_EMBED=1 python build_correction_table.py   # inside a copy
    CHECKPOINT=final_model.int6.ptz CORRECTION_MODE=causal python build_correction_table.py
        # hint knobs chosen on training text, in a copy: final_model.int6.with_hints.ptz

The table lists validation positions where the model does worst, each with the correct token;
at evaluation the table's token gets a large logit boost there. It is derived from validation
text, which the challenge's rules forbid in a record: every figure it produces is labelled
val-derived and printed beside the model's own score and the two-part cost of the table.

One scoring pass (eval_final.py's), the selection and the bytes (correction_table.py's), then the
file: this script adds only where the table goes. eval_final.py with USE_CORRECTION=1 builds the
same table inline and applies it. Settings: eval_final.EvalSettings.

CORRECTION_MODE=causal reads no validation token. The causal hint cache's knobs (its context orders,
table size and beta's coefficients: causal_hints.HintKnobs) are chosen on the last HINT_TRAIN_TOKENS
tokens of the last training shard: the model scores that slice once, at EVAL_STRIDE, gathering
log p(target) and log p(hint) for every candidate order; causal_hints.search_knobs picks the
backoff ladder by 2-fold held-out tilted loss and fits beta by logistic regression. The knobs (a
few tens of bytes) go into a copy of the artifact, where eval_final.py finds and counts them.
On FineWeb a 10-minute run never reaches the last shard's end; a run that loops over its training
data (the demo's) has seen the slice, which makes the model look surer there than on new text.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import numpy as np
import torch

import causal_hints
import train_gpt
from train_gpt import log_value
from correction_table import TABLE_EXTRA_NAME, CorrectionTableError, decode_table
from eval_final import (HINTS_EXTRA_NAME, EvalSettings, build_table_bytes, eval_context, load_for_scoring, load_model,
                        no_table_line)


def add_artifact_extras(blob: bytes, extras: dict[str, bytes], source: str, zstd_level: int = 22) -> bytes:
    """A copy of the artifact with more named byte strings inside; the weights' bytes are untouched."""
    train_gpt.unpack_artifact(blob, source)  # refuses anything that is not a sound artifact
    return train_gpt.replace_extras(blob, extras, source, zstd_level)  # any readable version


def artifact_copy(s: EvalSettings, copy_path: Path, extras: dict[str, bytes]) -> Path:
    """A copy of the checkpoint at copy_path (copy_path_for), carrying extras beside what it carried."""
    path = Path(s.checkpoint)
    train_gpt.atomic_write_bytes(copy_path, add_artifact_extras(path.read_bytes(), extras, str(path)))
    return copy_path


def training_slice(s: EvalSettings, vocab_size: int, window: int, setting: str = "hint_train_tokens"
                   ) -> tuple[Path, torch.Tensor]:
    """The last tokens of the last training shard (never a validation shard): `setting` (HINT_TRAIN_TOKENS, or
    build_ttt_settings.py's CALIBRATE_TTT_TOKENS) targets, trimmed to whole windows so that standard windows
    (EVAL_STRIDE=0) score every one of them."""
    shard = train_gpt.list_shards(s.data_path, "train")[-1]
    stream = train_gpt.load_data_shard(shard, vocab_size)
    count, name = getattr(s, setting), setting.upper()
    targets = max(count, 0) // window * window
    if s.eval_seq_len and window >= stream.size:
        raise train_gpt.InputError(f"EVAL_SEQ_LEN={s.eval_seq_len} is longer than the training shard {shard} "
                                   f"({stream.size} tokens) the knobs are chosen on; set EVAL_SEQ_LEN below "
                                   f"{stream.size}, or 0 for the training length")
    if s.eval_seq_len and targets == 0 and count > 0:
        raise train_gpt.InputError(f"EVAL_SEQ_LEN={s.eval_seq_len} is longer than the {name}={count} slice the "
                                   f"settings are chosen on; set {name} between {window} and {stream.size - 1}, or "
                                   "EVAL_SEQ_LEN lower")
    if stream.size <= count or targets == 0:
        raise train_gpt.InputError(f"{name}={count}: {shard} holds {stream.size} tokens and a window is {window}; "
                                   f"set {name} between {window} and {stream.size - 1}")
    return shard, torch.from_numpy(np.asarray(stream[-(targets + 1):], dtype=np.int64))


def copy_path_for(s: EvalSettings, suffix: str) -> tuple[Path, str]:
    """final_model.int6<suffix>.ptz beside the checkpoint, or the first free <suffix>.1.ptz, .2.ptz, ...: an earlier
    copy (an earlier search's choice) is kept, as an earlier table is (choose_table_path); with the note the log
    gives it. Its folder is probed for writing before any work."""
    path = Path(s.checkpoint)
    stem = path.name.removesuffix(".ptz") + suffix
    names = itertools.chain([f"{stem}.ptz"], (f"{stem}.{n}.ptz" for n in itertools.count(1)))
    copy_path = next(p for p in (path.with_name(n) for n in names) if not p.exists() or p.is_dir())
    if copy_path.is_dir():
        raise train_gpt.InputError(f"{copy_path} is a folder, where the artifact's copy goes; remove it")
    train_gpt.check_writable(copy_path.parent, f"CHECKPOINT={s.checkpoint}: the copy {copy_path.name}")
    first = path.with_name(f"{stem}.ptz")
    return copy_path, "new" if copy_path == first else f"kept_existing:{first}"


def build_hint_knobs(s: EvalSettings) -> None:
    rt, artifact, model, seq_len, sp = load_model(s)
    copy_path, copy_note = copy_path_for(s, ".with_hints")  # a read-only folder fails now, not after the search
    say = print if rt.is_main else (lambda *a, **k: None)
    say(s.log_line())
    shard, tokens = training_slice(s, artifact.model_config.vocab_size, s.eval_seq_len or seq_len)
    seq_len = eval_context(s, model, artifact.model_config, seq_len, tokens.numel() - 1)  # EVAL_SEQ_LEN, as scored
    t0 = time.perf_counter()
    candidates = causal_hints.candidate_hints(tokens.numpy())  # (orders, N): every order's hint, one pass
    scores = train_gpt.evaluate(model, tokens, train_gpt.build_byte_tables(sp), seq_len, s.eval_stride,
                                s.eval_batch_seqs, rt.device, rt.autocast, rt.rank, rt.world_size,
                                keep_positions=True, token_of_interest=torch.from_numpy(candidates))
    logprobs = scores.position_token_logprobs.numpy().astype(np.float64)
    found = causal_hints.search_knobs(tokens.numpy(), -scores.position_losses.numpy().astype(np.float64),
                                      lambda asked: logprobs)
    blob = causal_hints.encode_knobs(found.knobs)
    n = tokens.numel() - 1
    for ladder, held_out, in_sample in found.ladders:
        say(f"hint_ladder orders:{','.join(map(str, ladder))} held_out_nats_per_token:{held_out / n:.6f} "
            f"in_sample_nats_per_token:{in_sample / n:.6f}")
    say(f"hint_search train_slice:{log_value(shard)} tokens:{n} base_nats_per_token:{found.base_nats / n:.6f} "
        f"tilted_nats_per_token:{found.tilted_nats / n:.6f} hinted:{found.hint_rate:.4f} right:{found.hint_accuracy:.4f} "
        f"knob_bytes:{len(blob)} time:{1000 * (time.perf_counter() - t0):.0f}ms # chosen on training text only")
    say(f"hint_knobs {causal_hints.knobs_summary(found.knobs)}")
    if rt.is_main:
        artifact_copy(s, copy_path, {HINTS_EXTRA_NAME: blob})
        say(f"artifact_with_hints path:{log_value(copy_path)} bytes:{copy_path.stat().st_size} "
            f"written:{log_value(copy_note)}")


def main() -> None:
    s = EvalSettings.from_env(scope="build")  # the seed's builder names (SEED_SETTINGS)
    if s.correction_mode == "causal":
        return build_hint_knobs(s)
    table_path, table_note = s.choose_table_path()
    scored = load_for_scoring(s)
    copy_path, copy_note = copy_path_for(s, ".with_table") if s.correction_embed else (None, "")  # before the pass
    rt = scored.runtime
    say = print if rt.is_main else (lambda *a, **k: None)
    for line in (s.log_line(), *s.seed_notes):
        say(line)
    t0 = time.perf_counter()
    result = scored.evaluate(keep_positions=True)
    say(f"scoring_pass val_loss:{result.val_loss:.8f} val_bpb:{result.val_bpb:.8f} "
        f"eval_time:{1000 * (time.perf_counter() - t0):.0f}ms precision:{rt.precision}")
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
        artifact_copy(s, copy_path, {TABLE_EXTRA_NAME: blob})
        say(f"artifact_with_table path:{log_value(copy_path)} bytes:{copy_path.stat().st_size} "
            f"written:{log_value(copy_note)}")


if __name__ == "__main__":
    train_gpt.run_main(main, "build_correction_table.py", CorrectionTableError)
