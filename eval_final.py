"""
eval_final.py: score an int6 + zstd artifact on the validation stream with sliding windows and,
when asked, with the legal eval-time methods or the error-correction table.

    CHECKPOINT=final_model.int6.ptz python eval_final.py                      # the model's own score
    CHECKPOINT=final_model.int6.ptz USE_TTT=1 python eval_final.py            # + score-first TTT (legal)
    CHECKPOINT=….with_hints.ptz USE_CORRECTION=1 CORRECTION_MODE=causal python eval_final.py  # + causal hints (legal)
    CHECKPOINT=final_model.int6.ptz USE_CORRECTION=1 python eval_final.py     # + table built inline (val-derived)
    CHECKPOINT=… CORRECTION_TABLE=final_model.int6.ctab python eval_final.py  # + a prebuilt table
    torchrun --standalone --nproc_per_node=8 eval_final.py                    # the same on 8 ranks

The base score always comes first. Then the legal figures, each labelled legal: the causal hints
(knobs chosen on training text and carried by the artifact), score-first TTT, and both together.
Then the val-derived ones: an artifact that carries a table applies it without asking; the
corrected score is labelled val-derived, and the two-part figure (corrected bits plus the table's
own bits, per byte) says what the table really buys.

Sections, in the order a scoring run meets them: settings; loading an artifact for scoring; what a
table entry saves; applying a table; the legal methods; main. The table's bytes, the choice of its
entries and the boost arithmetic are correction_table.py's; TTT is score_first_ttt.py's and the
hint cache causal_hints.py's; build_correction_table.py is the standalone builder on top of this file.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # EVAL_MAX_SECONDS bounds the run from here, before torch is imported

import dataclasses
import itertools
import json
import math
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import train_gpt
from correction_table import (CARRIED_TABLE_NAMES, SELECT_MODES, TABLE_FORMAT_COMPACT, TABLE_FORMATS,
                              CorrectionTable, CorrectionTableError, boosted_losses, decode_table, encode_table,
                              select_entries, val_fingerprint)
from train_gpt import ARTIFACT_CAP_BYTES, InputError, Settings, log_value

CORRECTION_MODES = ("valderived", "causal")
TTT_MODES = ("full", "lora", "phased")
EVAL_BUDGET_S = 600.0  # the challenge's limit on an evaluation, 8xH100
HINTS_EXTRA_NAME = "causal_hint_knobs"  # the knobs' name when an artifact carries them
TTT_EXTRA_NAME = "ttt_settings"  # TTT's settings chosen on training text (build_ttt_settings.py), when carried

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
    correction_mode: str = "valderived"  # valderived: the seed's table; causal: the legal hint cache (causal_hints.py)
    hint_train_tokens: int = 100_000  # builder, causal mode: the training slice the hint knobs are chosen on
    calibrate_ttt_tokens: int = 65_536  # build_ttt_settings.py: the training slice TTT's settings are chosen on
    # score-first test-time training (score_first_ttt.py); the defaults are the public legal-TTT record's,
    # for FineWeb (SPEC section 11): the demo's small model does best with far larger steps (scripts/demo.py)
    use_ttt: bool = False
    ttt_mode: str = "full"  # full: SGD on the model's own weights; lora: rank-TTT_RANK adapters on block matrices;
    # phased: documents scored alone with a LoRA each, global SGD phases between (phased_ttt.py)
    ttt_rank: int = 8  # lora and phased
    ttt_lora_alpha: float = 16.0  # lora and phased: the adapters' scale is alpha / rank
    ttt_params: str = "all"  # full only: all, blocks or no_embed
    ttt_chunk_tokens: int = 32768  # scored, then trained on: the model scoring chunk n has seen chunks 0..n-1
    ttt_epochs: int = 3  # passes over a chunk after it is scored
    ttt_lr: float = 0.002  # at the first chunk; TTT_SCHEDULE decays it across chunks
    ttt_momentum: float = 0.9
    ttt_optimizer: str = "sgd"  # sgd or adam
    ttt_schedule: str = "cosine"  # cosine (to 0 at the last chunk) or constant
    ttt_batch_seqs: int = 16  # training sequences per step, all ranks together
    ttt_grad_clip: float = 1.0  # 0: none
    ttt_max_seconds: float = 0.0  # 0: no budget; else the chunks left when it runs out are scored, not trained on
    # phased only (TTT_LR is the per-document LoRA's Adam rate; TTT_EPOCHS, TTT_MOMENTUM, TTT_BATCH_SEQS and
    # TTT_GRAD_CLIP the global step's)
    ttt_doc_chunk_tokens: int = 32  # targets of a document scored per LoRA step
    ttt_doc_batch: int = 16  # documents per forward on a rank
    ttt_phases: int = 3  # global SGD rounds on the documents already scored; 0: none
    ttt_phase_docs: int = 0  # documents the phases cover, from the first; 0: the first TTT_PHASES/(TTT_PHASES+1)
    ttt_global_lr: float = 0.002  # the global step's SGD rate
    eval_max_seconds: str = "auto"  # the whole run's budget from its start; auto: the challenge's 600 on CUDA, none on CPU
    ship_code: str = Settings.ship_code  # how the counted code ships: bundle (code_bundle.py) or raw
    device: str = Settings.device
    compile: str = Settings.compile
    compile_backend: str = Settings.compile_backend
    autocast_bf16: str = Settings.autocast_bf16
    cpu_precision_probe: str = Settings.cpu_precision_probe

    def check(self) -> None:
        if self.correction_select not in SELECT_MODES:
            raise InputError(f"CORRECTION_SELECT={self.correction_select} is not one of {', '.join(SELECT_MODES)}; "
                             "set CORRECTION_SELECT=fill or CORRECTION_SELECT=net")
        if self.correction_format not in TABLE_FORMATS:
            raise InputError(f"CORRECTION_FORMAT={self.correction_format} is not one of {TABLE_FORMATS}; "
                             "set CORRECTION_FORMAT=2 (ours) or 1 (the seed's)")
        if self.correction_boost <= 0:
            raise InputError(f"CORRECTION_BOOST={self.correction_boost} must be positive; the seed uses 20")
        if self.correction_mode not in CORRECTION_MODES:
            raise InputError(f"CORRECTION_MODE={self.correction_mode} is not one of {', '.join(CORRECTION_MODES)}; "
                             "set CORRECTION_MODE=causal (legal) or CORRECTION_MODE=valderived (the seed's table)")
        if self.hint_train_tokens < 1000:
            raise InputError(f"HINT_TRAIN_TOKENS={self.hint_train_tokens} is too short a slice to choose knobs on; "
                             "set HINT_TRAIN_TOKENS=100000")

    def check_evaluation(self) -> None:
        """What only an evaluation reads: a setting that would change nothing is refused, not ignored."""
        self.budget_seconds(torch.device("cpu"))  # a bad EVAL_MAX_SECONDS stops the run before anything is read
        train_gpt.check_ship_code(self.ship_code)
        check_scripts_present(self)
        if self.correction_mode == "causal" and not self.use_correction:
            raise InputError("CORRECTION_MODE=causal applies the hints only with USE_CORRECTION=1; set USE_CORRECTION=1 "
                             "or unset CORRECTION_MODE")
        unused = TTT_ONLY if not self.use_ttt else TTT_UNUSED_BY_MODE.get(self.ttt_mode, ())
        for name in unused:
            if getattr(self, name) != getattr(EvalSettings, name):
                modes = [m for m, names in TTT_UNUSED_BY_MODE.items() if name not in names]
                needs = "USE_TTT=1" if not self.use_ttt else f"TTT_MODE={' or '.join(modes)}"
                raise InputError(f"{name.upper()}={getattr(self, name)} has no effect without {needs}; set {needs} or "
                                 f"unset {name.upper()}")

    @property
    def causal(self) -> bool:
        return self.use_correction and self.correction_mode == "causal"

    @property
    def evaluation(self) -> str:
        """Which kind of evaluation this is, as train_gpt.EVALUATION_CODE names them: what the cap counts."""
        return {(True, True): "legal", (True, False): "ttt", (False, True): "hints"}.get((self.use_ttt, self.causal),
                                                                                         "base")

    def budget_seconds(self, device: torch.device) -> float:
        """EVAL_MAX_SECONDS as seconds; 0: no budget."""
        if self.eval_max_seconds.lower() == "auto":
            return EVAL_BUDGET_S if device.type == "cuda" else 0.0
        value = train_gpt.parse_setting("EVAL_MAX_SECONDS", self.eval_max_seconds, float)
        if not (math.isfinite(value) and value >= 0):
            raise InputError(f"EVAL_MAX_SECONDS={self.eval_max_seconds} must be at least 0 (0: no budget) or auto; "
                             "set EVAL_MAX_SECONDS=600, the challenge's limit")
        return value

    def ttt_kwargs(self) -> dict:
        """score_first_ttt.ttt_evaluate's arguments."""
        return dict(mode=self.ttt_mode, rank_r=self.ttt_rank, lora_alpha=self.ttt_lora_alpha, params=self.ttt_params,
                    chunk_tokens=self.ttt_chunk_tokens, epochs=self.ttt_epochs, lr=self.ttt_lr,
                    momentum=self.ttt_momentum, optimizer=self.ttt_optimizer, schedule=self.ttt_schedule,
                    batch_seqs=self.ttt_batch_seqs, clip=self.ttt_grad_clip, max_seconds=self.ttt_max_seconds,
                    eval_batch_seqs=self.eval_batch_seqs)

    def phased_settings(self):
        """phased_ttt.phased_evaluate's settings."""
        import phased_ttt

        return phased_ttt.PhasedSettings(
            doc_chunk_tokens=self.ttt_doc_chunk_tokens, rank_r=self.ttt_rank, lora_alpha=self.ttt_lora_alpha,
            lora_lr=self.ttt_lr, phases=self.ttt_phases, phase_docs=self.ttt_phase_docs, global_lr=self.ttt_global_lr,
            momentum=self.ttt_momentum, epochs=self.ttt_epochs, batch_seqs=self.ttt_batch_seqs, clip=self.ttt_grad_clip,
            doc_batch=self.ttt_doc_batch, max_seconds=self.ttt_max_seconds)

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


TTT_FULL_ONLY = ("ttt_params",)
TTT_LORA_ONLY = ("ttt_rank", "ttt_lora_alpha")
TTT_CHUNKED_ONLY = ("ttt_chunk_tokens", "ttt_optimizer", "ttt_schedule")  # full and lora: the stream's chunks
TTT_PHASED_ONLY = ("ttt_doc_chunk_tokens", "ttt_doc_batch", "ttt_phases", "ttt_phase_docs", "ttt_global_lr")
TTT_ONLY = tuple(f.name for f in dataclasses.fields(EvalSettings) if f.name.startswith("ttt_"))
TTT_UNUSED_BY_MODE = {"full": TTT_LORA_ONLY + TTT_PHASED_ONLY, "lora": TTT_FULL_ONLY + TTT_PHASED_ONLY,
                      "phased": TTT_FULL_ONLY + TTT_CHUNKED_ONLY}


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
    made, given = trained.get("tokenization", train_gpt.PLAIN_TOKENIZATION), identity["tokenization"]
    if made != given:  # before the hashes: the one line then says what is wrong and how to fix it
        raise InputError(f"DATA_PATH={s.data_path}: {given} data, and CHECKPOINT={s.checkpoint} was trained on {made} "
                         f"data; score it on the {made} preparation (data/prepare.py"
                         f"{' --case-ops' if made != train_gpt.PLAIN_TOKENIZATION else ' without --case-ops'}) with "
                         "its tokenizer")
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
    d the rotary width (the artifact's ROPE_DIMS of a head; all when 0). The slowest rotation then spans the
    longer window as it spanned the trained one, while the fastest keep nearly their trained periods."""
    d = cfg.rotary_dims
    if d <= 2:
        raise InputError(f"EVAL_SEQ_LEN={eval_len}: a {d}-wide rotation has nothing to rescale; unset EVAL_SEQ_LEN")
    return cfg.rope_base * (eval_len / train_len) ** (d / (d - 2))


def eval_context(s: EvalSettings, model: torch.nn.Module, cfg: train_gpt.ModelConfig, train_len: int,
                 num_targets: int) -> int:
    """The scoring window, EVAL_SEQ_LEN or the training length; a longer one rescales the model's RoPE base
    (ntk_rope_base). A shorter one needs none: the model was trained on every position in it. The stream
    stays the training length's, so both score the same targets."""
    length = s.eval_seq_len or train_len
    if length < 0:
        raise InputError(f"EVAL_SEQ_LEN={length} is negative; set it to a window length, or 0 for the training length")
    if s.eval_seq_len > max(num_targets, train_len):  # it would score nothing more, only rescale RoPE
        raise InputError(f"EVAL_SEQ_LEN={length} is longer than the {num_targets} tokens it would score; set it to at "
                         f"most {max(num_targets, train_len)}, or 0 for the training length ({train_len})")
    if s.eval_stride == 0 and num_targets % min(length, num_targets):
        raise InputError(f"EVAL_SEQ_LEN={length} does not divide the {num_targets} targets, which standard windows "
                         "(EVAL_STRIDE=0) need; set EVAL_STRIDE above 0, or EVAL_SEQ_LEN to a divisor")
    if s.eval_stride > length:
        raise InputError(f"EVAL_STRIDE={s.eval_stride} exceeds the {length}-token window; set it lower, or 0")
    if length > train_len:
        inv_freq = train_gpt.Rotary(cfg.rotary_dims, ntk_rope_base(cfg, length, train_len)).inv_freq
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
    model_bytes: int  # the checkpoint file, less any table or hint knobs it carries
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


def load_model(s: EvalSettings) -> tuple[train_gpt.Runtime, train_gpt.Artifact, torch.nn.Module, int, object]:
    """The runtime, the artifact, its model (compiled when asked), its training length and the tokenizer:
    everything but the validation stream (the causal builder must not read it)."""
    s.check()
    try:  # a hand-edited header (a key missing, an unknown dtype, a wrong shape): one line, no traceback
        artifact = train_gpt.read_artifact(s.checkpoint)
        cfg = artifact.model_config
        seq_len = artifact.meta["train_seq_len"]
        try:  # what train_gpt.py never writes: one line naming the artifact, not a traceback or a silent score later
            train_gpt.validate_model_config(cfg)
            if not (isinstance(seq_len, int) and not isinstance(seq_len, bool) and seq_len >= 1):
                raise InputError(f"TRAIN_SEQ_LEN={seq_len!r} is not a whole number of at least 1")
        except InputError as e:
            raise InputError(f"CHECKPOINT={s.checkpoint}: its model_config is not one train_gpt.py writes "
                             f"({str(e).split('; ')[0]}); re-export it with train_gpt.py") from None
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError, ZeroDivisionError) as e:
        raise InputError(f"CHECKPOINT={s.checkpoint}: the artifact header does not describe its tensors and model "
                         f"({type(e).__name__}: {str(e).splitlines()[0]}); re-export it with train_gpt.py") from None
    # the precision training scored the artifact in (AUTOCAST_BF16=auto): the training log's figure, reproduced
    rt = train_gpt.init_runtime(s, (cfg.model_dim, cfg.mlp_mult * cfg.model_dim), artifact.meta.get("precision"))
    try:
        sp = train_gpt.load_tokenizer(s.tokenizer_path, cfg.vocab_size, vocab_label="the artifact's vocabulary of ")
    except InputError as e:  # VOCAB_SIZE changes nothing here: the artifact's vocabulary decides
        v = cfg.vocab_size
        raise InputError(f"CHECKPOINT={s.checkpoint} was trained with a {v}-token vocabulary, but "
                         f"{str(e).split('; ')[0]}; point TOKENIZER_PATH at the {v}-token tokenizer the run used and "
                         f"DATA_PATH at its shards (e.g. ./data/tokenizers/fineweb_{v}_bpe.model and "
                         f"./data/datasets/fineweb10B_sp{v}, or data/prepare.py --vocab-size {v})") from None
    model = model_from_artifact(artifact, s.checkpoint, rt.device)
    if rt.compile:
        model = train_gpt.compile_model(model, rt.compile_backend)
    return rt, artifact, model, seq_len, sp


def load_for_scoring(s: EvalSettings) -> ScoredValidation:
    rt, artifact, model, seq_len, sp = load_model(s)
    identity = train_gpt.data_identity(s.data_path, s.tokenizer_path)
    check_same_data(artifact.meta, identity, s)
    tokens = train_gpt.load_validation_tokens(s.data_path, artifact.model_config.vocab_size, seq_len, s.val_max_tokens)
    seq_len = eval_context(s, model, artifact.model_config, seq_len, tokens.numel() - 1)
    carried = sum(len(artifact.extras.get(name, b"")) for name in (*CARRIED_TABLE_NAMES, HINTS_EXTRA_NAME))
    tables = train_gpt.validation_byte_tables(sp, s.data_path, identity, tokens)
    return ScoredValidation(s, rt, artifact, model, seq_len, tokens, tables,
                            Path(s.checkpoint).stat().st_size - carried, data_identity=tuple(identity.items()))


# ----------------------------------------------------------------------------------------------
# What a table entry saves
# At a table position the table's token gets CORRECTION_BOOST added to its logit; the loss that
# follows is closed form (correction_table.boosted_losses): no second pass through the model.
# ----------------------------------------------------------------------------------------------

LN2 = math.log(2)


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
    carried_hints = len(scored.artifact.extras.get(HINTS_EXTRA_NAME, b""))  # in the file, apart from model_bytes
    code = train_gpt.counted_code(s.evaluation, s.ship_code).code_bytes
    return max(ARTIFACT_CAP_BYTES - code - scored.model_bytes - carried_hints, 0)


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
                     table: CorrectionTable | None, table_path: Path | None, row: int | None = None
                     ) -> tuple[float, TableBytes | None, CorrectionTable | None]:
    """(corrected loss sum in nats, the table's bytes, the table). A given table comes decoded; without
    one, one is built from the pass's losses and written to table_path; (base loss, None, None) when
    none is selected.

    log p(table token) comes from the pass: gathered there for a given table; for a built one every
    entry's token is the target the pass scored, so it is that position's -loss. row: the table's row
    of the pass's token_of_interest (None: it was the only one)."""
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
        gathered = base.position_token_logprobs if row is None else base.position_token_logprobs[row]
        logprobs = gathered.numpy()[table.positions]
    corrected = losses.astype(np.float64)
    corrected[table.positions] = boosted_losses(losses[table.positions], logprobs,
                                                table.tokens == scored.targets[table.positions], s.correction_boost)
    return float(corrected.sum()), given, table


# ----------------------------------------------------------------------------------------------
# Legal eval-time methods
# Score-first test-time training (score_first_ttt.py) and the causal hint cache (causal_hints.py):
# no position is scored by anything that has seen its target. They share the scoring pass: a pass
# gathers every position's loss and log p(hint), and the hints tilt whichever model scored it, the
# artifact's or the adapted one. Their modules are imported, and counted, only when used.
# ----------------------------------------------------------------------------------------------


@dataclass
class HintPlan:
    knobs: object  # causal_hints.HintKnobs, read from the artifact
    knob_bytes: int
    hints: object  # causal_hints.Hints for the whole validation stream
    seconds: float


def read_hint_knobs(scored: ScoredValidation):
    """The knobs the builder chose on training text and stored in the artifact, checked before any pass."""
    import causal_hints

    s = scored.settings
    blob = scored.artifact.extras.get(HINTS_EXTRA_NAME)
    if blob is None:
        raise InputError(f"CORRECTION_MODE=causal: CHECKPOINT={s.checkpoint} carries no hint knobs; choose them on "
                         "training text with CORRECTION_MODE=causal python build_correction_table.py and evaluate "
                         "the .with_hints.ptz copy it writes")
    try:
        return causal_hints.decode_knobs(blob), len(blob)
    except ValueError as e:
        raise InputError(f"CHECKPOINT={s.checkpoint}: {e}") from None


def plan_hints(scored: ScoredValidation, knobs=None) -> HintPlan:
    """Every position's hint. Hints depend on the token stream only (each from text before its position),
    so every rank computes the same ones from the whole stream, and 1 and N ranks agree. main() runs this
    on a thread of its own while the graphs compile: it needs the CPU only (numpy releases the GIL)."""
    import causal_hints

    knobs, knob_bytes = knobs or read_hint_knobs(scored)
    t0 = time.perf_counter()
    hints = causal_hints.compute_hints(scored.tokens.numpy(), knobs.orders, knobs.table_bits)
    return HintPlan(knobs, knob_bytes, hints, time.perf_counter() - t0)


def tilted_nats(scored: ScoredValidation, result: train_gpt.EvalResult, row: int, plan: HintPlan) -> float:
    """The pass's loss with each position's distribution tilted towards its hint (closed form)."""
    import causal_hints

    return float(causal_hints.tilted_position_losses(result.position_losses.numpy(),
                                                     result.position_token_logprobs[row].numpy(), plan.hints,
                                                     scored.targets, plan.knobs).sum())


def run_ttt(scored: ScoredValidation, interest: torch.Tensor | None, say, pace=None, deadline: float | None = None,
            clock=time.perf_counter):
    """Score-first TTT over the validation stream; the artifact's weights are restored when it returns."""
    import score_first_ttt

    s, rt = scored.settings, scored.runtime
    if not scored.on_device:
        scored.on_device = (scored.tokens.to(rt.device), scored.byte_tables.to(rt.device))
    marks = set()

    def progress(info: dict) -> None:  # about ten lines over the stream
        decile = 10 * (info["chunk"] + 1) // info["chunks"]
        if decile not in marks:
            marks.add(decile)
            say(f"ttt_progress chunk:{info['chunk'] + 1}/{info['chunks']} adapted:{info['adapted']} "
                f"elapsed:{info['elapsed']:.1f}s")

    if s.ttt_mode == "phased":
        import phased_ttt

        def phase_done(info: dict) -> None:
            say(f"ttt_progress phase:{info['phase']}/{info['phases']} elapsed:{info['elapsed']:.1f}s")

        return phased_ttt.phased_evaluate(scored.model, scored.tokens, scored.byte_tables, scored.seq_len,
                                          s.phased_settings(), device=rt.device, autocast=rt.autocast, rank=rt.rank,
                                          world_size=rt.world_size, token_of_interest=interest, pace=pace,
                                          deadline=deadline, progress=phase_done, clock=clock,
                                          compile_backend=rt.compile_backend if rt.compile else None)
    return score_first_ttt.ttt_evaluate(scored.model, *scored.on_device, scored.seq_len, s.eval_stride,
                                        **s.ttt_kwargs(), device=rt.device, autocast=rt.autocast, rank=rt.rank,
                                        world_size=rt.world_size, token_of_interest=interest, progress=progress,
                                        pace=pace, deadline=deadline, clock=clock)


def encode_ttt_settings(chosen: dict) -> bytes:
    """The carried form: compact JSON of environment names and values."""
    return json.dumps(chosen, separators=(",", ":"), sort_keys=True).encode()


def decode_ttt_settings(blob: bytes, source: str, by_hand=()) -> dict:
    """The carried settings, each checked for its type (those given by hand, which win, are not)."""
    names = {f.name.upper(): type(f.default) for f in dataclasses.fields(EvalSettings) if f.name.startswith("ttt_")}
    try:
        chosen = json.loads(blob)
        if not isinstance(chosen, dict) or not set(chosen) <= set(names):
            raise ValueError(chosen)
    except (ValueError, TypeError):
        raise InputError(f"CHECKPOINT={source}: its TTT settings are damaged; choose them again with "
                         "build_ttt_settings.py") from None
    for k, v in ((k, v) for k, v in chosen.items() if k not in by_hand):  # as strict as the environment's
        kind = names[k]  # 2.7 is no TTT_EPOCHS, true no TTT_LR: JSON keeps the type the builder wrote
        if not (isinstance(v, kind) if kind in (str, bool) else isinstance(v, (int, float)) and not isinstance(v, bool)
                and (kind is float or float(v).is_integer())):
            raise InputError(f"CHECKPOINT={source}: its carried TTT setting {k}={json.dumps(v)} is not a valid "
                             f"{kind.__name__}; give {k} by hand, or choose the settings again with build_ttt_settings.py")
    return {k: v if k in by_hand else names[k](v) for k, v in chosen.items()}


def apply_ttt_settings(scored: ScoredValidation, say, env=None) -> set[str]:
    """TTT's settings as the builder chose them on held-out training text and stored them in the artifact (its
    bytes are in model_bytes), each one given by hand winning and logged as such. Returns the names used."""
    blob = scored.artifact.extras.get(TTT_EXTRA_NAME)
    s = scored.settings
    if blob is None:
        return set()
    if not s.use_ttt:
        say("note ttt_settings:carried # set USE_TTT=1 to run TTT with them")
        return set()
    env = os.environ if env is None else env
    chosen = decode_ttt_settings(blob, s.checkpoint, by_hand=set(env))
    if chosen.get("TTT_MODE", s.ttt_mode) != s.ttt_mode and "TTT_MODE" in env:
        say(f"ttt_settings source:defaults by_hand:TTT_MODE={s.ttt_mode} # the carried settings are for "
            f"TTT_MODE={chosen['TTT_MODE']}: none of them is used")
        return set()
    by_hand = sorted(k for k in chosen if k in env)
    used = {k.lower(): v for k, v in chosen.items() if k not in env}
    scored.settings = dataclasses.replace(s, **used)
    say(f"ttt_settings source:artifact bytes:{len(blob)} " + " ".join(f"{k}:{log_value(v)}" for k, v in used.items())
        + f" by_hand:{','.join(f'{k}={env[k]}' for k in by_hand) or 'none'} # chosen on held-out training text by "
        "build_ttt_settings.py; a setting given by hand wins")
    return {k.upper() for k in used}


def check_ttt_early(scored: ScoredValidation, carried=frozenset()) -> list[str]:
    """Bad TTT settings stop the run before the base pass, not after it; a carried one (apply_ttt_settings) that
    fails is named with the artifact. Returns note lines: what TTT will do instead of what was asked."""
    if not scored.settings.use_ttt:
        return []
    try:
        return check_ttt_stream(scored.settings, scored.tokens, scored.seq_len, "validation stream")
    except InputError as e:
        name = str(e).split("=")[0]
        if name not in carried:
            raise
        raise InputError(f"CHECKPOINT={scored.settings.checkpoint}: its carried TTT setting {str(e).split('; ')[0]}; "
                         f"give {name} by hand, or choose the settings again with build_ttt_settings.py") from None


def check_ttt_stream(s: EvalSettings, tokens: torch.Tensor, seq_len: int, stream: str) -> list[str]:
    """TTT's settings against the stream it will run over (the validation stream, or the builder's training slice):
    ranges, then what would do nothing there (one chunk that is never trained on, phases with no documents)."""
    import score_first_ttt

    if s.ttt_mode not in TTT_MODES:
        raise InputError(f"TTT_MODE={s.ttt_mode} is not one of {', '.join(TTT_MODES)}; set TTT_MODE=full")
    if s.ttt_mode == "phased":
        import phased_ttt

        s.phased_settings().check(seq_len)
        return phased_ttt.check_phases(tokens.numpy(), s.phased_settings(), stream)
    score_first_ttt.check_ttt_settings(seq_len=seq_len, stride=s.eval_stride, **s.ttt_kwargs())
    targets = tokens.numel() - 1
    chunks = score_first_ttt.chunk_plan(targets, seq_len, s.eval_stride, s.ttt_chunk_tokens).num_chunks
    if chunks < 2:  # one chunk, the last, which is never trained on: TTT would do nothing
        raise InputError(f"TTT_CHUNK_TOKENS={s.ttt_chunk_tokens} holds the whole {targets}-token {stream} in one "
                         f"chunk, which is scored and never trained on; set it below {targets}, e.g. "
                         f"TTT_CHUNK_TOKENS={max(seq_len, targets // 8)}")
    return []


def check_scripts_present(s: EvalSettings) -> None:
    """The scripts the asked evaluation imports are beside this one: a code_bundle.py (code_size.code_bundle) holds
    only those of the evaluation it was made for, and says so here rather than in a traceback."""
    missing = [p.name for p in code_paths(s) if not p.is_file()]
    if not missing:
        return
    here = Path(train_gpt.__file__).resolve().parent
    held = max((k for k, names in train_gpt.EVALUATION_CODE.items() if all((here / n).is_file() for n in names)),
               key=lambda k: len(train_gpt.EVALUATION_CODE[k]), default="no")
    asked = " ".join(n for n, on in (("USE_TTT=1", s.use_ttt), ("USE_CORRECTION=1 CORRECTION_MODE=causal", s.causal)) if on)
    bundle = "the code_bundle.py running this was made for" if here.name.startswith("code_bundle_") else "this folder holds"
    raise InputError(f"{asked} runs the {s.evaluation} evaluation, which imports {', '.join(missing)}: {bundle} the "
                     f"{held} evaluation only; run the readable scripts, or make the bundle for it: set "
                     f"EXPORT_FOR_EVAL={s.evaluation} in training and give records/make_record.py the {s.evaluation} evaluation's "
                     "log (--eval-logs or --code-logs), whose code it bundles")


def code_paths(s: EvalSettings | None = None) -> list[Path]:
    """The scripts an evaluation runs, all counted against the cap (train_gpt.EVALUATION_CODE): a legal
    method's module only when used."""
    here = Path(train_gpt.__file__).resolve().parent
    return [here / name for name in train_gpt.EVALUATION_CODE[s.evaluation if s is not None else "base"]]


# ----------------------------------------------------------------------------------------------
# The budget
# The challenge gives an evaluation 10 minutes on 8xH100 and rejects one that runs longer. Before any
# validation token is scored, every graph the run needs is compiled on random tokens and timed, and
# the run is planned from those rates (one time_plan line). TTT's pass scores every position itself,
# so when the plan does not fit with the separate base pass, that pass is skipped (the artifact's own
# score is the training log's final line); during TTT, adaptation stops while the rest can still be
# scored in time. The guard drops adaptation, never scoring: every position is scored exactly once.
# ----------------------------------------------------------------------------------------------

FINISH_RESERVE_FRACTION, FINISH_RESERVE_MAX_S = 0.025, 15.0  # kept after TTT for the figures that follow it


@dataclass
class EvalPlan:
    budget_s: float  # 0: no budget
    started: float  # the run's start, on the budget's clock
    elapsed_s: float  # when the plan was made (loading, warm-up)
    warmup_s: float
    score_batch_s: float  # one scoring forward, compiled
    base_s: float  # projected: the base pass
    ttt_score_s: float  # projected: TTT's scoring, and its training at the warm-up's pace
    ttt_train_s: float
    base_pass: bool
    pace: object = None  # score_first_ttt.Pace, with TTT

    @property
    def reserve_s(self) -> float:
        return min(FINISH_RESERVE_MAX_S, FINISH_RESERVE_FRACTION * self.budget_s)

    @property
    def projected_s(self) -> float:
        return self.elapsed_s + self.base_s * self.base_pass + self.ttt_score_s + self.ttt_train_s

    @property
    def ttt_deadline(self) -> float | None:
        return self.started + self.budget_s - self.reserve_s if self.budget_s else None

    def line(self) -> str:
        fits = "none" if not self.budget_s else int(self.projected_s + self.reserve_s <= self.budget_s)
        return (f"time_plan budget_s:{self.budget_s:g} elapsed_s:{self.elapsed_s:.1f} warmup_s:{self.warmup_s:.1f} "
                f"score_batch_ms:{1000 * self.score_batch_s:.1f} "
                f"train_step_ms:{1000 * (self.pace.train_step_s if self.pace else 0):.1f} base_pass_s:{self.base_s:.1f} "
                f"ttt_score_s:{self.ttt_score_s:.1f} ttt_train_s:{self.ttt_train_s:.1f} "
                f"projected_s:{self.projected_s:.1f} reserve_s:{self.reserve_s:.1f} "
                f"base_pass:{'run' if self.base_pass else 'skipped'} fits:{fits} # rates measured on random tokens "
                "after compiling; hints on a thread beside them")


def time_scoring_forward(scored: ScoredValidation, batch: int, clock) -> float:
    """Compiles the scoring forward for `batch` windows on random tokens (never validation tokens), shaped
    as evaluate() shapes them, and returns the seconds of its second run."""
    rt = scored.runtime
    gen = torch.Generator().manual_seed(0)
    windows = torch.randint(0, scored.artifact.model_config.vocab_size, (batch, scored.seq_len + 1), generator=gen)
    x = windows.to(rt.device)[:, :-1]  # a view, as evaluate's windows are: the same graph
    scored.model.eval()
    seconds = 0.0
    for _ in range(2):
        t0 = clock()
        with torch.no_grad(), torch.autocast(device_type=rt.device.type, dtype=torch.bfloat16, enabled=rt.autocast):
            scored.model(x).float().sum().item()
        seconds = clock() - t0
    return seconds


def plan_evaluation(scored: ScoredValidation, budget_s: float, started: float, clock, base_required: bool,
                    hints_job=None) -> EvalPlan:
    """Compiles and times every graph, projects each part, and decides whether the base pass runs; the
    hints (hints_job, computed on a thread meanwhile) are waited for first, so the plan counts their time."""
    s, rt = scored.settings, scored.runtime
    t0 = clock()
    starts = train_gpt.window_plan(scored.tokens.numel() - 1, scored.seq_len, s.eval_stride)[0]
    batch = train_gpt.scoring_batch(len(starts), s.eval_batch_seqs, rt.world_size)
    mine = len(starts) * (rt.rank + 1) // rt.world_size - len(starts) * rt.rank // rt.world_size
    score_batch_s = time_scoring_forward(scored, batch, clock)
    parts = [score_batch_s * -(-mine // batch), 0.0, 0.0]  # base pass, TTT scoring, TTT training
    pace = None
    if s.use_ttt and s.ttt_mode == "phased":
        import phased_ttt

        ps = s.phased_settings()
        pace = phased_ttt.warm_up(scored.model, scored.seq_len, ps, device=rt.device, autocast=rt.autocast,
                                  world_size=rt.world_size, clock=clock,
                                  compile_backend=rt.compile_backend if rt.compile else None)
        # this rank's forwards at each window length, at their measured cost, and the global steps
        parts[1:] = phased_ttt.planned_seconds(scored.tokens.numpy(), ps, scored.seq_len, pace, rt.rank,
                                               rt.world_size)
    elif s.use_ttt:
        import score_first_ttt

        k = s.ttt_kwargs()
        chunks = score_first_ttt.chunk_plan(scored.tokens.numel() - 1, scored.seq_len, s.eval_stride, k["chunk_tokens"])
        load = score_first_ttt.workload(chunks, scored.seq_len, k["epochs"], k["batch_seqs"], k["eval_batch_seqs"],
                                        rt.rank, rt.world_size)
        pace = score_first_ttt.warm_up(scored.model, load, scored.seq_len, mode=k["mode"], params=k["params"],
                                       rank_r=k["rank_r"], lora_alpha=k["lora_alpha"], device=rt.device,
                                       autocast=rt.autocast, world_size=rt.world_size, clip=k["clip"], clock=clock)
        parts[1:] = [pace.score_batch_s * int(load.score_batches.sum()), pace.train_step_s * int(load.train_steps.sum())]
    warmup_s = clock() - t0
    if hints_job is not None:
        hints_job.result()  # the hints' time beyond the warm-up's is spent before any pass: in elapsed_s
    figures = torch.tensor([*parts, clock() - started], dtype=torch.float64, device=rt.device)
    if rt.world_size > 1:  # every rank plans with the slowest rank's figures: they decide alike
        dist.all_reduce(figures, op=dist.ReduceOp.MAX)
    base_s, ttt_score_s, ttt_train_s, elapsed_s = figures.tolist()
    plan = EvalPlan(budget_s, started, elapsed_s, warmup_s, score_batch_s, base_s, ttt_score_s, ttt_train_s, True, pace)
    # the base pass is dropped only where TTT scores every position and nothing else needs the base pass
    if s.use_ttt and not base_required and budget_s and plan.projected_s + plan.reserve_s > budget_s:
        plan.base_pass = False
    return plan


def budget_line(plan: EvalPlan, ttt, clock) -> str:
    """What the run spent against its budget, and what the guard dropped to stay inside it."""
    used = clock() - plan.started
    dropped = ([] if plan.base_pass else ["base_pass"]) + (
        [f"ttt_adaptation_from_chunk:{ttt.stopped_at_chunk}/{ttt.chunks}"]
        if ttt is not None and ttt.stopped_at_chunk is not None else [])
    within = "none" if not plan.budget_s else int(used <= plan.budget_s)
    return (f"time_budget budget_s:{plan.budget_s:g} used_s:{used:.1f} planned_s:{plan.projected_s:.1f} "
            f"within:{within} dropped:{','.join(dropped) or 'none'} # every position scored exactly once; the guard "
            "drops adaptation or the separate base pass, never scoring")


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


def artifact_decides(artifact: train_gpt.Artifact, env=None) -> list[str]:
    """Training settings in the environment (a run's and its evaluation's often share one) that the artifact decides
    here: each whose value differs from the artifact's gets a note line, not silence."""
    env = os.environ if env is None else env
    decided = {**dataclasses.asdict(artifact.model_config), "train_seq_len": artifact.meta["train_seq_len"]}
    notes = []
    for name, value in decided.items():
        given = env.get(name.upper())
        try:
            differs = given is not None and train_gpt.parse_setting(name.upper(), given, type(value)) != value
        except InputError:
            differs = True
        if differs:
            notes.append(f"note unused:{name.upper()}={log_value(given)} artifact:{log_value(value)} # the artifact's "
                         "model decides (EVAL_SEQ_LEN sets another window)")
    return notes


def check_finite(tag: str, bpb: float, fix: str) -> None:
    """A score that is not a number is never printed as a result: the run stops with the setting to change."""
    if not math.isfinite(bpb):
        raise InputError(f"{tag}: the score is {bpb}, which is not a result; {fix}")


def report_legal(scored: ScoredValidation, base: train_gpt.EvalResult | None, eval_ms: float, hint_row: int | None,
                 hint_plan: HintPlan | None, say, plan: "EvalPlan | None" = None, clock=time.perf_counter):
    """The legal figures, each beside the base score: causal hints on the base pass, score-first TTT,
    and the hints on the TTT pass. base is None when the budget skipped the base pass: TTT's pass then
    scores every position (the submission's figure) and the base figure is the training log's.
    Returns the TTT result, if TTT ran."""
    s = scored.settings

    def bpb_line(tag: str, nats: float, ms: float, comment: str, counts: train_gpt.EvalResult) -> None:
        bpb = nats / LN2 / counts.byte_count
        check_finite(tag, bpb, "lower TTT_LR or set TTT_GRAD_CLIP=1" if "ttt" in tag else "re-export the artifact")
        against = (f"base_val_bpb:{base.val_bpb:.8f} gain_bpb:{base.val_bpb - bpb:.8f}" if base is not None else
                   "base_val_bpb:skipped gain_bpb:unmeasured")
        say(f"{tag} val_loss:{nats / counts.token_count:.8f} val_bpb:{bpb:.8f} eval_time:{ms:.0f}ms {against} "
            f"precision:{scored.runtime.precision} # {comment}")

    if hint_plan is not None:
        hints = hint_plan.hints
        right = hints.has_hint & (hints.hint == scored.targets)
        say(f"hints knob_bytes:{hint_plan.knob_bytes} orders:{','.join(map(str, hint_plan.knobs.orders))} "
            f"table_bits:{hint_plan.knobs.table_bits} hinted:{hints.has_hint.mean():.4f} "
            f"right:{right.sum() / max(hints.has_hint.sum(), 1):.4f} hint_time:{1000 * hint_plan.seconds:.0f}ms "
            "# knobs chosen on training text by the builder; each hint from text before its position; computed "
            "on a thread while the graphs compiled")
    if hint_plan is not None and base is not None:
        t0 = time.perf_counter()
        nats = tilted_nats(scored, base, hint_row, hint_plan)
        bpb_line("eval_causal", nats, eval_ms + 1000 * (hint_plan.seconds + time.perf_counter() - t0),
                 "legal: score-first causal hints tilt the artifact's model, normalized over the vocabulary", base)
    if not s.use_ttt:
        return None
    t0 = time.perf_counter()
    hints = None if hint_plan is None else torch.from_numpy(hint_plan.hints.hint.astype(np.int64))[None]
    ttt = run_ttt(scored, hints, say, pace=None if plan is None else plan.pace,
                  deadline=None if plan is None else plan.ttt_deadline, clock=clock)  # hints: its one row of interest
    if base is not None:
        assert (ttt.scores.token_count, ttt.scores.byte_count) == (base.token_count, base.byte_count)
    ttt_ms = 1000 * (time.perf_counter() - t0)
    if ttt.diverged_at_chunk is not None:
        say(f"ttt_diverged chunk:{ttt.diverged_at_chunk}/{ttt.chunks} ttt_lr:{s.ttt_lr} "
            f"ttt_grad_clip:{s.ttt_grad_clip} # training on that chunk made a weight non-finite: undone, adaptation "
            "stopped, the rest scored with the weights before it; lower TTT_LR or set TTT_GRAD_CLIP=1")
    bpb_line("eval_ttt", ttt.scores.loss_sum, ttt_ms, "legal: score-first test-time training, each chunk "
             "scored before it is trained on", ttt.scores)
    if ttt.mode == "phased":
        say(f"ttt mode:phased {ttt.summary()} lr:{s.ttt_lr} rank:{s.ttt_rank} global_lr:{s.ttt_global_lr} "
            f"epochs:{s.ttt_epochs} momentum:{s.ttt_momentum} time:{ttt_ms:.0f}ms "
            f"time_vs_base:{f'{ttt_ms / eval_ms:.2f}' if base is not None else 'skipped'} {ttt.stop_note()}")
    else:
        say(f"ttt mode:{ttt.mode} chunks:{ttt.chunks} chunk_tokens:{ttt.chunk_tokens} chunks_adapted:"
            f"{ttt.chunks_adapted} epochs:{s.ttt_epochs} steps:{ttt.train_steps} lr:{s.ttt_lr} "
            f"momentum:{s.ttt_momentum} optimizer:{s.ttt_optimizer} schedule:{s.ttt_schedule} "
            f"params:{s.ttt_params if ttt.mode == 'full' else f'lora_rank_{s.ttt_rank}'} "
            f"adapted_parameters:{ttt.adapted_parameters} score_time:{1000 * ttt.score_seconds:.0f}ms "
            f"train_time:{1000 * ttt.train_seconds:.0f}ms time:{ttt_ms:.0f}ms "
            f"time_vs_base:{f'{ttt_ms / eval_ms:.2f}' if base is not None else 'skipped'} {ttt.stop_note()}")
    if hint_plan is not None:
        nats = tilted_nats(scored, ttt.scores, 0, hint_plan)
        bpb_line("eval_ttt_causal", nats, ttt_ms + 1000 * hint_plan.seconds,
                 "legal: causal hints tilt the score-first TTT model", ttt.scores)
    return ttt


def report_table(scored: ScoredValidation, base: train_gpt.EvalResult, given: TableBytes | None,
                 table: CorrectionTable | None, table_path: Path | None, table_note: str, table_row: int | None,
                 say) -> int:
    """The val-derived figures (a given table, or one built from this pass); returns the table's bytes."""
    s = scored.settings
    t0 = time.perf_counter()
    corrected_nats, given, table = apply_correction(scored, base, given, table, table_path, table_row)
    if table is None:
        say(no_table_line(s))
        return 0
    table_ms = 1000 * (time.perf_counter() - t0)
    table_bytes = len(given.blob)
    say(f"correction source:{log_value(given.source)} carried:{int(given.carried)} entries:{table.positions.size} "
        f"table_bytes:{table_bytes} bytes_per_entry:{table_bytes / max(table.positions.size, 1):.3f} "
        f"format:{table.fmt} select:{s.correction_select} boost:{s.correction_boost} time:{table_ms:.0f}ms"
        + (f" written:{log_value(table_note)}" if table_path is not None and given.source == str(table_path) else ""))
    say(f"eval_corrected_valderived val_loss:{corrected_nats / base.token_count:.8f} "
        f"val_bpb:{corrected_nats / LN2 / base.byte_count:.8f} precision:{scored.runtime.precision} # val-derived: the table was made from validation text")
    two_part = (corrected_nats / LN2 + 8 * table_bytes) / base.byte_count
    say(f"eval_two_part val_bpb:{two_part:.8f} base_val_bpb:{base.val_bpb:.8f} precision:{scored.runtime.precision} "
        "# corrected bits + 8 x table bytes, "
        "per validation byte")
    return table_bytes


def main(started: float | None = None, clock=time.perf_counter) -> None:
    """started: the run's start on `clock` (EVAL_MAX_SECONDS counts from it); clock: tests inject one."""
    started = clock() if started is None else started
    s = EvalSettings.from_env()
    s.check_evaluation()
    building = s.use_correction and not s.causal and not s.correction_table  # a val-derived table, built here
    table_path, table_note = s.choose_table_path() if building else (None, "")
    scored = load_for_scoring(s)
    rt = scored.runtime
    budget_s = s.budget_seconds(rt.device)
    log_path = log_path_for(s.checkpoint)
    say = train_gpt.Logger(log_path if rt.is_main else None)
    if log_path.parent.parent != Path(s.checkpoint).parent:
        say(f"note log:{log_value(log_path)} # {Path(s.checkpoint).parent} cannot be written")
    meta = scored.artifact.meta
    say(f"run {train_gpt.library_versions()} world_size:{rt.world_size} device:{rt.device} compile:{int(rt.compile)} "
        f"precision:{rt.precision} {rt.precision_probe or 'precision_from:setting'}")
    say.code(*code_paths(s))  # the log carries the code that scored, as the training log does
    say(s.log_line() + f" seed:{meta.get('seed')} run_id:{log_value(meta.get('run_id'))} seq_len:{scored.seq_len} "
        f"recipe:{meta.get('recipe', 'none')} {train_gpt.order_fields(scored.artifact.model_config)}")  # the artifact's order of layers, as trained
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

    for line in artifact_decides(scored.artifact):
        say(line)
    if HINTS_EXTRA_NAME in scored.artifact.extras and not s.causal:
        say("note hint_knobs:carried # set USE_CORRECTION=1 CORRECTION_MODE=causal to apply them")

    # refused before the pass, not after: a bad table, missing knobs, bad TTT settings
    given = given_table(scored)
    table = decode_for(scored, given) if given is not None else None
    if table is not None and not table.fingerprint:
        say(f"warning table:{log_value(given.source)} verified:0 # the seed's CRDT format carries no fingerprint: "
            "not checked against this validation data")
    for line in check_ttt_early(scored, apply_ttt_settings(scored, say)):
        say(line)
    knobs = read_hint_knobs(scored) if s.causal else None
    valderived = given is not None or building
    # the hints (a minute of CPU on the full stream) are computed while the graphs compile and are timed
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="causal-hints") as pool:
        hints_job = pool.submit(plan_hints, scored, knobs) if knobs is not None else None
        plan = plan_evaluation(scored, budget_s, started, clock, base_required=valderived, hints_job=hints_job)
        say(plan.line())
        hint_plan = hints_job.result() if hints_job is not None else None
    rows = {}  # token_of_interest rows: log p(table token) and log p(hint) from the same pass
    if table is not None:
        rows["table"] = torch.full((scored.tokens.numel() - 1,), -1, dtype=torch.int64)
        rows["table"][torch.from_numpy(table.positions)] = torch.from_numpy(table.tokens).long()
    if hint_plan is not None:
        rows["hints"] = torch.from_numpy(hint_plan.hints.hint.astype(np.int64))
    interest = torch.stack(list(rows.values())) if rows else None
    row = {name: i for i, name in enumerate(rows)}

    base, eval_ms = None, 0.0
    if plan.base_pass:
        t0 = time.perf_counter()
        base = scored.evaluate(keep_positions=valderived or hint_plan is not None, token_of_interest=interest)
        eval_ms = 1000 * (time.perf_counter() - t0)
        check_finite("eval_base", base.val_bpb, f"CHECKPOINT={s.checkpoint} holds non-finite weights; re-export it")
        say(f"eval_base val_loss:{base.val_loss:.8f} val_bpb:{base.val_bpb:.8f} eval_time:{eval_ms:.0f}ms "
            f"stride:{s.eval_stride} tokens:{base.token_count} bytes:{base.byte_count} precision:{rt.precision}")
    else:
        say(f"eval_base skipped:budget projected_s:{plan.base_s:.1f} # the TTT pass below scores every position; the "
            "artifact's own score is the training log's final_int6_zstd_roundtrip_exact line")

    ttt = report_legal(scored, base, eval_ms, row.get("hints"), hint_plan, say, plan, clock)
    table_bytes = report_table(scored, base, given, table, table_path, table_note, row.get("table"), say) \
        if valderived else 0
    counted = train_gpt.counted_code(s.evaluation, s.ship_code)
    hint_bytes = len(scored.artifact.extras.get(HINTS_EXTRA_NAME, b""))  # in the file, used or not
    total = counted.code_bytes + scored.model_bytes + table_bytes + hint_bytes  # carried bytes: counted once
    say(f"artifact_total eval_code_bytes:{counted.code_bytes} model_bytes:{scored.model_bytes} table_bytes:{table_bytes} "
        f"hint_bytes:{hint_bytes} total_bytes:{total} cap_bytes:{ARTIFACT_CAP_BYTES} "
        f"headroom_bytes:{ARTIFACT_CAP_BYTES - total} counted_for:{counted.evaluation} shipped_as:{counted.ship} "
        f"raw_code_bytes:{counted.raw_bytes}" + ("" if total <= ARTIFACT_CAP_BYTES else " over_cap:1"))
    if rt.compile:
        functions = [train_gpt.GPT.forward]
        if s.use_ttt and s.ttt_mode == "phased":  # the documents' forwards, compiled apart (phased_ttt.lora_forward)
            import phased_ttt

            functions.append(phased_ttt._lora_forward)
        say(f"compile {train_gpt.compiled_graphs(*functions)} limit_per_function:"
            f"{train_gpt.COMPILE_RECOMPILE_LIMIT}")
    say(budget_line(plan, ttt, clock))


if __name__ == "__main__":
    train_gpt.run_main(lambda: main(STARTED), "eval_final.py", CorrectionTableError)
