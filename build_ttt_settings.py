"""
build_ttt_settings.py: choose score-first TTT's settings on held-out training text, never on validation text,
and store them in a copy of the artifact, where eval_final.py finds them (USE_TTT=1) and counts their bytes.

    CHECKPOINT=final_model.int6.ptz python build_ttt_settings.py                  # TTT_MODE=phased by default
    CHECKPOINT=final_model.int6.ptz TTT_MODE=full python build_ttt_settings.py    # the chunked mode's rate
        # writes final_model.int6.with_ttt.ptz (carrying whatever the checkpoint carried, hint knobs included)

The slice is the last CALIBRATE_TTT_TOKENS tokens of the last training shard (the hint knobs' slice,
build_correction_table.training_slice). TTT runs over it as it will run over the validation stream, once per
candidate, by a coordinate search over the table SEARCH: each setting in turn takes the value that scores the
slice best with the others as chosen so far, and keeps its start (no adaptation where that is possible) unless
a value beats it. The base figure on the slice (the model's own sliding-window score) is logged beside every
candidate; if no candidate beats it, the setting that adapts least is stored and the log says the slice did not
pay. A TTT setting given by hand (TTT_LR=0.01, TTT_EPOCHS=1, ...) is fixed: the search starts from it, never
changes it, stores it with the chosen ones and logs it as by_hand:. An earlier copy is kept: the next run writes
.with_ttt.1.ptz (then .2, ...) and logs written:kept_existing. On a run that looped over its training data the
slice was seen in training (the model is surer there than on new text, so TTT looks less useful on it than it
will be): hold the last shard out of training for a clean choice, as bench/phased_ttt_compare.py does.
"""

from __future__ import annotations

import dataclasses
import os
import time

import torch

import train_gpt
from build_correction_table import artifact_copy, copy_path_for, training_slice
from eval_final import (TTT_EXTRA_NAME, EvalSettings, check_ttt_stream, decode_ttt_settings, encode_ttt_settings,
                        eval_context, load_model)
from train_gpt import log_value

# Per mode: where the search starts, then each setting's candidates in the order they are searched, and the
# setting that must be non-zero for it to matter (None: always). The phased start adapts nothing.
SEARCH = {
    "phased": ({"TTT_LR": 0.0, "TTT_RANK": 8, "TTT_GLOBAL_LR": 0.0, "TTT_PHASES": 3, "TTT_EPOCHS": 1},
               [("TTT_LR", (0.003, 0.01, 0.03), None),
                ("TTT_RANK", (16,), "TTT_LR"),
                ("TTT_GLOBAL_LR", (0.01, 0.03, 0.1), None),
                ("TTT_EPOCHS", (2,), "TTT_GLOBAL_LR")]),
    "full": ({"TTT_LR": 0.003, "TTT_EPOCHS": 3},
             [("TTT_LR", (0.01, 0.03, 0.1), None),
              ("TTT_EPOCHS", (1,), None)]),
}
STORED = {"phased": ("TTT_MODE", "TTT_LR", "TTT_RANK", "TTT_GLOBAL_LR", "TTT_PHASES", "TTT_EPOCHS",
                     "TTT_DOC_CHUNK_TOKENS"),
          "full": ("TTT_MODE", "TTT_LR", "TTT_EPOCHS", "TTT_CHUNK_TOKENS")}


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
    fixed: settings given by hand, which the search starts from and never changes."""
    start, stages = SEARCH[s.ttt_mode]
    fixed = fixed or {}
    stages = [stage for stage in stages if stage[0] not in fixed]
    best = {**start, **fixed}
    best_bpb = score(with_values(s, best))
    say(f"ttt_candidate {' '.join(f'{k.lower()}:{v}' for k, v in best.items())} slice_bpb:{best_bpb:.6f} # start")
    for name, values, needs in stages:
        if needs is not None and not best[needs]:
            continue
        for value in values:
            trial = {**best, name: value}
            bpb = score(with_values(s, trial))
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


def main() -> None:
    s = EvalSettings.from_env(scope="build")
    if "TTT_MODE" not in os.environ:  # the builder's default: the phased mode
        s = dataclasses.replace(s, ttt_mode="phased")
    if s.ttt_mode not in SEARCH:
        raise train_gpt.InputError(f"TTT_MODE={s.ttt_mode}: settings are chosen for {' or '.join(SEARCH)}; set one")
    dataclasses.replace(s, use_ttt=True).check_evaluation()  # a setting this mode never reads is refused, not dropped
    fixed = by_hand_settings(s, os.environ)
    copy_path, copy_note = copy_path_for(s, ".with_ttt")  # a read-only folder fails now, not after the search
    rt, artifact, model, seq_len, sp = load_model(s)
    say = print if rt.is_main else (lambda *a, **k: None)
    say(s.log_line())
    shard, tokens = training_slice(s, artifact.model_config.vocab_size, s.eval_seq_len or seq_len,
                                   "calibrate_ttt_tokens")
    seq_len = eval_context(s, model, artifact.model_config, seq_len, tokens.numel() - 1)
    for line in check_ttt_stream(with_values(s, {**SEARCH[s.ttt_mode][0], **fixed}), tokens, seq_len,
                                 f"CALIBRATE_TTT_TOKENS={s.calibrate_ttt_tokens} slice"):  # before any candidate
        say(line)
    tables = train_gpt.build_byte_tables(sp)
    t0 = time.perf_counter()
    base = train_gpt.evaluate(model, tokens, tables, seq_len, s.eval_stride, s.eval_batch_seqs, rt.device,
                              rt.autocast, rt.rank, rt.world_size)
    say(f"ttt_slice train_slice:{log_value(shard)} tokens:{tokens.numel() - 1} slice_base_bpb:{base.val_bpb:.6f} "
        f"mode:{s.ttt_mode} # held-out training text: no validation token is read")
    chosen, bpb = search(s, lambda trial: ttt_bpb(trial, model, tokens, tables, seq_len, rt), say,
                         {k: v for k, v in fixed.items() if k != "TTT_MAX_SECONDS"})
    final = with_values(s, chosen)
    stored = {name: getattr(final, name.lower()) for name in (*STORED[s.ttt_mode], *fixed) if name != "TTT_MAX_SECONDS"}
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
