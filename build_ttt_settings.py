"""
build_ttt_settings.py: choose score-first TTT's settings on held-out training text, never on validation text,
and store them in a copy of the artifact, where eval_final.py finds them (USE_TTT=1) and counts their bytes.

    CHECKPOINT=final_model.int6.ptz python build_ttt_settings.py                  # both modes tried, the better kept
    CHECKPOINT=final_model.int6.ptz TTT_MODE=full python build_ttt_settings.py    # the chunked mode only
        # writes final_model.int6.with_ttt.ptz (carrying whatever the checkpoint carried, hint knobs included)

The slice is whole documents: the last documents of the last training shard (which ends where the training text
ends, so its last document is whole), from the first BOS that leaves at most CALIBRATE_TTT_TOKENS targets, so the
documents are cut at BOS as the validation stream's are and phased TTT meets the same kind of stream (with
EVAL_STRIDE=0 the first document is cut so that whole windows score every target). TTT runs over it as it will
run over the validation stream, once per candidate, by a coordinate search over the table SEARCH, for each mode
in MODES (or the one TTT_MODE names): each setting in turn takes the value that scores the slice best with the
others as chosen so far, and keeps its start (no adaptation where that is possible) unless a value beats it; the
mode whose best scores the slice best is stored, TTT_MODE with it. The base figure on the slice (the model's own
sliding-window score) is logged beside every candidate; if no candidate beats it, the setting that adapts least is
stored and the log says the slice did not pay. A TTT setting given by hand (TTT_LR=0.01, TTT_EPOCHS=1, ...) is
fixed: the search starts from it, never changes it, stores it with the chosen ones and logs it as by_hand:; a
hand setting that one tried mode never reads is left out of that mode's search (a note line), one that no tried
mode reads is refused. An earlier copy is kept: the next run writes .with_ttt.1.ptz (then .2, ...) and logs
written:kept_existing. The slice must be new text to the model: a run that looped over its training data, or
read the last shard, saw it (the model is surer there than on new text, so TTT looks less useful on it than it
will be); hold the last shard out of training, as bench/phased_ttt_compare.py does.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

import train_gpt
from build_correction_table import artifact_copy, copy_path_for
from eval_final import (TTT_EXTRA_NAME, TTT_UNUSED_BY_MODE, EvalSettings, check_ttt_stream, decode_ttt_settings,
                        encode_ttt_settings, eval_context, load_model)
from train_gpt import log_value

class Stage(NamedTuple):
    """One step of the coordinate search: each of `values` tried for the setting `name`. needs: the setting that must
    be non-zero for this one to matter (None: always); when the best so far has it at 0 the stage is skipped, or,
    with `branch`, its values are tried from the best candidate scored with it non-zero (a global step of 3 phases
    that does not pay may pay with 1: the global step's settings are searched as a whole before it is given up)."""
    name: str
    values: tuple
    needs: str | None = None
    branch: bool = False


# Per mode: where the search starts, then its stages in order. The phased start adapts nothing. A setting may come
# back: the global step's rate, passes and phases act together (how far the model moves), so the rate and the passes
# are searched again once the phases are chosen; a candidate already scored is not run again. The phased stages
# begin with the previous builder's whole search (commit 66fd1a6: 3 phases, epochs 1 or 2) in its order, so on one
# slice this search scores every candidate that one did and keeps one at least as good (tests/test_build_ttt_settings).
SEARCH = {
    "phased": ({"TTT_LR": 0.0, "TTT_RANK": 8, "TTT_GLOBAL_LR": 0.0, "TTT_PHASES": 3, "TTT_EPOCHS": 1},
               [Stage("TTT_LR", (0.003, 0.01, 0.03)),
                Stage("TTT_RANK", (16,), "TTT_LR"),
                Stage("TTT_GLOBAL_LR", (0.01, 0.03, 0.1)),
                Stage("TTT_EPOCHS", (2, 3), "TTT_GLOBAL_LR", branch=True),
                Stage("TTT_PHASES", (1, 3, 6, 9), "TTT_GLOBAL_LR", branch=True),
                Stage("TTT_GLOBAL_LR", (0.01, 0.03, 0.1), "TTT_GLOBAL_LR", branch=True),
                Stage("TTT_EPOCHS", (1, 2, 3), "TTT_GLOBAL_LR", branch=True)]),
    "full": ({"TTT_LR": 0.003, "TTT_EPOCHS": 3},
             [Stage("TTT_LR", (0.01, 0.03, 0.1)),
              Stage("TTT_EPOCHS", (1,))]),
}
STORED = {"phased": ("TTT_MODE", "TTT_LR", "TTT_RANK", "TTT_GLOBAL_LR", "TTT_PHASES", "TTT_EPOCHS",
                     "TTT_DOC_CHUNK_TOKENS"),
          "full": ("TTT_MODE", "TTT_LR", "TTT_EPOCHS", "TTT_CHUNK_TOKENS")}
MODES = ("phased", "full")  # tried in this order when TTT_MODE is not given; a tie keeps the first
BOS_ID = 1  # data/prepare.py writes every document as BOS and its tokens


def held_out_documents(s: EvalSettings, vocab_size: int, window: int) -> tuple[Path, torch.Tensor, int]:
    """(the shard, its last whole documents as a stream starting at a BOS with at most CALIBRATE_TTT_TOKENS
    targets, how many documents). The last training shard ends where the training text ends, so its last
    document is whole. With EVAL_STRIDE=0 the stream's start is moved on to whole windows (standard windows
    score only whole ones), cutting the first document."""
    shard = train_gpt.list_shards(s.data_path, "train")[-1]
    stream = np.asarray(train_gpt.load_data_shard(shard, vocab_size), dtype=np.int64)
    count = s.calibrate_ttt_tokens
    if s.eval_seq_len and window >= stream.size:
        raise train_gpt.InputError(f"EVAL_SEQ_LEN={s.eval_seq_len} is longer than the training shard {shard} "
                                   f"({stream.size} tokens) the settings are chosen on; set EVAL_SEQ_LEN below "
                                   f"{stream.size}, or 0 for the training length")
    bos = np.flatnonzero(stream == BOS_ID)
    span = stream.size - 1 - bos  # targets from each BOS to the shard's end
    usable = bos[span >= window]  # at least one window of targets
    if not usable.size:
        raise train_gpt.InputError(f"CALIBRATE_TTT_TOKENS={count}: {shard} ({stream.size} tokens) has no whole "
                                   f"documents as long as a window of {window} at its end; prepare more training "
                                   "text (data/prepare.py), or set EVAL_SEQ_LEN lower")
    least = int(stream.size - 1 - usable[-1])
    fits = usable[span[span >= window] <= count]
    if count > stream.size - 1 or not fits.size:
        raise train_gpt.InputError(f"CALIBRATE_TTT_TOKENS={count}: the whole documents at the end of {shard} "
                                   f"({stream.size} tokens) hold between {least} and {int(span[0])} targets; set "
                                   f"CALIBRATE_TTT_TOKENS between {least} and {stream.size - 1}")
    start = int(fits[0])
    if s.eval_stride == 0:
        start = stream.size - 1 - (stream.size - 1 - start) // window * window
    tokens = torch.from_numpy(stream[start:].copy())
    return shard, tokens, int((tokens[1:-1] == BOS_ID).sum()) + 1


def ttt_bpb(s: EvalSettings, model, tokens: torch.Tensor, tables, seq_len: int, rt) -> float:
    """The TTT pass eval_final.py would run with settings s, over `tokens`; its BPB."""
    if s.ttt_mode == "phased":
        import phased_ttt

        return phased_ttt.phased_evaluate(model, tokens, tables, seq_len, s.phased_settings(), device=rt.device,
                                          autocast=rt.autocast, rank=rt.rank, world_size=rt.world_size).val_bpb
    import score_first_ttt

    return score_first_ttt.ttt_evaluate(model, tokens, tables, seq_len, s.eval_stride, **s.ttt_kwargs(),
                                        device=rt.device, autocast=rt.autocast, rank=rt.rank,
                                        world_size=rt.world_size).val_bpb


def with_values(s: EvalSettings, values: dict) -> EvalSettings:
    return dataclasses.replace(s, **{k.lower(): v for k, v in values.items()})


def search(s: EvalSettings, score, say, fixed: dict | None = None) -> tuple[dict, float]:
    """The coordinate search of SEARCH[mode]: (the chosen values by environment name, their BPB on the slice).
    fixed: settings given by hand, which the search starts from and never changes. Each candidate is scored once:
    one met again (a stage that comes back, or the value already chosen) is not run again."""
    start, stages = SEARCH[s.ttt_mode]
    fixed = fixed or {}
    stages = [stage for stage in stages if stage.name not in fixed]
    best = {**start, **fixed}
    best_bpb = score(with_values(s, best))
    scored = {tuple(sorted(best.items())): (best_bpb, best)}  # every candidate scored: its BPB and its values
    say(f"ttt_candidate {' '.join(f'{k.lower()}:{v}' for k, v in best.items())} slice_bpb:{best_bpb:.6f} # start")
    for stage in stages:
        base = best
        if stage.needs is not None and not best[stage.needs]:
            taking = [(bpb, values) for bpb, values in scored.values() if values[stage.needs]]
            if not (stage.branch and taking):
                continue
            base = min(taking, key=lambda pair: pair[0])[1]  # the best candidate that takes the step
        for value in stage.values:
            trial = {**base, stage.name: value}
            key = tuple(sorted(trial.items()))
            if key in scored:
                continue
            bpb = score(with_values(s, trial))
            scored[key] = (bpb, trial)
            say(f"ttt_candidate {' '.join(f'{k.lower()}:{v}' for k, v in trial.items())} slice_bpb:{bpb:.6f}")
            if bpb < best_bpb:
                best, best_bpb = trial, bpb
    return best, best_bpb


def by_hand_settings(s: EvalSettings, env) -> dict:
    """TTT settings given by hand, by environment name: each one the mode reads is honoured (eval_final refuses the
    others: check_evaluation), stored with the chosen ones, and the search does not touch it. TTT_MAX_SECONDS bounds
    each candidate's pass here and is not stored."""
    return {name: getattr(s, name.lower()) for name in sorted(env) if name.startswith("TTT_") and name != "TTT_MODE"
            and hasattr(s, name.lower())}


def mode_settings(s: EvalSettings, mode: str, fixed: dict) -> tuple[EvalSettings, dict, list[str]]:
    """(s for this mode, the hand settings it reads, the ones it never reads): those are reset to their defaults
    for this mode's search (they are not dropped: another mode reads them, or the run was refused)."""
    unread = [k for k in fixed if k.lower() in TTT_UNUSED_BY_MODE[mode]]
    defaults = {k.lower(): getattr(EvalSettings, k.lower()) for k in unread}
    return (dataclasses.replace(s, ttt_mode=mode, **defaults), {k: v for k, v in fixed.items() if k not in unread},
            unread)


def main() -> None:
    s = EvalSettings.from_env(scope="build")
    modes = (s.ttt_mode,) if "TTT_MODE" in os.environ else MODES  # not given: both tried, the better stored
    if s.ttt_mode not in SEARCH:
        raise train_gpt.InputError(f"TTT_MODE={s.ttt_mode}: settings are chosen for {' or '.join(SEARCH)}; set one")
    fixed = by_hand_settings(s, os.environ)
    unread_by_all = [k for k in fixed if all(k.lower() in TTT_UNUSED_BY_MODE[m] for m in modes)]
    if unread_by_all:  # a setting no tried mode reads is refused, not dropped (check_evaluation's line names it)
        dataclasses.replace(s, use_ttt=True, ttt_mode=modes[0]).check_evaluation()
    for mode in modes:  # a setting this mode never reads is refused by it, not dropped
        dataclasses.replace(mode_settings(s, mode, fixed)[0], use_ttt=True).check_evaluation()
    copy_path, copy_note = copy_path_for(s, ".with_ttt")  # a read-only folder fails now, not after the search
    rt, artifact, model, seq_len, sp = load_model(s)
    say = print if rt.is_main else (lambda *a, **k: None)
    say(s.log_line())
    shard, tokens, documents = held_out_documents(s, artifact.model_config.vocab_size, s.eval_seq_len or seq_len)
    seq_len = eval_context(s, model, artifact.model_config, seq_len, tokens.numel() - 1)
    stream = f"CALIBRATE_TTT_TOKENS={s.calibrate_ttt_tokens} slice"
    tried = []
    for mode in modes:  # every mode's start against the slice, before any candidate
        sm, hand, unread = mode_settings(s, mode, fixed)
        try:
            lines = check_ttt_stream(with_values(sm, {**SEARCH[mode][0], **hand}), tokens, seq_len, stream)
        except train_gpt.InputError as e:  # a mode the slice cannot try: refused if it is the only one
            if len(modes) == 1 or (mode == modes[-1] and not tried):
                raise
            say(f"note mode_skipped:{mode} # {e}; TTT_MODE={mode} by hand refuses this")
            continue
        tried.append(mode)
        for line in lines:
            say(line)
        if unread:
            say(f"note mode:{mode} not_read:{','.join(f'{k}={log_value(fixed[k])}' for k in unread)} # this mode "
                "never reads them: its search runs without them")
    tables = train_gpt.build_byte_tables(sp)
    t0 = time.perf_counter()
    base = train_gpt.evaluate(model, tokens, tables, seq_len, s.eval_stride, s.eval_batch_seqs, rt.device,
                              rt.autocast, rt.rank, rt.world_size)
    say(f"ttt_slice train_slice:{log_value(shard)} tokens:{tokens.numel() - 1} documents:{documents} "
        f"slice_base_bpb:{base.val_bpb:.6f} modes:{','.join(tried)} # whole held-out training documents: no "
        "validation token is read")
    best = None
    for mode in tried:
        sm, hand, _ = mode_settings(s, mode, fixed)
        chosen, bpb = search(sm, lambda trial: ttt_bpb(trial, model, tokens, tables, seq_len, rt), say,
                             {k: v for k, v in hand.items() if k != "TTT_MAX_SECONDS"})
        say(f"ttt_mode_best mode:{mode} slice_bpb:{bpb:.6f} gain_bpb:{base.val_bpb - bpb:.6f}")
        if best is None or bpb < best[0]:
            best = (bpb, with_values(sm, chosen), hand)
    bpb, final, hand = best
    stored = {name: getattr(final, name.lower()) for name in (*STORED[final.ttt_mode], *hand)
              if name != "TTT_MAX_SECONDS"}
    blob = encode_ttt_settings(stored)
    assert decode_ttt_settings(blob, "the settings just chosen") == stored
    say(f"ttt_chosen {' '.join(f'{k.lower()}:{log_value(v)}' for k, v in stored.items())} slice_bpb:{bpb:.6f} "
        f"slice_base_bpb:{base.val_bpb:.6f} gain_bpb:{base.val_bpb - bpb:.6f} pays:{int(bpb < base.val_bpb)} "
        f"settings_bytes:{len(blob)} by_hand:{','.join(f'{k}={log_value(v)}' for k, v in fixed.items()) or 'none'} "
        f"time:{time.perf_counter() - t0:.0f}s # chosen on training text only; a setting given by hand is kept")
    if rt.is_main:
        artifact_copy(s, copy_path, {TTT_EXTRA_NAME: blob})
        say(f"artifact_with_ttt path:{log_value(copy_path)} bytes:{copy_path.stat().st_size} "
            f"written:{log_value(copy_note)}")


if __name__ == "__main__":
    train_gpt.run_main(main, "build_ttt_settings.py")
