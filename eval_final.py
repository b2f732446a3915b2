"""
eval_final.py: score an int6 + zstd artifact on the validation stream with sliding windows and,
when asked, with the error-correction table applied.

    CHECKPOINT=final_model.int6.ptz python eval_final.py                      # the model's own score
    CHECKPOINT=final_model.int6.ptz USE_CORRECTION=1 python eval_final.py     # + table built inline
    CHECKPOINT=… CORRECTION_TABLE=final_model.int6.ctab python eval_final.py  # + a prebuilt table
    torchrun --standalone --nproc_per_node=8 eval_final.py                    # the same on 8 ranks

An artifact that carries a table applies it without asking. The base score always comes first;
the corrected score is labelled val-derived, and the two-part figure (corrected bits plus the
table's own bits, per byte) says what the table really buys.

Sections, in the order a scoring run meets them: settings; loading an artifact for scoring; the
boost arithmetic; applying a table; main. The table's bytes and the choice of its entries are
correction_table.py's; build_correction_table.py is the standalone builder on top of this file.
"""

from __future__ import annotations

import itertools
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import train_gpt
from correction_table import (CARRIED_TABLE_NAMES, SELECT_MODES, TABLE_FORMAT_COMPACT, TABLE_FORMATS,
                              CorrectionTable, CorrectionTableError, decode_table, encode_table, select_entries,
                              val_fingerprint)
from train_gpt import ARTIFACT_CAP_BYTES, InputError, Settings, log_value

# ----------------------------------------------------------------------------------------------
# Settings
# The evaluation's own knobs, and the ones it shares with training: those take train_gpt's
# defaults, so a run and its evaluation agree unless told otherwise.
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalSettings(train_gpt.EnvSettings):
    checkpoint: str = train_gpt.ARTIFACT_NAME
    data_path: str = Settings.data_path
    tokenizer_path: str = Settings.tokenizer_path
    val_max_tokens: int = Settings.val_max_tokens  # must match the run's for the scores to agree
    eval_stride: int = Settings.eval_stride  # 0: standard non-overlapping windows
    eval_seq_len: int = 0  # window length; 0: the artifact's training length; longer: NTK-rescaled RoPE (eval_context)
    eval_batch_seqs: int = Settings.eval_batch_seqs
    use_correction: bool = False  # build the table inline from this evaluation's losses
    correction_table: str = ""  # apply this prebuilt table file instead
    correction_out: str = ""  # where a built table goes; empty: beside the checkpoint, as .ctab
    correction_embed: bool = False  # builder only: also write a copy of the artifact carrying the table
    correction_boost: float = 20.0  # the seed's: added to the table token's logit
    correction_select: str = "fill"  # fill: as many costliest positions as the cap allows; net: only paying ones
    correction_format: int = TABLE_FORMAT_COMPACT
    correction_max_bytes: int = 0  # 0: what the 16,000,000-byte cap leaves after code and model
    correction_max_entries: int = 0  # 0: no limit
    device: str = Settings.device
    compile: str = Settings.compile
    compile_backend: str = Settings.compile_backend
    autocast_bf16: str = Settings.autocast_bf16

    def check(self) -> None:
        if self.correction_select not in SELECT_MODES:
            raise InputError(f"CORRECTION_SELECT={self.correction_select} is not one of {', '.join(SELECT_MODES)}; "
                             "set CORRECTION_SELECT=fill or CORRECTION_SELECT=net")
        if self.correction_format not in TABLE_FORMATS:
            raise InputError(f"CORRECTION_FORMAT={self.correction_format} is not one of {TABLE_FORMATS}; "
                             "set CORRECTION_FORMAT=2 (ours) or 1 (the seed's)")
        if self.correction_boost <= 0:
            raise InputError(f"CORRECTION_BOOST={self.correction_boost} must be positive; the seed uses 20")

    def choose_table_path(self) -> tuple[Path, str]:
        """Where a built table goes, decided before any scoring, and what the log says of it:
        CORRECTION_OUT as given (a file there is replaced, and the log says so), else beside the
        checkpoint as .ctab, or the first free .1.ctab, .2.ctab, ...: an earlier table is never
        replaced silently. The folder is probed for writing now, not after the scoring pass."""
        if self.correction_out:
            path = Path(self.correction_out)
            note = "replaced_existing" if path.is_file() else "new"
        else:
            first = Path(self.checkpoint).with_suffix(".ctab")
            numbered = (first.with_name(f"{first.stem}.{n}.ctab") for n in itertools.count(1))
            path = next(p for p in itertools.chain([first], numbered) if not p.exists())
            note = "new" if path == first else f"kept_existing:{first}"
        if path.is_dir():
            raise InputError(f"CORRECTION_OUT={path} is a folder; name a file, e.g. {path / 'table.ctab'}")
        train_gpt.check_writable(path.parent, f"CORRECTION_OUT={path}")
        return path, note


# ----------------------------------------------------------------------------------------------
# Loading an artifact for scoring
# The artifact, the tokenizer and the validation stream it was trained beside (checked by hash),
# the model built from its config and compiled once, and every scoring pass over that stream.
# ----------------------------------------------------------------------------------------------


def check_same_data(meta: dict, identity: dict[str, str], s: EvalSettings) -> None:
    """The tokenizer and validation shards must be the ones the artifact was trained beside: another
    tokenizer or stream gives a BPB that looks fine and is wrong. (Artifacts from before this was
    recorded carry no "data" entry and are not checked.)"""
    trained = meta.get("data", {})
    for key, setting, value in (("tokenizer_sha256", "TOKENIZER_PATH", s.tokenizer_path),
                                ("val_sha256", "DATA_PATH", s.data_path)):
        if key in trained and trained[key] != identity[key]:
            what = "tokenizer" if key.startswith("tokenizer") else "validation shards"
            raise InputError(f"{setting}={value}: this {what} (sha256 {identity[key][:16]}) is not the one "
                             f"CHECKPOINT={s.checkpoint} was trained with ({trained[key][:16]}); point {setting} "
                             "at the data the run used")


def model_from_artifact(artifact: train_gpt.Artifact, source: str, device: torch.device) -> train_gpt.GPT:
    try:
        model = train_gpt.GPT(artifact.model_config)
        model.load_state_dict(artifact.state, strict=True)
    except (TypeError, KeyError, RuntimeError) as e:
        raise InputError(f"{source}: the artifact's tensors do not match its model configuration "
                         f"({str(e).splitlines()[0]}); re-export it with train_gpt.py") from None
    return model.to(device)


def ntk_rope_base(cfg: train_gpt.ModelConfig, eval_len: int, train_len: int) -> float:
    """RoPE's base for windows longer than training, rescaled NTK-style: base x (eval / train)^(d / (d - 2)),
    d the rotary width (all of a head here). The slowest rotation then spans the longer window as it spanned
    the trained one, while the fastest keep nearly their trained periods."""
    d = cfg.model_dim // cfg.num_heads
    if d <= 2:
        raise InputError(f"EVAL_SEQ_LEN={eval_len}: a {d}-wide head has no rotation to rescale; unset EVAL_SEQ_LEN")
    return cfg.rope_base * (eval_len / train_len) ** (d / (d - 2))


def eval_context(s: EvalSettings, model: torch.nn.Module, cfg: train_gpt.ModelConfig, train_len: int,
                 num_targets: int) -> int:
    """The scoring window, EVAL_SEQ_LEN or the training length; a longer one rescales the model's RoPE base
    (ntk_rope_base). A shorter one needs none: the model was trained on every position in it. The stream
    stays the training length's, so both score the same targets."""
    length = s.eval_seq_len or train_len
    if length < 0:
        raise InputError(f"EVAL_SEQ_LEN={length} is negative; set it to a window length, or 0 for the training length")
    if s.eval_stride == 0 and num_targets % min(length, num_targets):
        raise InputError(f"EVAL_SEQ_LEN={length} does not divide the {num_targets} targets, which standard windows "
                         "(EVAL_STRIDE=0) need; set EVAL_STRIDE above 0, or EVAL_SEQ_LEN to a divisor")
    if s.eval_stride > length:
        raise InputError(f"EVAL_STRIDE={s.eval_stride} exceeds the {length}-token window; set it lower, or 0")
    if length > train_len:
        inv_freq = train_gpt.Rotary(cfg.model_dim // cfg.num_heads, ntk_rope_base(cfg, length, train_len)).inv_freq
        for module in model.modules():
            if isinstance(module, train_gpt.Rotary):
                module.inv_freq.copy_(inv_freq)
    return length


@dataclass
class ScoredValidation:
    """A checkpoint ready to score the validation stream: the model, the stream, its byte tables
    and the run's settings. evaluate() runs one scoring pass."""

    settings: EvalSettings
    runtime: train_gpt.Runtime
    artifact: train_gpt.Artifact
    model: torch.nn.Module
    seq_len: int
    tokens: torch.Tensor  # (N + 1,) the scored stream
    byte_tables: train_gpt.ByteTables
    model_bytes: int  # the checkpoint file, less any table it already carries
    on_device: tuple = ()  # (tokens, byte_tables) copied to the device once, for every scoring pass
    data_identity: tuple = ()  # (key, value) pairs: the data's hashes and whether a manifest vouched for them

    @property
    def targets(self) -> np.ndarray:
        return self.tokens[1:].numpy()

    @property
    def fingerprint(self) -> bytes:
        return val_fingerprint(self.tokens.numpy())

    def evaluate(self, **kwargs) -> train_gpt.EvalResult:
        s, rt = self.settings, self.runtime
        if not self.on_device:
            self.on_device = (self.tokens.to(rt.device), self.byte_tables.to(rt.device))
        return train_gpt.evaluate(self.model, *self.on_device, self.seq_len, s.eval_stride,
                                  s.eval_batch_seqs, rt.device, rt.autocast, rt.rank, rt.world_size, **kwargs)


def load_for_scoring(s: EvalSettings) -> ScoredValidation:
    s.check()
    rt = train_gpt.init_runtime(s)
    try:  # a hand-edited header (a key missing, an unknown dtype, a wrong shape): one line, no traceback
        artifact = train_gpt.read_artifact(s.checkpoint)
        cfg = artifact.model_config
        train_gpt.validate_model_config(cfg)
        seq_len = int(artifact.meta["train_seq_len"])
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError, ZeroDivisionError) as e:
        raise InputError(f"CHECKPOINT={s.checkpoint}: the artifact header does not describe its tensors and model "
                         f"({type(e).__name__}: {str(e).splitlines()[0]}); re-export it with train_gpt.py") from None
    try:
        sp = train_gpt.load_tokenizer(s.tokenizer_path, cfg.vocab_size)
    except InputError as e:
        raise InputError(f"CHECKPOINT={s.checkpoint} was trained with a {cfg.vocab_size}-token vocabulary, but {e}") \
            from None
    identity = train_gpt.data_identity(s.data_path, s.tokenizer_path)
    check_same_data(artifact.meta, identity, s)
    tokens = train_gpt.load_validation_tokens(s.data_path, cfg.vocab_size, seq_len, s.val_max_tokens)
    model = model_from_artifact(artifact, s.checkpoint, rt.device)
    if rt.compile:
        model = train_gpt.compile_model(model, rt.compile_backend)
    seq_len = eval_context(s, model, cfg, seq_len, tokens.numel() - 1)
    carried = sum(len(artifact.extras.get(name, b"")) for name in CARRIED_TABLE_NAMES)
    return ScoredValidation(s, rt, artifact, model, seq_len, tokens, train_gpt.build_byte_tables(sp),
                            Path(s.checkpoint).stat().st_size - carried, data_identity=tuple(identity.items()))


# ----------------------------------------------------------------------------------------------
# The boost arithmetic
# At a table position the table's token gets CORRECTION_BOOST added to its logit. The loss that
# follows is closed form in the position's loss and log p(table token): applying a table costs
# no second pass through the model.
# ----------------------------------------------------------------------------------------------

LN2 = math.log(2)


def log1mexp(x: np.ndarray) -> np.ndarray:
    """log(1 - exp(x)) for x <= 0, accurate at both ends."""
    x = np.minimum(x, 0.0)
    with np.errstate(divide="ignore"):
        return np.where(x > -LN2, np.log(-np.expm1(x)), np.log1p(-np.exp(x)))


def boosted_losses(losses: np.ndarray, table_token_logprobs: np.ndarray, table_is_target: np.ndarray,
                   boost: float) -> np.ndarray:
    """The loss after adding `boost` to one token's logit, from the loss and that token's log p.

    With p the table token's probability, the log-sum-exp grows by log((1 - p) + p e^boost); the
    target's logit grows by `boost` only where the table's token is the target.
    """
    lp = table_token_logprobs.astype(np.float64)
    growth = np.logaddexp(log1mexp(lp), lp + boost)
    return losses.astype(np.float64) + growth - boost * table_is_target


def saved_bits(losses: np.ndarray, boost: float) -> np.ndarray:
    """Bits an entry saves at each position, its token being the target (so log p = -loss)."""
    return (losses - boosted_losses(losses, -losses, np.ones(losses.size, bool), boost)) / LN2


def no_table_line(s: EvalSettings) -> str:
    return (f"correction entries:0 select:{s.correction_select} # no entry fits the budget or pays for itself; "
            "no table written; the base score stands")


# ----------------------------------------------------------------------------------------------
# Applying a table
# A table comes from a file (CORRECTION_TABLE), from inside the artifact, or is built here from
# this pass's losses and read back from its bytes like any other. Either way the boost goes to
# the table's token, whatever the text says.
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TableBytes:
    blob: bytes
    source: str  # the file it came from, for messages and the log
    carried: bool = False  # inside the checkpoint: its bytes are already in model_bytes' file


def table_budget_bytes(scored: ScoredValidation) -> int:
    s = scored.settings
    if s.correction_max_bytes > 0:
        return s.correction_max_bytes
    return max(ARTIFACT_CAP_BYTES - train_gpt.code_bytes(*code_paths()) - scored.model_bytes, 0)


def build_table_bytes(scored: ScoredValidation, position_losses: np.ndarray) -> bytes:
    """The encoded table, or b"" when no entry is selected (e.g. none pays for itself)."""
    s = scored.settings
    vocab = scored.artifact.model_config.vocab_size
    saved = saved_bits(position_losses, s.correction_boost) if s.correction_select == "net" else None
    positions, tokens = select_entries(position_losses, saved, scored.targets, mode=s.correction_select,
                                       vocab_size=vocab, budget_bytes=table_budget_bytes(scored),
                                       fmt=s.correction_format, max_entries=s.correction_max_entries)
    if positions.size == 0:
        return b""
    blob = encode_table(positions, tokens, vocab_size=vocab, val_length=position_losses.size,
                        fingerprint=scored.fingerprint, fmt=s.correction_format, source=s.checkpoint)
    if s.correction_select == "net" and float(saved[positions].sum()) <= 8 * len(blob):
        return b""  # the header tips it over: the table would not pay
    return blob


def given_table(scored: ScoredValidation) -> TableBytes | None:
    """The table named by CORRECTION_TABLE, else the one the artifact carries, else none."""
    s = scored.settings
    if s.correction_table:
        path = Path(s.correction_table)
        if not path.is_file():
            raise InputError(f"CORRECTION_TABLE={path}: no such file; build one with build_correction_table.py "
                             "or unset CORRECTION_TABLE")
        return TableBytes(path.read_bytes(), str(path))
    for name in CARRIED_TABLE_NAMES:
        if name in scored.artifact.extras:
            return TableBytes(scored.artifact.extras[name], s.checkpoint, carried=True)
    return None


def decode_for(scored: ScoredValidation, given: TableBytes) -> CorrectionTable:
    return decode_table(given.blob, source=given.source, expect_vocab_size=scored.artifact.model_config.vocab_size,
                        expect_val_length=scored.tokens.numel() - 1, expect_fingerprint=scored.fingerprint)


def apply_correction(scored: ScoredValidation, base: train_gpt.EvalResult, given: TableBytes | None,
                     table: CorrectionTable | None, table_path: Path | None
                     ) -> tuple[float, TableBytes | None, CorrectionTable | None]:
    """(corrected loss sum in nats, the table's bytes, the table). A given table comes decoded; without
    one, one is built from the pass's losses and written to table_path; (base loss, None, None) when
    none is selected.

    log p(table token) comes from the pass: gathered there for a given table; for a built one every
    entry's token is the target the pass scored, so it is that position's -loss."""
    s = scored.settings
    losses = base.position_losses.numpy()
    if given is None:
        blob = build_table_bytes(scored, losses)
        if not blob:
            return float(losses.sum()), None, None
        if scored.runtime.is_main:
            train_gpt.atomic_write_bytes(table_path, blob)
        given = TableBytes(blob, str(table_path))
        table = decode_table(blob, source=given.source)
        logprobs = -losses[table.positions].astype(np.float64)
    else:
        logprobs = base.position_token_logprobs.numpy()[table.positions]
    corrected = losses.astype(np.float64)
    corrected[table.positions] = boosted_losses(losses[table.positions], logprobs,
                                                table.tokens == scored.targets[table.positions], s.correction_boost)
    return float(corrected.sum()), given, table


EVALUATION_SCRIPTS = ("train_gpt.py", "eval_final.py", "correction_table.py")  # what an evaluation imports


def code_paths() -> list[Path]:
    """The scripts an evaluation runs: all of them count against the cap."""
    here = Path(__file__).resolve().parent
    return [here / name for name in EVALUATION_SCRIPTS]


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------


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
        say(f"note log:{log_value(log_path)} # {Path(s.checkpoint).parent} cannot be written")
    meta = scored.artifact.meta
    say(f"run {train_gpt.library_versions()} world_size:{rt.world_size} device:{rt.device}")
    say.code(*code_paths())  # the log carries the code that scored, as the training log does
    say(s.log_line() + f" seed:{meta.get('seed')} run_id:{log_value(meta.get('run_id'))} seq_len:{scored.seq_len}")
    for line in s.seed_notes:
        say(line)
    if scored.seq_len > meta["train_seq_len"]:
        say(f"eval_context seq_len:{scored.seq_len} train_seq_len:{meta['train_seq_len']} rope_base:"
            f"{ntk_rope_base(scored.artifact.model_config, scored.seq_len, meta['train_seq_len']):.6g} # NTK-rescaled")
    identity = dict(scored.data_identity)
    say("data " + " ".join(f"{k}:{v}" for k, v in identity.items()) + ("" if "data" in meta else
        " trained_data:unrecorded"))
    if identity["manifest"] == "none":
        say(f"warning missing:{log_value(Path(s.data_path) / train_gpt.MANIFEST_NAME)} # the tokenizer and the shards are "
            "not checked against each other")

    given = given_table(scored)
    table = decode_for(scored, given) if given is not None else None  # refused before the pass, not after
    if table is not None and not table.fingerprint:
        say(f"warning table:{log_value(given.source)} verified:0 # the seed's CRDT format carries no fingerprint: "
            "not checked against this validation data")
    wanted = None
    if table is not None:
        wanted = torch.full((scored.tokens.numel() - 1,), -1, dtype=torch.int32)
        wanted[torch.from_numpy(table.positions)] = torch.from_numpy(table.tokens).int()

    correcting = given is not None or s.use_correction
    t0 = time.perf_counter()
    base = scored.evaluate(keep_positions=correcting, token_of_interest=wanted)
    eval_ms = 1000 * (time.perf_counter() - t0)
    say(f"eval_base val_loss:{base.val_loss:.8f} val_bpb:{base.val_bpb:.8f} eval_time:{eval_ms:.0f}ms "
        f"stride:{s.eval_stride} tokens:{base.token_count} bytes:{base.byte_count}")
    code = train_gpt.code_bytes(*code_paths())
    if not correcting:
        total = code + scored.model_bytes
        say(f"artifact_total eval_code_bytes:{code} model_bytes:{scored.model_bytes} table_bytes:0 "
            f"total_bytes:{total} cap_bytes:{ARTIFACT_CAP_BYTES}")
        return

    t0 = time.perf_counter()
    corrected_nats, given, table = apply_correction(scored, base, given, table, table_path)
    if table is None:
        say(no_table_line(s))
        return
    table_ms = 1000 * (time.perf_counter() - t0)
    table_bytes = len(given.blob)
    say(f"correction source:{log_value(given.source)} carried:{int(given.carried)} entries:{table.positions.size} "
        f"table_bytes:{table_bytes} bytes_per_entry:{table_bytes / max(table.positions.size, 1):.3f} "
        f"format:{table.fmt} select:{s.correction_select} boost:{s.correction_boost} time:{table_ms:.0f}ms"
        + (f" written:{log_value(table_note)}" if table_path is not None and given.source == str(table_path) else ""))
    say(f"eval_corrected_valderived val_loss:{corrected_nats / base.token_count:.8f} "
        f"val_bpb:{corrected_nats / LN2 / base.byte_count:.8f} # val-derived: the table was made from validation text")
    two_part = (corrected_nats / LN2 + 8 * table_bytes) / base.byte_count
    say(f"eval_two_part val_bpb:{two_part:.8f} base_val_bpb:{base.val_bpb:.8f} # corrected bits + 8 x table bytes, "
        "per validation byte")
    total = code + scored.model_bytes + table_bytes  # a carried table is in the file: counted once
    say(f"artifact_total eval_code_bytes:{code} model_bytes:{scored.model_bytes} table_bytes:{table_bytes} "
        f"total_bytes:{total} cap_bytes:{ARTIFACT_CAP_BYTES} headroom_bytes:{ARTIFACT_CAP_BYTES - total}"
        + ("" if total <= ARTIFACT_CAP_BYTES else " over_cap:1"))


if __name__ == "__main__":
    train_gpt.run_main(main, "eval_final.py", CorrectionTableError)
