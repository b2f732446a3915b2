"""
train_gpt.py: 11 layers, 3x MLP, SmearGate and BigramHash, trained with Muon/AdamW,
STE int6 quantization-aware training and SWA, exported as an int6 + zstd artifact.

    torchrun --standalone --nproc_per_node=8 train_gpt.py     # one 8-GPU node
    python train_gpt.py                                       # one process, CPU or GPU

Every setting is an environment variable (see Settings). Sections, in the order a run uses them:
settings, errors and files, machine, model, quantization and the artifact, optimizer, evaluation,
training; the data, the tokenizer and bits per byte are token_data.py's (re-exported here).
eval_final.py and build_correction_table.py import from here rather than repeating any of it.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import os
import platform
import resource
import sys
import time
import uuid
from dataclasses import dataclass, fields
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch._dynamo
import torch._dynamo.utils
import torch._inductor.config
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

import allocation
import artifact
import code_size
import quantize
import run_files
import token_data
from artifact import (ARTIFACT_MAGIC, ARTIFACT_NAME, ARTIFACT_PREFIX, ARTIFACT_VERSION,  # noqa: F401
                      READABLE_ARTIFACT_VERSIONS, artifact_parts, assemble_artifact, pack_artifact, replace_extras)
from code_size import (BUNDLE_NAME, EVALUATION_CODE, HINT_KNOBS_RESERVE_BYTES, SHIP_CODE, CountedCode,  # noqa: F401
                       code_bundle, code_bytes, counted_code)
from quantize import (EXPORT_LADDER, MIXED_QUANT_RUNG, TIED_EMBEDDING_NAME, Calibration, ExportRung,  # noqa: F401
                      Quantized, dequantize_rows, fake_quantize, is_quantized_matrix, quantize_rows, tensor_bits)
from token_data import (build_byte_tables, ByteTables, CASE_MARKERS, data_identity, DistributedTokenLoader,  # noqa: F401
                        is_case_ops_tokenizer, list_shards, load_data_shard, load_tokenizer, load_validation_tokens,
                        MANIFEST_NAME, PLAIN_TOKENIZATION, read_shard_header, SHARD_HEADER_BYTES, SHARD_HEADER_INTS,
                        SHARD_MAGIC, SHARD_TOKEN_DTYPE, SHARD_VERSION, TokenStream, VAL_BYTES_NAME,
                        validation_byte_tables, write_data_shard)
from run_files import (InputError, Logger, atomic_write_bytes, check_writable, claim_output_dir,  # noqa: F401
                       file_sha256, log_value, release_output_dir, write_artifact)

# ----------------------------------------------------------------------------------------------
# Settings
# One home for every knob: a typed default here, overridable by the upper-cased environment
# variable of the same name. The resolved settings are logged once at the start of a run.

ARTIFACT_CAP_BYTES = 16_000_000  # the challenge's limit: compressed model + code, decimal bytes

class EnvSettings:
    """Settings read from the environment: each field's upper-cased name, parsed as its default's type, and the
    seed's names for them (SEED_SETTINGS). seed_scope: the script whose refusals in SEED_SETTINGS apply."""
    seed_scope, seed_notes = "", ()  # seed_notes: a log line for each of the seed's names read as ours
    @classmethod
    def from_env(cls, env=None, scope: str = ""):
        env, ours = os.environ if env is None else env, {f.name.upper(): f for f in fields(cls)}
        check_spelling(env, set(ours))
        values = {f.name: parse_setting(name, env[name], type(f.default)) for name, f in ours.items() if name in env}
        notes = []
        for name, (where, what, detail) in SEED_SETTINGS.items():
            if name in env and where == "alias" and what.upper() in ours:
                value = parse_setting(name, env[name], type(ours[what.upper()].default))
                value = value * detail if detail != 1 else value
                if values.setdefault(what, value) != value:
                    raise InputError(f"{name}={env[name]} and {what.upper()}={env[what.upper()]} are one setting (the "
                                     "seed's name and ours); set only one of them")
                notes.append(f"seed_alias name:{name} value:{log_value(env[name])} setting:{what.upper()} "
                             f"setting_value:{log_value(value)} # the seed's name for one of ours")
            elif name in env and where == (scope or cls.seed_scope) and (
                    what is None or parse_setting(name, env[name], type(what)) != what):
                raise InputError(f"{name}={env[name]} is refused: {detail}")
        object.__setattr__(settings := cls(**values), "seed_notes", tuple(notes))
        return settings
    def log_line(self, tag: str = "settings") -> str:
        return tag + " " + " ".join(f"{k}:{log_value(v)}" for k, v in dataclasses.asdict(self).items())

@dataclass(frozen=True)
class Settings(EnvSettings):
    seed_scope, recipe_notes = "train", ()  # recipe_notes: RECIPE's lines, one per setting it fills or a hand one wins
    @classmethod
    def from_env(cls, env=None, scope: str = ""):
        env = os.environ if env is None else env
        if env.get("RECIPE", "none").strip() in ("", "none"):
            return super().from_env(env, scope)
        import recipes  # training's alone: the artifact records what it chose, so no evaluation imports it
        filled, notes = recipes.fill(env, SEED_SETTINGS)
        object.__setattr__(settings := super().from_env(filled, scope), "recipe_notes", tuple(notes))
        return settings
    recipe: str = "none"  # a preset (recipes.py, docs/frontier_recipe.md) filling every setting not given by hand
    # data and run identity
    data_path: str = "./data/datasets/fineweb10B_sp1024"
    tokenizer_path: str = "./data/tokenizers/fineweb_1024_bpe.model"
    run_id: str = ""  # empty: a fresh uuid
    output_dir: str = "."  # the artifact and logs/RUN_ID.txt go here
    seed: int = 1337
    val_max_tokens: int = 0  # 0: the whole validation stream; otherwise its first N tokens
    # schedule
    iterations: int = 20000
    warmdown_iters: int = 3000
    warmdown_frac: float = 0.0  # >0: the warm-down is this last fraction of progress (steps or clock), not WARMDOWN_ITERS
    lr_floor: float = 0.0  # the learning-rate scale's floor in the warm-down (#1855: 0.1)
    warmup_steps: int = 20  # compile-warming steps, undone before training starts
    max_wallclock_seconds: float = 600.0  # 0: no cap
    train_batch_tokens: int = 786_432
    train_seq_len: int = 2048
    grad_accum_steps: int = 0  # 0: 8 // world size, as the challenge does
    val_loss_every: int = 1000  # 0: validate only at the end
    val_batch_size: int = 524_288  # tokens per validation batch, all ranks together
    train_log_every: int = 200
    # model (SPEC section 6)
    vocab_size: int = 1024
    num_layers: int = 11
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: int = 3
    rope_base: float = 10000.0
    logit_softcap: float = 30.0
    qk_gain_init: float = 1.5
    tied_embed_init_std: float = 0.005
    bigram_vocab_size: int = 4096
    bigram_dim: int = 128
    bigram_scale_init: float = 0.05
    # the frontier's recipe changes (docs/recipe.md, measured): each names what it does; the
    # value given here is the default the measurements chose, the other one the change or its absence
    mlp_leaky_slope: float = 0.5  # the MLP's activation is leaky_relu(x, slope)^2; 0: relu^2
    xsa_last_layers: int = 0  # exclusive self-attention in the last N virtual layers (N >= their count: all); 0: none
    rope_dims: int = 0  # how many of each head's dims RoPE rotates (partial RoPE: the first ones); 0: all
    layer_norm_scale: bool = False  # each layer's normed inputs scaled by 1/sqrt(virtual layer index + 1)
    attn_output_gate: bool = False  # each head's attention output times sigmoid(a linear map of the block's input)
    value_residual_alpha: float = 1.0  # later blocks' values: alpha V + (1 - alpha) V of the first block; 1: off
    parallel_residual_start: int = -1  # two residual lanes (attention's, the MLP's) from this physical layer on; -1: one
    # depth recurrence (docs/depth_recurrence.md): blocks LOOP_START..LOOP_END (inclusive) run NUM_LOOPS more times
    num_loops: int = 0  # passes beyond the first, as the records count them (the seed's NUM_LOOPS=1 is 0 here); 0: off
    loop_start: int = 0
    loop_end: int = -1  # -1: no span (NUM_LOOPS needs one)
    enable_looping_at: float = 0.0  # training progress at which the looped order replaces the plain one
    # optimizers (SPEC section 7)
    matrix_lr: float = 0.025
    scalar_lr: float = 0.025
    tied_embed_lr: float = 0.035
    muon_momentum: float = 0.99
    muon_momentum_warmup_start: float = 0.92
    muon_momentum_warmup_steps: int = 1500
    muon_backend_steps: int = 5
    muon_weight_decay: float = 0.04
    adam_weight_decay: float = 0.04
    embed_weight_decay: float = -1.0  # the embeddings' own AdamW decay; -1: ADAM_WEIGHT_DECAY's
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip_norm: float = 0.3  # 0: no clipping
    bpb_loss_alpha: float = 0.0  # the seed's: loss = (1 - a) CE + a byte-weighted CE (byte_loss_weights); 0: plain CE
    # quantization-aware training and weight averaging
    qat_enabled: bool = True
    qat_start_frac: float = 0.75  # of training progress (steps or wall clock, whichever is further)
    swa_enabled: bool = True
    swa_every: int = 50
    swa_start_frac: float = 0.5  # snapshots once the learning-rate scale is below this
    ema_decay: float = 0.0  # 0: off; else an every-step moving average of the weights is exported (SWA averages it)
    ema_horizon: float = 0.0  # >0: the EMA on, its time constant this fraction of the run's steps; replaces EMA_DECAY
    # evaluation and export
    eval_stride: int = 64  # 0: standard non-overlapping windows for the final score
    eval_batch_seqs: int = 32
    zstd_level: int = 22
    use_mixed_quant: bool = False  # the seed's: MLP matrices int5 (trained so by QAT), attention int6
    artifact_cap_bytes: int = ARTIFACT_CAP_BYTES  # lower it to see the export ladder step down
    export_for_eval: str = "legal"  # whose code the export counts beside the model: EVALUATION_CODE's keys
    ship_code: str = "bundle"  # bundle: the code counts as one xz-compressed script (code_bundle); raw: as the files
    export_allocation: str = "ladder"  # ladder: EXPORT_LADDER's rungs; rd: each group's grid by rate, output error and loss sensitivity (docs/export.md: wins below int6; at it, not shown)
    export_quantizer: str = "gptq"  # gptq: Hessian-aware rounding onto QAT's grid (docs/quantization.md: measured); rtn: to nearest
    gptq_calibration_tokens: int = 65_536  # training tokens whose layer inputs give GPTQ and LQER their Hessians
    gptq_reserve_seconds: float = 10.0  # of MAX_WALLCLOCK_SECONDS kept for calibration, rd's sensitivities, GPTQ and LQER (docs/export.md: 8xH100)
    lqer_rank: int = 4  # rank of each low-rank correction of the quantization error
    lqer_tensors: int = 0  # how many tensors get one (those where it removes the most output error per byte); 0: off
    lqer_factor_bits: int = 8  # the factors' storage: 4, 5, 6 or 8 (per-row integers) or 16 (fp16)
    # machine
    device: str = "auto"  # auto: cuda when available, else cpu
    compile: str = "auto"  # auto: on for cuda, off for cpu; 1 or 0 to force
    compile_backend: str = "inductor"  # eager or aot_eager: the same graphs without code generation (debugging)
    autocast_bf16: str = "auto"  # auto: on for cuda; on the cpu, on where a measured bf16 matmul is clearly faster
    cpu_precision_probe: str = "measure"  # what AUTOCAST_BF16=auto's probe answers on the cpu: measure, bf16 or fp32

def parse_setting(name: str, raw: str, kind: type):
    text = raw.strip()
    try:
        if kind is bool:
            return {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False,
                    "off": False}[text.lower()]
        if kind is int:
            number = float(text)  # accepts 786432 as well as 7.86432e5
            if not number.is_integer():
                raise ValueError(text)
            return int(number)
        if kind is float:
            return float(text)
    except (ValueError, KeyError):
        raise InputError(f"setting {name}={raw!r} is not a valid {kind.__name__}; "
                         f"set {name} to a {kind.__name__} or unset it for the default") from None
    return text

# What each number may be: (settings, lowest, highest, as told to the user). Checked before anything
# is read or trained: a setting known to be bad at the start must not fail after the training.
SETTING_RANGES = (
    (("iterations", "train_batch_tokens", "train_seq_len", "val_batch_size", "train_log_every", "vocab_size",
      "num_layers", "model_dim", "num_heads", "num_kv_heads", "mlp_mult", "bigram_dim", "muon_backend_steps",
      "swa_every", "eval_batch_seqs", "artifact_cap_bytes", "gptq_calibration_tokens"), 1, math.inf, "to at least 1"),
    (("warmdown_iters", "warmup_steps", "grad_accum_steps", "val_loss_every", "val_max_tokens", "eval_stride",
      "muon_momentum_warmup_steps", "max_wallclock_seconds", "grad_clip_norm", "matrix_lr", "scalar_lr",
      "tied_embed_lr", "muon_weight_decay", "adam_weight_decay", "tied_embed_init_std", "gptq_reserve_seconds",
      "lqer_rank", "lqer_tensors", "mlp_leaky_slope", "xsa_last_layers", "rope_dims", "num_loops", "loop_start"), 0,
     math.inf, "to at least 0"),
    (("rope_base", "logit_softcap", "adam_eps"), math.ulp(0.0), math.inf, "above 0"),
    (("qat_start_frac", "swa_start_frac", "muon_momentum", "muon_momentum_warmup_start", "adam_beta1",
      "adam_beta2", "bpb_loss_alpha", "value_residual_alpha", "enable_looping_at"), 0, 1, "between 0 and 1"),
    (("ema_decay",), 0, 1 - 1e-9, "between 0 (off) and below 1"),
    (("warmdown_frac", "lr_floor", "ema_horizon"), 0, 1, "between 0 and 1"),
    (("embed_weight_decay", "parallel_residual_start"), -1, math.inf, "to -1 (off: as without it) or at least 0"),
    (("bigram_vocab_size",), 2, math.inf, "to at least 2"), (("zstd_level",), 1, 22, "between 1 and 22"),
    (("qk_gain_init", "bigram_scale_init"), -math.inf, math.inf, "to a finite number"),
)

# The seed's settings (openai/parameter-golf PR 232) not ours by name: ("alias", our setting of the same meaning, our
# units per the seed's), logged; or (the script refusing it, the value it accepts quietly or None, why and the fix).
SEED_SETTINGS = {
    "MUON_WD": ("alias", "muon_weight_decay", 1), "BETA1": ("alias", "adam_beta1", 1),
    "BETA2": ("alias", "adam_beta2", 1), "USE_STE_QAT": ("alias", "qat_enabled", 1),
    "STE_QAT_START_FRAC": ("alias", "qat_start_frac", 1), "BIGRAM_HASH_BUCKETS": ("alias", "bigram_vocab_size", 1),
    "BIGRAM_HASH_DIM": ("alias", "bigram_dim", 1), "TTT_STEPS": ("alias", "ttt_epochs", 1),
    "TABLE_BUDGET_KB": ("alias", "correction_max_bytes", 1024),  # the seed's builder counts 1024 bytes a KB
    "QUANT_BITS": ("train", 6, "the artifact is int6 + zstd; unset it, or set USE_MIXED_QUANT=1 for int5 MLPs"),
    "USE_SMEAR_GATE": ("train", True, "this trainer builds the 11-layer system, SmearGate included; unset it"),
    "USE_BIGRAM_HASH": ("train", True, "this trainer builds the 11-layer system, BigramHash included; unset it"),
    "TIE_EMBEDDINGS": ("train", True, "the embedding is also the output layer here (TIE_EMBEDDINGS=1); unset it"),
    # NUM_LOOPS is ours by name, counted as the records count it (passes beyond the first): one name cannot carry
    # the seed's count of all passes as well, so its whole-stack loop is spelled in ours (docs/depth_recurrence.md)
    "NUM_UNIQUE_BLOCKS": ("train", None, "the seed runs its U blocks L times in all: set NUM_LAYERS=U LOOP_START=0 "
                          "LOOP_END=U-1 NUM_LOOPS=L-1 (ours counts passes beyond the first, as the records do)"),
    "EMBED_LR": ("train", None, "the seed reads it only for untied embeddings; these are tied: set TIED_EMBED_LR"),
    "HEAD_LR": ("train", None, "the seed reads it only for an untied head; ours is the embedding: set TIED_EMBED_LR"),
    "SWA_STEP_TIME_MS": ("train", None, "the seed guesses SWA's start from it; ours is measured: set SWA_START_FRAC"),
    "CONTROL_TENSOR_NAME_PATTERNS": ("train", None, "OPTIMIZER_GROUPS decides what AdamW trains; unset it"),
    "INT8_KEEP_FLOAT_FP32_NAME_PATTERNS": ("train", None, "tensors of <= 65,536 values stay float; unset it"),
    "OUTPUT": ("build", None, "set CORRECTION_EMBED=1 for a copy of the checkpoint that carries the table "
               "(.with_table.ptz); CORRECTION_OUT names the table file"),
}
OTHER_PROGRAMS = ("TORCH", "NCCL_", "CUDA_", "OMP_", "MKL_", "PYTHON", "MASTER_", "LOCAL_", "GROUP_", "ROLE_", "RANK",
                  "WORLD_SIZE")  # their variables are never typos of ours (torchrun sets the last seven)

def spelling_distance(a: str, b: str) -> int:
    """Single-character insertions, deletions, substitutions and swaps of neighbours that turn a into b."""
    d = [list(range(len(b) + 1))] + [[i] + [0] * len(b) for i in range(1, len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[-1][-1]

def check_spelling(env, own: set[str]) -> None:
    """A near miss (one slip from a name sharing its first or last word, two past 11 letters) stops the run."""
    known = own | {f.name.upper() for f in fields(Settings)} | set(SEED_SETTINGS)
    for name in env:
        upper = name.upper()
        if name in known or upper.startswith(OTHER_PROGRAMS):
            continue
        distance, closest = min(((spelling_distance(upper, k), k) for k in known if k.split("_")[0] == upper.split(
            "_")[0] or k.split("_")[-1] == upper.split("_")[-1]), default=(99, ""))
        if distance <= 1 + (len(closest) >= 12):
            raise InputError(f"{name} is no setting of these scripts or the seed's, but looks like {closest}; "
                             f"correct its name, or unset {name} if another program needs it")

def check_ranges(obj) -> None:
    """SETTING_RANGES for each of them obj has: Settings, or the ModelConfig an artifact carries."""
    for names, lowest, highest, allowed in SETTING_RANGES:
        for name in (n for n in names if hasattr(obj, n)):
            if not (math.isfinite(value := getattr(obj, name)) and lowest <= value <= highest):
                raise InputError(f"{name.upper()}={value} is out of range; set it {allowed}")

def validate_settings(s: Settings) -> None:
    check_ranges(s)
    if s.cpu_precision_probe not in PROBE_ANSWERS:  # refused on any device, not only where the probe runs
        raise InputError(f"CPU_PRECISION_PROBE={s.cpu_precision_probe} is not one of {', '.join(PROBE_ANSWERS)}; set "
                         "CPU_PRECISION_PROBE=measure (the default) or unset it")
    if s.lqer_tensors and not s.lqer_rank:
        raise InputError(f"LQER_RANK=0 with LQER_TENSORS={s.lqer_tensors} corrects nothing; set LQER_RANK=4 (at least 1), "
                         "or LQER_TENSORS=0 for no correction")
    if calibrates(s) and 0 < s.max_wallclock_seconds <= 2 * s.gptq_reserve_seconds:  # export_reserved would eat the run
        raise InputError(f"GPTQ_RESERVE_SECONDS={s.gptq_reserve_seconds:g} keeps half or more of MAX_WALLCLOCK_SECONDS="
                         f"{s.max_wallclock_seconds:g} for the export, not for training; set GPTQ_RESERVE_SECONDS="
                         f"{s.max_wallclock_seconds / 10:g} (or 0), or EXPORT_QUANTIZER=rtn EXPORT_ALLOCATION=ladder")
    for name, allowed in (("export_quantizer", tuple(quantize.QUANTIZERS)), ("lqer_factor_bits", quantize.LQER_FACTOR_BITS),
                          ("export_allocation", EXPORT_ALLOCATIONS)):
        if getattr(s, name) not in allowed:
            raise InputError(f"{name.upper()}={getattr(s, name)} is not one of {', '.join(map(str, allowed))}; set one")
    if s.eval_stride > s.train_seq_len:
        raise InputError(f"EVAL_STRIDE={s.eval_stride} exceeds TRAIN_SEQ_LEN={s.train_seq_len}; set it lower, or 0")
    check_ship_code(s.ship_code)
    if s.export_allocation == "rd" and (s.lqer_tensors or s.use_mixed_quant):
        raise InputError("EXPORT_ALLOCATION=rd chooses every group's grid itself and stores no LQER correction; unset "
                         "LQER_TENSORS and USE_MIXED_QUANT, or set EXPORT_ALLOCATION=ladder")
    if s.export_for_eval not in EVALUATION_CODE:
        raise InputError(f"EXPORT_FOR_EVAL={s.export_for_eval} is not one of {', '.join(EVALUATION_CODE)}; set it to "
                         "the evaluation the record will run (legal, the default, counts the most code)")

def calibrates(s: Settings) -> bool:
    """Whether the export calibrates (GPTQ, LQER's corrections, the rd export's Hessians and sensitivities): what
    GPTQ_* settings act on."""
    return s.export_quantizer == "gptq" or s.lqer_tensors > 0 or s.export_allocation == "rd"

# Settings that act only where another allows: (setting, whether it acts, why not). A value other than the default
# where it does not act gets a note line (train): no setting is dropped without a line.
DEPENDENT_SETTINGS = (
    ("gptq_calibration_tokens", calibrates, "the export does not calibrate (EXPORT_QUANTIZER=rtn, LQER_TENSORS=0, EXPORT_ALLOCATION=ladder)"),
    ("gptq_reserve_seconds", lambda s: not s.gptq_reserve_seconds or calibrates(s) and s.max_wallclock_seconds > 0,
     "no calibration or no cap"),
    ("lqer_rank", lambda s: s.lqer_tensors > 0, "LQER_TENSORS=0: no correction"),
    ("lqer_factor_bits", lambda s: s.lqer_tensors > 0, "LQER_TENSORS=0: no correction"),
    ("qat_start_frac", lambda s: s.qat_enabled, "QAT_ENABLED=0"),
    ("swa_every", lambda s: s.swa_enabled, "SWA_ENABLED=0"), ("swa_start_frac", lambda s: s.swa_enabled, "SWA_ENABLED=0"),
    ("enable_looping_at", lambda s: s.num_loops > 0, "NUM_LOOPS=0: no loop"),
    ("warmdown_iters", lambda s: not s.warmdown_frac, "WARMDOWN_FRAC sets the warm-down"),
    ("ema_decay", lambda s: not s.ema_horizon, "EMA_HORIZON sets the decay"),
    ("lr_floor", lambda s: s.warmdown_frac > 0 or s.warmdown_iters > 0, "no warm-down (WARMDOWN_FRAC=0, WARMDOWN_ITERS=0)"))

def unused_setting_notes(s: Settings) -> list[str]:
    return [f"note unused:{name.upper()}={log_value(getattr(s, name))} # {why}: it changes nothing in this run"
            for name, acts, why in DEPENDENT_SETTINGS if getattr(s, name) != getattr(Settings, name) and not acts(s)]

def run_length_notes(s: Settings) -> list[str]:
    """Settings counted in steps that a run of ITERATIONS steps (no cap) is too short for: each a note line."""
    if s.max_wallclock_seconds > 0:
        return []
    notes = [f"note short_run:EMA_DECAY={s.ema_decay} steps:{s.iterations} initial_weight:{s.ema_decay ** s.iterations:.3f}"
             " # the exported average still holds this much of the initial weights; EMA_HORIZON follows the run"
             ] if s.ema_decay and not s.ema_horizon and s.ema_decay ** s.iterations > 0.05 else []
    return notes + ([f"note short_run:MUON_MOMENTUM_WARMUP_STEPS={s.muon_momentum_warmup_steps} steps:{s.iterations} # "
                     f"MUON_MOMENTUM={s.muon_momentum} is never reached"]
                    if s.muon_momentum_warmup_steps > s.iterations else [])

def check_calibration_data(s: Settings) -> list[str]:
    """GPTQ_CALIBRATION_TOKENS: whole training sequences, at most the training tokens there are (no cycling)."""
    if not calibrates(s):
        return []
    wanted = max(1, s.gptq_calibration_tokens // s.train_seq_len) * s.train_seq_len
    available = sum(read_shard_header(p) for p in list_shards(s.data_path, "train"))
    if wanted > available:
        raise InputError(f"GPTQ_CALIBRATION_TOKENS={s.gptq_calibration_tokens} asks for {wanted} training tokens, but "
                         f"DATA_PATH={s.data_path} holds {available}; set GPTQ_CALIBRATION_TOKENS="
                         f"{max(available // s.train_seq_len, 1) * s.train_seq_len} or lower (default 65536)")
    return [] if wanted == s.gptq_calibration_tokens else [f"note gptq_calibration_tokens:{s.gptq_calibration_tokens}->"
                                                            f"{wanted} # whole TRAIN_SEQ_LEN sequences"]

def check_ship_code(value: str) -> None:
    """SHIP_CODE (code_size.py): training (what the export counts) and evaluation (artifact_total) agree."""
    if value not in SHIP_CODE:
        raise InputError(f"SHIP_CODE={value} is not one of {', '.join(SHIP_CODE)}; set SHIP_CODE=bundle (the record "
                         "ships code_bundle.py) or SHIP_CODE=raw (it ships the scripts as they are)")

def resolve_switch(value: str, name: str, default: bool) -> bool:
    """The tri-state settings COMPILE and AUTOCAST_BF16: auto, or an explicit 1/0."""
    return default if value.lower() == "auto" else parse_setting(name, value, bool)

# ----------------------------------------------------------------------------------------------
# Errors and files
# run_files.py: one-line errors (InputError), atomic writes, output folders probed and owned by one
# training, the artifact kept when its folder is full, and the log writer (Logger, log_value).

# ----------------------------------------------------------------------------------------------
# Machine
# Where a process runs: device, ranks, precision, compilation, attention kernel. Decided at start.

@dataclass
class Runtime:
    """What the process learned about where it runs."""
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    compile: bool
    autocast: bool
    compile_backend: str = "inductor"
    precision_probe: str = ""  # on the CPU with AUTOCAST_BF16=auto: the two measured matmul speeds
    @property
    def precision(self) -> str:
        return "bf16" if self.autocast else "fp32"
    @property
    def is_main(self) -> bool:
        return self.rank == 0

# A run needs at most 6 forward graphs (training and validation, QAT off and on; final standard and sliding
# scores) and one Newton-Schulz graph per matrix shape (5). Past torch's default limit of 8 a fullgraph compile
# fails after training: raised with a wide margin; tests/test_compile_variants.py counts the graphs.
COMPILE_RECOMPILE_LIMIT = 32

def compile_model(fn, backend: str = "inductor"):
    """torch.compile with one graph per input shape (dynamic=False) and no graph breaks."""
    for name in ("recompile_limit", "cache_size_limit"):  # the newer name, and the one torch < 2.7 knows
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, COMPILE_RECOMPILE_LIMIT)
    # else compiled kernels keep the fp16 per-row scale in fp32: QAT would drift off the export grid
    torch._inductor.config.emulate_precision_casts = True
    return torch.compile(fn, dynamic=False, fullgraph=True, backend=backend)

def compiled_graphs(*functions) -> str:
    """key:value pairs: graphs compiled so far, in all and for each function (the limit is per function)."""
    counts = {"graphs": int(torch._dynamo.utils.counters["stats"]["unique_graphs"])}
    try:  # a private accessor, used only for this line, so a torch without it loses only the detail
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list
        counts.update({fn.__qualname__: len(_debug_get_cache_entry_list(fn.__code__)) for fn in functions})
    except (ImportError, AttributeError):
        pass
    return " ".join(f"{k}:{v}" for k, v in counts.items())

def pin_flash_attention(rt: Runtime) -> str:
    """On CUDA with bf16, only the flash kernel may run attention: a dtype slip then fails at
    once instead of falling back silently to the math kernel and its (B, H, T, T) scores."""
    if rt.device.type != "cuda" or not rt.autocast:
        return "default"
    torch.backends.cuda.enable_flash_sdp(True)
    for disable in (torch.backends.cuda.enable_math_sdp, torch.backends.cuda.enable_mem_efficient_sdp,
                    torch.backends.cuda.enable_cudnn_sdp):
        disable(False)
    return "flash_only"

# On the CPU, bf16 is chosen by measurement: some CPUs multiply bf16 4x faster than fp32 (AVX-512
# BF16, AMX), others 100x slower (emulated). It must be clearly faster to be worth its rounding.
BF16_CLEARLY_FASTER = 1.25

def prefer_bf16(fp32_gflops: float, bf16_gflops: float) -> bool:
    """The AUTOCAST_BF16=auto decision on the CPU, from the two measured matmul speeds."""
    return bf16_gflops >= BF16_CLEARLY_FASTER * fp32_gflops

def matmul_gflops(dtype: torch.dtype, rows: int, dim: int, hidden: int, device: torch.device = torch.device("cpu"),
                  repeats: int = 5, budget_s: float = 0.05) -> float:
    """GFLOP/s of a (rows, dim) x (dim, hidden) matmul: the best of 3 to `repeats` timed runs after
    an untimed warm-up (which may load libraries), fewer past budget_s (emulated bf16 is slow)."""
    a, b = torch.randn(rows, dim, device=device).to(dtype), torch.randn(dim, hidden, device=device).to(dtype)
    a @ b
    times: list[float] = []
    while len(times) < min(3, repeats) or (len(times) < repeats and sum(times) <= budget_s):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * rows * dim * hidden / min(times) / 1e9

# CPU_PRECISION_PROBE=bf16 or fp32 makes the probe answer so whatever it measured: the test suite runs as it
# would on a CPU that picks each way (an Intel Xeon with fast bf16 picks bf16, an AMD EPYC that emulates it
# fp32; they then train different weights). The speeds are still measured and logged, with probe_forced:.
PROBE_ANSWERS = ("measure", "bf16", "fp32")

def choose_cpu_precision(dim: int, hidden: int, world_size: int, answer: str = "measure") -> tuple[bool, str]:
    """(bf16 or not, the figures for the log), measured on the model's MLP shape; all ranks agree."""
    if answer not in PROBE_ANSWERS:
        raise InputError(f"CPU_PRECISION_PROBE={answer} is not one of {', '.join(PROBE_ANSWERS)}; set "
                         "CPU_PRECISION_PROBE=measure (the default) or unset it")
    fp32, bf16 = (matmul_gflops(dtype, 128, dim, hidden, repeats=10) for dtype in (torch.float32, torch.bfloat16))
    choice = torch.tensor(int(prefer_bf16(fp32, bf16) if answer == "measure" else answer == "bf16"))
    if world_size > 1:
        dist.all_reduce(choice, op=dist.ReduceOp.MIN)  # bf16 only where every rank measured it faster
    forced = "" if answer == "measure" else f" probe_forced:{answer}"
    return bool(choice), f"matmul_fp32_gflops:{fp32:.1f} matmul_bf16_gflops:{bf16:.1f}{forced}"

PRECISIONS = {"bf16": True, "fp32": False}  # an artifact's recorded precision -> autocast

def init_runtime(s: EnvSettings, probe_dims: tuple[int, int] = (512, 1536), recorded: str | None = None) -> Runtime:
    """probe_dims: the model's (width, hidden) matmul that AUTOCAST_BF16=auto times on the CPU. recorded:
    the precision an artifact was scored in when it was trained; with AUTOCAST_BF16=auto an evaluation
    keeps it (no probe, on any device): the same artifact gives the same score wherever it is scored."""
    if s.device not in ("auto", "cuda", "cpu"):
        raise InputError(f"DEVICE={s.device} is not a device this script knows; set DEVICE to auto, cuda or cpu")
    if s.compile_backend not in ("inductor", "eager", "aot_eager"):
        raise InputError(f"COMPILE_BACKEND={s.compile_backend} is unknown; set it to inductor, eager or aot_eager")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    want = ("cuda" if torch.cuda.is_available() else "cpu") if s.device == "auto" else s.device
    if want == "cuda":
        if not torch.cuda.is_available():
            raise InputError("DEVICE=cuda but no CUDA device is visible; set DEVICE=cpu or DEVICE=auto")
        device = torch.device(want, local_rank)  # one GPU per local rank
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device(want)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", device_id=device
                                if device.type == "cuda" else None)
    on_cuda, auto = device.type == "cuda", s.autocast_bf16.lower() == "auto"
    if auto and recorded in PRECISIONS:
        autocast, probe = PRECISIONS[recorded], "precision_from:artifact"
    elif auto and not on_cuda:
        autocast, probe = choose_cpu_precision(*probe_dims, world_size, s.cpu_precision_probe)
    else:
        autocast, probe = resolve_switch(s.autocast_bf16, "AUTOCAST_BF16", on_cuda), ""
    return Runtime(rank, world_size, local_rank, device, resolve_switch(s.compile, "COMPILE", on_cuda), autocast,
                   s.compile_backend, probe)

def library_versions() -> str:
    import sentencepiece
    import zstandard
    return (f"python:{platform.python_version()} torch:{torch.__version__} numpy:{np.__version__} "
            f"zstandard:{zstandard.__version__} sentencepiece:{sentencepiece.__version__}")

def cpu_name() -> str:
    try:
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or "cpu"

def peak_memory_line(device: torch.device) -> str:
    if device.type == "cuda":
        return (f"peak_memory_allocated_mib:{torch.cuda.max_memory_allocated(device) // 2**20} "
                f"peak_memory_reserved_mib:{torch.cuda.max_memory_reserved(device) // 2**20}")
    return f"peak_rss_mib:{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}"

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)

# ----------------------------------------------------------------------------------------------
# Model
# A GPT with grouped-query attention, RoPE, (leaky) ReLU^2 MLPs, U-Net skips between the two halves
# of the blocks, BigramHash (a learned embedding of the previous-and-current token pair) and
# SmearGate (a learned blend with the previous position), neither looking back across a document's
# BOS. Once QAT starts, the matrices the artifact stores as integers are fake-quantized in the
# forward pass by the export's quantizer. The artifact records the whole ModelConfig.

BOS_ID = 1  # SPEC section 3: every document starts with it

@dataclass(frozen=True)
class ModelConfig:
    """The architecture, as the artifact records it. The recipe changes default to their absence, so an
    artifact written before they existed rebuilds the model it was trained as."""
    vocab_size: int
    num_layers: int
    model_dim: int
    num_heads: int
    num_kv_heads: int
    mlp_mult: int
    rope_base: float
    logit_softcap: float
    qk_gain_init: float
    tied_embed_init_std: float
    bigram_vocab_size: int
    bigram_dim: int
    bigram_scale_init: float
    mlp_leaky_slope: float = 0.0
    xsa_last_layers: int = 0
    rope_dims: int = 0
    layer_norm_scale: bool = False
    attn_output_gate: bool = False
    value_residual_alpha: float = 1.0
    parallel_residual_start: int = -1  # an artifact written before the two lanes existed has one
    num_loops: int = 0  # depth recurrence: an artifact written before it existed is unlooped
    loop_start: int = 0
    loop_end: int = -1
    @classmethod
    def from_settings(cls, s: Settings) -> "ModelConfig":
        return cls(**{f.name: getattr(s, f.name) for f in fields(cls)})
    def record(self) -> dict:
        """As the artifact stores it: a change at its absence (its default here) is left out, so a reader from
        before that change existed still loads the model, which does not use it."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != f.default}
    @property
    def rotary_dims(self) -> int:
        """How many of a head's dims RoPE rotates."""
        return self.rope_dims or self.model_dim // self.num_heads
    def layer_order(self, looped: bool = True) -> tuple[int, ...]:
        """The physical block each virtual layer runs: the plain stack, or with blocks loop_start..loop_end run
        1 + num_loops times in a row (#1855's 3..5 twice more on 11: 0,1,2,3,4,5,3,4,5,3,4,5,6,7,8,9,10)."""
        span = list(range(self.loop_start, self.loop_end + 1)) * (1 + self.num_loops) if looped else []
        return (*range(self.loop_start), *span, *range(self.loop_end + 1, self.num_layers)) if span else \
            tuple(range(self.num_layers))

def validate_model_config(cfg: ModelConfig) -> None:
    for f in fields(cfg):  # an artifact's config is JSON: a string, a bool or a fraction where a number belongs
        value, kind = getattr(cfg, f.name), {"int": int, "float": (int, float), "bool": bool}[f.type]
        if not isinstance(value, kind) or (isinstance(value, bool) and f.type != "bool"):
            raise InputError(f"{f.name.upper()}={value!r} is not a valid {f.type}; set it to a {f.type}")
    check_ranges(cfg)
    if cfg.model_dim % cfg.num_heads or (cfg.model_dim // cfg.num_heads) % 2:
        raise InputError(f"MODEL_DIM={cfg.model_dim} must split into NUM_HEADS={cfg.num_heads} heads of even width")
    if cfg.num_heads % cfg.num_kv_heads:
        raise InputError(f"NUM_HEADS={cfg.num_heads} must be a multiple of NUM_KV_HEADS={cfg.num_kv_heads}")
    if cfg.bigram_vocab_size < 2:
        raise InputError(f"BIGRAM_VOCAB_SIZE={cfg.bigram_vocab_size} must be at least 2")
    if cfg.num_loops and not 0 <= cfg.loop_start <= cfg.loop_end < cfg.num_layers:
        raise InputError(f"NUM_LOOPS={cfg.num_loops} needs a span 0 <= LOOP_START <= LOOP_END < NUM_LAYERS={cfg.num_layers}"
                         f" (got {cfg.loop_start}..{cfg.loop_end}): set both, e.g. LOOP_START=3 LOOP_END=5; NUM_LOOPS "
                         "counts passes beyond the first (the seed's NUM_LOOPS=1, the plain stack, is NUM_LOOPS=0)")
    if cfg.parallel_residual_start >= 0 and not cfg.loop_end < cfg.parallel_residual_start < cfg.num_layers:
        raise InputError(f"PARALLEL_RESIDUAL_START={cfg.parallel_residual_start} must name a layer past the looped span "
                         f"(LOOP_END={cfg.loop_end}) and below NUM_LAYERS={cfg.num_layers}; set it so (#1855: 8 of 11), "
                         "or -1 for one residual lane")
    if not cfg.num_loops and (cfg.loop_start, cfg.loop_end) != (0, -1):
        raise InputError(f"LOOP_START={cfg.loop_start} LOOP_END={cfg.loop_end} loop nothing without NUM_LOOPS; set "
                         "NUM_LOOPS (passes beyond the first) or unset them")
    head_dim = cfg.model_dim // cfg.num_heads
    if cfg.rotary_dims % 2 or cfg.rotary_dims > head_dim:
        raise InputError(f"ROPE_DIMS={cfg.rope_dims} must be even and at most the head width {head_dim}; "
                         "set it so, or 0 for all")

def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))

class FakeQuantLinear(nn.Linear):
    """A bias-free linear layer whose weight is fake-quantized to `fake_quant` bits (0: off), on the row max grid
    or, with fake_quant_step, on the std grid of that step (quantize.Grid)."""
    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)
        self.fake_quant, self.fake_quant_step = 0, 0.0
    def forward(self, x: Tensor) -> Tensor:
        weight = fake_quantize(self.weight, self.fake_quant, self.fake_quant_step) if self.fake_quant else self.weight
        return F.linear(x, weight.to(x.dtype))

class Rotary(nn.Module):
    """RoPE on the first `dims` of each head (partial RoPE when fewer than all): the rest carry no position."""
    def __init__(self, dims: int, base: float):
        super().__init__()
        self.dims = dims
        self.register_buffer("inv_freq", 1.0 / base ** (torch.arange(0, dims, 2).float() / dims), persistent=False)
    def forward(self, x: Tensor) -> Tensor:  # x: (B, H, T, D)
        freqs = torch.outer(torch.arange(x.size(2), device=x.device, dtype=torch.float32), self.inv_freq)
        cos, sin = freqs.cos().to(x.dtype), freqs.sin().to(x.dtype)
        x1, x2 = x[..., : self.dims].chunk(2, dim=-1)
        return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin, x[..., self.dims :]), dim=-1)

def exclude_own_value(y: Tensor, v: Tensor) -> Tensor:
    """XSA, exclusive self-attention: each head's output y (B, H, T, D) less its projection on the value vector
    its own token holds in the head's KV group, v (B, Hkv, T, D): attention then carries only the context."""
    B, H, T, D = y.shape
    grouped = y.view(B, v.size(1), H // v.size(1), T, D)  # query head h reads KV head h // (H / Hkv)
    own = F.normalize(v, dim=-1).unsqueeze(2)  # (B, Hkv, 1, T, D)
    return (grouped - (grouped * own).sum(-1, keepdim=True) * own).view(B, H, T, D)

ATTN_OUTPUT_GATE_BIAS_INIT = 2.0  # sigmoid(2) = 0.88: the gate starts nearly open

class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
        self.head_dim = cfg.model_dim // cfg.num_heads
        kv_dim = self.num_kv_heads * self.head_dim
        self.c_q = FakeQuantLinear(cfg.model_dim, cfg.model_dim)
        self.c_k, self.c_v = FakeQuantLinear(cfg.model_dim, kv_dim), FakeQuantLinear(cfg.model_dim, kv_dim)
        self.proj = FakeQuantLinear(cfg.model_dim, cfg.model_dim)
        self.q_gain = nn.Parameter(torch.full((cfg.num_heads,), cfg.qk_gain_init))
        self.rotary = Rotary(cfg.rotary_dims, cfg.rope_base)
        self.first_value_share = 1.0 - cfg.value_residual_alpha  # value residual: the first virtual layer has no v_first
        self.gated = cfg.attn_output_gate
        if self.gated:  # per head: sigmoid(gate_weight x + gate_bias), a zero map at first
            self.gate_weight = nn.Parameter(torch.zeros(cfg.num_heads, cfg.model_dim))
            self.gate_bias = nn.Parameter(torch.full((cfg.num_heads,), ATTN_OUTPUT_GATE_BIAS_INIT))
    def forward(self, x: Tensor, v_first: Tensor | None = None, exclusive: bool = False) -> tuple[Tensor, Tensor]:
        """(the attention's output, the values it attended to (B, Hkv, T, D): the first layer's are v_first).
        exclusive: XSA, decided by the virtual layer this call runs as (LayerSlot)."""
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.c_k(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.c_v(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.first_value_share and v_first is not None:
            v = torch.lerp(v, v_first, self.first_value_share)
        # normalized q and k keep attention logits bounded; the per-head gain sets their sharpness
        q, k = self.rotary(rms_norm(q)), self.rotary(rms_norm(k))
        q = q * self.q_gain.to(q.dtype)[None, :, None, None]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.num_kv_heads != self.num_heads)
        if exclusive:
            y = exclude_own_value(y, v)
        if self.gated:
            gate = torch.sigmoid(F.linear(x, self.gate_weight.to(x.dtype), self.gate_bias.to(x.dtype)))  # (B, T, H)
            y = y * gate.transpose(1, 2)[..., None]
        return self.proj(y.transpose(1, 2).reshape(B, T, C)), v

class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = cfg.mlp_mult * cfg.model_dim
        self.fc, self.proj = FakeQuantLinear(cfg.model_dim, hidden), FakeQuantLinear(hidden, cfg.model_dim)
        self.leaky_slope = cfg.mlp_leaky_slope  # 0: relu^2
    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.leaky_relu(self.fc(x), self.leaky_slope).square())

class LayerSlot(NamedTuple):
    """One virtual layer: the physical block it runs and what the recipe decides by depth, read per virtual layer
    (a block looped three times runs at three depths): XSA in the last XSA_LAST_LAYERS virtual layers, the
    layer-norm scale 1/sqrt(virtual index + 1), two residual lanes from PARALLEL_RESIDUAL_START's block on. A model
    whose order repeats no block is the plain stack."""
    block: int
    exclusive: bool
    norm_scale: float
    lanes: bool = False

def layer_slots(cfg: ModelConfig, looped: bool) -> tuple[LayerSlot, ...]:
    order = cfg.layer_order(looped)
    return tuple(LayerSlot(b, v >= len(order) - cfg.xsa_last_layers, 1 / math.sqrt(v + 1) if cfg.layer_norm_scale
                           else 1.0, 0 <= cfg.parallel_residual_start <= b) for v, b in enumerate(order))

class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, lanes: bool = False):
        super().__init__()
        self.attn, self.mlp = CausalSelfAttention(cfg), MLP(cfg)
        self.attn_scale = nn.Parameter(torch.ones(cfg.model_dim))
        self.mlp_scale = nn.Parameter(torch.ones(cfg.model_dim))
        # resid_mix[0] weighs the running residual, resid_mix[1] the embedding output x0
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(cfg.model_dim), torch.zeros(cfg.model_dim))))
        if lanes:  # two lanes: each lane's residual scale after attention and after the MLP, and where each branch
            # writes, attention -> (A, M), MLP -> (A, M); all 1 at first: both lanes equal, the block as with one lane
            self.lane_resid, self.lane_post = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(4))
    def forward_lanes(self, a: Tensor, m: Tensor, x0: Tensor, v_first: Tensor | None,
                      slot: LayerSlot) -> tuple[Tensor, Tensor, Tensor]:
        """The two-lane residual (#1855's parallel decoder): attention reads lane A, the MLP lane M (after attention
        wrote to it); each branch writes to both lanes with learned weights. Returns (A, M, the values)."""
        mix, r, p = self.resid_mix.to(a.dtype), self.lane_resid.to(a.dtype), self.lane_post.to(a.dtype)
        a, m = mix[0] * a + mix[1] * x0, mix[0] * m + mix[1] * x0
        attended, v = self.attn(rms_norm(a) * slot.norm_scale, v_first, slot.exclusive)
        attended = self.attn_scale.to(a.dtype) * attended
        a, m = r[0] * a + p[0] * attended, r[0] * m + p[1] * attended
        out = self.mlp_scale.to(a.dtype) * self.mlp(rms_norm(m) * slot.norm_scale)
        return r[1] * a + p[2] * out, r[1] * m + p[3] * out, v
    def forward(self, x: Tensor, x0: Tensor, v_first: Tensor | None = None,
                slot: LayerSlot = LayerSlot(0, False, 1.0)) -> tuple[Tensor, Tensor]:
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        attended, v = self.attn(rms_norm(x) * slot.norm_scale, v_first, slot.exclusive)  # deeper layers read less
        x = x + self.attn_scale.to(x.dtype) * attended
        return x + self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(x) * slot.norm_scale), v

class BigramHash(nn.Module):
    """A learned embedding of the (previous, current) token pair, hashed into a fixed bucket count."""
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_buckets, self.vocab_size = cfg.bigram_vocab_size, cfg.vocab_size
        self.embed = nn.Embedding(cfg.bigram_vocab_size, cfg.bigram_dim)
        self.embed.fake_quant, self.embed.fake_quant_step = 0, 0.0
        self.proj = FakeQuantLinear(cfg.bigram_dim, cfg.model_dim)
        self.scale = nn.Parameter(torch.tensor(cfg.bigram_scale_init))
    def buckets(self, idx: Tensor) -> Tensor:
        # bucket 0 is kept for a position with no previous token: a window's first, and a document's BOS
        pair = idx[:, :-1] * self.vocab_size + idx[:, 1:]
        hashed = (pair * 2654435761) % (1 << 32) % (self.num_buckets - 1) + 1
        return F.pad(hashed.masked_fill(idx[:, 1:] == BOS_ID, 0), (1, 0), value=0)
    def forward(self, idx: Tensor) -> Tensor:
        embed = self.embed
        weight = fake_quantize(embed.weight, embed.fake_quant, embed.fake_quant_step) if embed.fake_quant else embed.weight
        return self.scale * self.proj(F.embedding(self.buckets(idx), weight))

class SmearGate(nn.Module):
    """x <- (1 - sigmoid(g)) * x + sigmoid(g) * x_prev, per channel: a cheap look one token back. A document's
    BOS has no previous token, as a window's first position has none: x_prev is zero there (the public form
    let the previous document's last token into the BOS, which flattered a record by 0.00255 BPB)."""
    def __init__(self, dim: int):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(dim))
    def forward(self, x: Tensor, idx: Tensor) -> Tensor:
        g = torch.sigmoid(self.gate.to(x.dtype))
        x_prev = F.pad(x[:, :-1], (0, 0, 1, 0)) * (idx != BOS_ID).unsqueeze(-1).to(x.dtype)
        return (1 - g) * x + g * x_prev

class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        validate_model_config(cfg)
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.model_dim)
        self.bigram = BigramHash(cfg)
        self.smear = SmearGate(cfg.model_dim)
        self.blocks = nn.ModuleList(Block(cfg, 0 <= cfg.parallel_residual_start <= b) for b in range(cfg.num_layers))
        # Depth recurrence: the virtual layers of the plain and the looped order (the same when NUM_LOOPS=0). The
        # switch is one bool (`looping`): the compiled model holds a graph for each of its two values, no more.
        self.orders = (layer_slots(cfg, looped=False), layer_slots(cfg, looped=True))
        self.looping = cfg.num_loops > 0  # the artifact's order; training starts plain until ENABLE_LOOPING_AT
        # U-Net skips by virtual position: the first half of the virtual layers feed the second half, last in first
        # out; one weight per pair, as many as the looped order needs (the plain order uses the first ones)
        self.skip_weights = nn.Parameter(torch.ones(len(self.orders[1]) // 2, cfg.model_dim))
        self.reset_parameters()
    @property
    def slots(self) -> tuple[LayerSlot, ...]:
        """The virtual layers the next forward runs."""
        return self.orders[self.looping]
    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.tok_emb.weight, std=self.cfg.tied_embed_init_std)
        for name, module in self.named_modules():
            if isinstance(module, FakeQuantLinear):  # branch outputs start at zero: every block begins as the identity
                (nn.init.zeros_ if name.endswith(".proj") else nn.init.orthogonal_)(module.weight)
        # The SPEC starts both bigram factors at zero, but then neither gets a gradient (each one's is
        # multiplied by the other): a small random embedding and a zero projection output zero and learn.
        nn.init.normal_(self.bigram.embed.weight, std=self.cfg.tied_embed_init_std)
    def hidden(self, idx: Tensor) -> Tensor:
        x = self.tok_emb(idx) + self.bigram(idx)  # (B, T, C)
        if torch.is_autocast_enabled(x.device.type):
            # Embedding lookups ignore autocast and return fp32: cast once, so the residual stream runs in bf16
            x = x.to(torch.get_autocast_dtype(x.device.type))
        x = self.smear(rms_norm(x), idx)
        x0, skips, v_first, slots, m = x, [], None, self.slots, None  # m: the MLP's lane, once the lanes split
        encoder = len(slots) // 2  # encoder: virtual layers 0..encoder-1; decoder: the rest (one more when odd)
        for v, slot in enumerate(slots):
            if v >= encoder and skips:
                weight, (skip_a, skip_m) = self.skip_weights[v - encoder].to(x.dtype), skips.pop()
                x, m = x + weight * skip_a, None if m is None else m + weight * skip_m
            if slot.lanes:
                x, m, values = self.blocks[slot.block].forward_lanes(x, x if m is None else m, x0, v_first, slot)
            else:
                x, values = self.blocks[slot.block](x, x0, v_first, slot)
            v_first = values if v_first is None else v_first  # the first virtual layer's values (value residual)
            if v < encoder:
                skips.append((x, x if m is None else m))
        return rms_norm(x if m is None else (x + m) / 2)  # the lanes' mean, as #1855
    def forward(self, idx: Tensor, targets: Tensor | None = None, weights: Tensor | None = None) -> Tensor:
        """The mean loss over the targets (with weights, their weighted sum), or the (B, T, V) fp32 logits."""
        z = F.linear(self.hidden(idx), self.tok_emb.weight)  # tied: the embedding is the output layer
        cap = self.cfg.logit_softcap
        logits = cap * torch.tanh(z.float() / cap)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                               reduction="mean" if weights is None else "none")
        return loss if weights is None else (loss * weights.reshape(-1)).sum()

def set_fake_quant(model: GPT, enabled: bool, rung: "ExportRung | None" = None,
                   grids: "dict[str, quantize.Grid] | None" = None) -> None:
    """Switches QAT on the modules whose weight the artifact stores as integers, each on the grid that `rung` of
    the export ladder stores it with, or (grids: weight name -> Grid) the rate-distortion export's: QAT trains
    what is exported."""
    for name, module in model.named_modules():
        if hasattr(module, "fake_quant"):
            grid = grids.get(f"{name}.weight") if grids is not None else quantize.Grid(tensor_bits(
                f"{name}.weight", module.weight, rung or EXPORT_LADDER[0]))
            module.fake_quant, module.fake_quant_step = (grid.bits, grid.step) if enabled and grid else (0, 0.0)

# ----------------------------------------------------------------------------------------------
# Quantization and the artifact
# One grid for training and export: per-row fp16 scale = row max / 31 for int6 (quantize.py rounds onto
# it, to nearest or by GPTQ, and fits LQER corrections). The artifact is our own container (artifact.py: raw
# bytes, then a JSON header naming each tensor and its encoding) under zstd: deterministic, no pickle to trust.

@dataclass
class Artifact:
    state: dict[str, Tensor]  # dequantized float32 weights (low-rank corrections added), ready for load_state_dict
    meta: dict  # model configuration and training facts
    extras: dict[str, bytes]  # e.g. a correction table carried inside the file
    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig(**self.meta["model_config"])

def unpack_artifact(blob: bytes, source: str) -> Artifact:
    return Artifact(*artifact.unpack(blob, source))

def calibrate(model: GPT, s: Settings, device: torch.device, autocast: bool) -> Calibration | None:
    """GPTQ's and LQER's layer-input moments over the first GPTQ_CALIBRATION_TOKENS training (never validation) tokens."""
    if not calibrates(s):
        return None  # export_reserved() agrees
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast):
        return quantize.calibrate(model, calibration_batches(s, device), model.hidden,
                                  TIED_EMBEDDING_NAME)  # the embedding is also the output layer, fed the hidden states

def calibration_batches(s: Settings, device: torch.device) -> list[Tensor]:
    """The first GPTQ_CALIBRATION_TOKENS training (never validation) tokens, (B, T) id batches."""
    seqs = max(1, s.gptq_calibration_tokens // s.train_seq_len)
    stream = TokenStream(list_shards(s.data_path, "train"), s.vocab_size)
    tokens = torch.from_numpy(stream.take(seqs * s.train_seq_len).astype(np.int64)).view(seqs, s.train_seq_len)
    return [b.to(device) for b in tokens.split(s.eval_batch_seqs)]

def export_reserved(s: Settings) -> Settings:
    """The settings the training loop runs under: where the export calibrates, the cap less GPTQ_RESERVE_SECONDS."""
    if s.max_wallclock_seconds <= 0 or not calibrates(s):
        return s
    return dataclasses.replace(s, max_wallclock_seconds=max(s.max_wallclock_seconds - s.gptq_reserve_seconds, 1.0))

def export_artifact(state: dict[str, Tensor], meta: dict, code_bytes: int, cap_bytes: int, zstd_level: int,
                    first_rung: int, log, quantizer: str = "rtn", calibration: Calibration | None = None,
                    lqer_rank: int = 0, lqer_tensors: int = 0, lqer_factor_bits: int = 8,
                    device: torch.device = torch.device("cpu")) -> tuple[bytes, ExportRung]:
    """The bytes of the first rung of EXPORT_LADDER (from first_rung on) that fits beside the code under the cap,
    LQER's bytes counted; each rung tried is logged. None fits: the last, and an over_cap line."""
    trained, hessians, cache = EXPORT_LADDER[first_rung], calibration.hessians if calibration else {}, {}
    calibration_tokens, calibration_ms = (calibration.tokens, calibration.ms) if calibration else (0, 0.0)
    for rung in EXPORT_LADDER[first_rung:]:
        t0 = time.perf_counter()
        quantized = quantize.quantize_state(state, {n: tensor_bits(n, t, rung) for n, t in state.items()}, quantizer,
                                            hessians, lqer_rank, lqer_tensors, lqer_factor_bits, cache, device)
        quantize_ms = 1000 * (time.perf_counter() - t0)
        corrected = [n for n, q in quantized.items() if q.correction is not None]
        blob = pack_artifact(state, {**meta, "export_rung": rung.name}, zstd_level=zstd_level, rung=rung,
                             quantized=quantized)
        total = len(blob) + code_bytes
        weight_error, output_error = quantize.relative_errors(state, quantized, hessians)
        moved = [f"{kind}:int{getattr(trained, kind + '_bits')}->int{getattr(rung, kind + '_bits')}"
                 for kind in ("attention", "mlp") if getattr(rung, kind + "_bits") != getattr(trained, kind + "_bits")]
        log(f"export_rung rung:{rung.name} model_bytes:{len(blob)} total_bytes:{total} cap_bytes:{cap_bytes} "
            f"fits:{int(total <= cap_bytes)} weight_rel_rms_error:{weight_error:.5f} "
            f"off_qat_grid:{','.join(moved) or 'none'} quantizer:{quantizer} "
            f"calibration_tokens:{calibration_tokens} calibration_ms:{calibration_ms:.0f} quantize_ms:{quantize_ms:.0f} "
            f"lqer_tensors:{len(corrected)} correction_bytes:{sum(quantized[n].correction.nbytes for n in corrected)}"
            + (f" output_rel_rms_error:{output_error:.5f}" if hessians else ""))
        if total <= cap_bytes:
            return blob, rung
    log(f"over_cap rung:{rung.name} over_bytes:{total - cap_bytes} cap_bytes:{cap_bytes} # even the last rung is "
        "over the cap: the artifact is written, but the challenge rejects it; make the model smaller")
    return blob, rung

EXPORT_ALLOCATIONS = ("ladder", "rd")
RD_RUNG = ExportRung("rd", 0, 0, 0, "each group's grid chosen by rate and distortion (allocation.py)")

def export_rd(state: dict[str, Tensor], meta: dict, code_bytes: int, cap_bytes: int, zstd_level: int, log,
              quantizer: str = "rtn", calibration: Calibration | None = None,
              device: torch.device = torch.device("cpu"), loss=None,
              final_check: bool = True) -> tuple[bytes, ExportRung]:
    """The version 4 artifact of allocation.export_rd; the Hessians are the calibration's and loss
    (allocation.replaced_loss) runs on its training tokens (final_check: off under a training clock, allocation.py)."""
    blob, _ = allocation.export_rd(state, meta, code_bytes, cap_bytes, zstd_level, log, quantizer,
                                   calibration.hessians if calibration else None, device=device, loss=loss,
                                   final_check=final_check)
    return blob, RD_RUNG

def read_artifact(path: Path | str) -> Artifact:
    path = Path(path)
    if path.is_dir():
        raise InputError(f"CHECKPOINT={path} is a folder; name the artifact file in it, e.g. {path / ARTIFACT_NAME}")
    if not path.is_file():
        raise InputError(f"CHECKPOINT={path}: no such file; train one with train_gpt.py or set CHECKPOINT")
    return unpack_artifact(path.read_bytes(), str(path))

# ----------------------------------------------------------------------------------------------
# Optimizer
# Muon for the block matrices: Nesterov momentum, the update orthogonalized by a quintic Newton-
# Schulz iteration (each rank does its share, one all-reduce), decoupled weight decay. AdamW: rest.

NEWTON_SCHULZ_COEFFS = (3.4445, -4.7750, 2.0315)

def orthogonalize(g: Tensor, steps: int, eps: float = 1e-7) -> Tensor:
    """Pushes every singular value of g towards 1 (into roughly [0.7, 1.2]) in a few matmuls."""
    a, b, c = NEWTON_SCHULZ_COEFFS
    x = g / (g.norm() + eps)  # in g's dtype: bf16 where the run computes in bf16
    transposed = x.size(0) > x.size(1)
    x = x.T if transposed else x
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if transposed else x

class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr: float, momentum: float, backend_steps: int, weight_decay: float,
                 rank: int = 0, world_size: int = 1, orthogonalizer=orthogonalize, dtype=torch.float32):
        super().__init__(params, dict(lr=lr, momentum=momentum, backend_steps=backend_steps, weight_decay=weight_decay))
        self.rank, self.world_size, self.dtype = rank, world_size, dtype
        self.orthogonalize = orthogonalizer  # the compiled one on CUDA: ~400 small kernels a step become a few
    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params, momentum = group["params"], group["momentum"]
            if not params:
                continue
            flat = torch.zeros(sum(p.numel() for p in params), device=params[0].device, dtype=self.dtype)
            views = [v.view_as(p) for v, p in zip(flat.split([p.numel() for p in params]), params)]
            mine = [i for i, p in enumerate(params) if i % self.world_size == self.rank and p.grad is not None]
            if mine:  # this rank's share of the matrices: momentum, Nesterov, orthogonalized update
                grads = [params[i].grad for i in mine]
                bufs = [self.state[params[i]].setdefault("momentum_buffer", torch.zeros_like(g)) for i, g in zip(mine, grads)]
                torch._foreach_mul_(bufs, momentum)
                torch._foreach_add_(bufs, grads)
                for i, nesterov in zip(mine, torch._foreach_add(grads, bufs, alpha=momentum)):
                    update = self.orthogonalize(nesterov.to(self.dtype), group["backend_steps"])
                    views[i].copy_(update * max(1.0, params[i].size(0) / params[i].size(1)) ** 0.5)
            if self.world_size > 1:
                dist.all_reduce(flat)  # each rank wrote its own matrices, zeros elsewhere
            torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])  # decoupled: never enters the gradient
            torch._foreach_add_(params, [v.to(p.dtype) for v, p in zip(views, params)], alpha=-group["lr"])

# Which optimizer trains which parameter, as data: the first matching row decides. Control tensors
# are knobs whose every element has its own meaning: AdamW's per-element steps (Muon would move
# each ~20x less, and its weight decay pulls the residual gate to 0), as in every public record.
OPTIMIZER_GROUPS = (
    # (group, optimizer, learning-rate setting, which parameters, why)
    ("controls", "adam", "scalar_lr",
     lambda n, p: any(k in n for k in ("resid_mix", "attn_scale", "mlp_scale", "q_gain", "skip_weights",
                                       "smear.gate", "bigram.scale", "attn.gate_", "lane_")),
     "per-channel gains, gates and mixes: each element is its own knob"),
    ("embeddings", "adam", "tied_embed_lr", lambda n, p: n in ("tok_emb.weight", "bigram.embed.weight"),
     "lookup tables: only the looked-up rows get a gradient, which Muon's whole-matrix update ignores"),
    ("matrices", "muon", "matrix_lr", lambda n, p: p.ndim == 2,
     "block projections and bigram.proj: dense matrices, orthogonalized updates"),
    ("scalars", "adam", "scalar_lr", lambda n, p: True, "anything else (vectors, scalars)"),
)

def optimizer_group(name: str, param: Tensor) -> tuple[str, str, str]:
    """(group, optimizer, learning-rate setting) of one named parameter, from OPTIMIZER_GROUPS."""
    for group, optimizer, lr_setting, matches, _why in OPTIMIZER_GROUPS:
        if matches(name, param):
            return group, optimizer, lr_setting
    raise AssertionError("the last row of OPTIMIZER_GROUPS matches everything")

def build_optimizers(model: GPT, s: Settings, rank: int, world_size: int, device: torch.device,
                     orthogonalizer=orthogonalize, bf16: bool = False):
    groups: dict[tuple[str, str, str], list[Tensor]] = {}
    for name, param in model.named_parameters():
        groups.setdefault(optimizer_group(name, param), []).append(param)
    own_decay = {"embeddings": s.embed_weight_decay} if s.embed_weight_decay >= 0 else {}  # else AdamW's default below
    adam_groups = [dict(params=params, lr=getattr(s, lr), base_lr=getattr(s, lr), name=group,
                        **({"weight_decay": own_decay[group]} if group in own_decay else {}))
                   for (group, opt, lr), params in groups.items() if opt == "adam"]
    adam_kwargs = dict(betas=(s.adam_beta1, s.adam_beta2), eps=s.adam_eps, weight_decay=s.adam_weight_decay)
    if device.type == "cuda":
        adam_kwargs["fused"] = True
    adam = torch.optim.AdamW(adam_groups, **adam_kwargs)
    matrices = [p for (group, opt, lr), params in groups.items() if opt == "muon" for p in params]
    muon = Muon(matrices, lr=s.matrix_lr, momentum=s.muon_momentum, backend_steps=s.muon_backend_steps,
                weight_decay=s.muon_weight_decay, rank=rank, world_size=world_size, orthogonalizer=orthogonalizer,
                dtype=torch.bfloat16 if bf16 else torch.float32)
    for group in muon.param_groups:
        group["base_lr"] = s.matrix_lr
    return [muon, adam]


# ----------------------------------------------------------------------------------------------
# Evaluation
# Standard evaluation cuts the stream into non-overlapping windows. Sliding evaluation runs a
# full window every `stride` tokens and scores only what no earlier window scored: each target
# once, most with seq_len - stride tokens of context. Ranks split the windows, then all-reduce.
# ----------------------------------------------------------------------------------------------

@dataclass
class EvalResult:
    loss_sum: float  # nats
    byte_count: int
    token_count: int
    position_losses: Tensor | None = None  # (N,) fp32 loss of every target position, when asked
    position_token_logprobs: Tensor | None = None  # (N,) or (M, N) log p(given tokens), where given
    position_counts: Tensor | None = None  # (N,) int32: how often each position was scored, when asked

    @property
    def val_loss(self) -> float:
        return self.loss_sum / self.token_count

    @property
    def val_bpb(self) -> float:
        return self.loss_sum / math.log(2) / self.byte_count

def sliding_windows(num_targets: int, seq_len: int, stride: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Window starts, the first window-relative position each window scores, and the window length."""
    if not 0 < stride <= seq_len:
        raise InputError(f"EVAL_STRIDE={stride} must be between 1 and TRAIN_SEQ_LEN={seq_len}")
    width = min(seq_len, num_targets)
    starts = np.arange(0, num_targets - width + 1, stride, dtype=np.int64)
    if starts[-1] + width < num_targets:
        starts = np.append(starts, num_targets - width)
    ends = starts + width
    scored_from = np.concatenate(([0], ends[:-1])) - starts  # everything after the previous window's end
    return starts, scored_from, width

def window_plan(num_targets: int, seq_len: int, stride: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The windows evaluate() runs: sliding for stride > 0, non-overlapping for stride == 0."""
    if stride == 0:
        width = min(seq_len, num_targets)
        starts = np.arange(0, num_targets - width + 1, width, dtype=np.int64)
        return starts, np.zeros_like(starts), width
    return sliding_windows(num_targets, seq_len, stride)

def scoring_batch(num_windows: int, batch_seqs: int, world_size: int) -> int:
    """Windows per forward when a rank scores its share of num_windows: every batch has this one shape."""
    return max(1, min(batch_seqs, -(-num_windows // world_size)))

class Scores:
    """What scoring adds up on one rank: loss, bytes and targets and, when asked, every position's loss
    and log p(token of interest). evaluate() fills one in one call, score-first TTT one chunk at a time.
    token_of_interest: (N,) or (M, N) token ids, -1 for none. Unscored positions are masked, not indexed
    out, so nothing waits for the device; their writes go to one spare slot at the end."""

    def __init__(self, num_targets: int, device: torch.device, keep_positions: bool = False,
                 token_of_interest: Tensor | None = None, count_positions: bool = False):
        self.n, self.device = num_targets, device
        self.counts = torch.zeros(num_targets + 1, device=device, dtype=torch.int32) if count_positions else None
        self.totals = torch.zeros(3, device=device, dtype=torch.float64)  # nats, bytes, targets: exact below 2**53
        self.losses = torch.zeros(num_targets + 1, device=device) if keep_positions else None
        self.wanted = None if token_of_interest is None else token_of_interest.to(device).long()
        self.logprobs = None if self.wanted is None else torch.zeros(self.wanted.shape[:-1] + (num_targets + 1,),
                                                                     device=device)

    def add(self, model, tokens: Tensor, tables: ByteTables, starts: np.ndarray, scored_from: np.ndarray,
            width: int, batch_seqs: int, autocast: bool, rank: int = 0, world_size: int = 1,
            batch: int = 0) -> None:
        """Scores this rank's share of the windows with model (in eval mode: a module or any function from
        token ids to logits); tokens and tables are already on the device. batch: windows per forward (0:
        scoring_batch's choice for these windows); score-first TTT gives the whole stream's to every chunk."""
        # Every forward pass has one shape, (batch, width): the last batch is padded, so a compiled model needs
        # no graph for a short one. Fewer than batch_seqs only when a rank has fewer windows: ranks agree.
        batch = batch or scoring_batch(len(starts), batch_seqs, world_size)
        mine = slice(len(starts) * rank // world_size, len(starts) * (rank + 1) // world_size)
        padding = -len(starts[mine]) % batch  # padding windows repeat start 0 and score nothing
        pad = lambda a, fill: torch.from_numpy(np.concatenate((a[mine], np.full(padding, fill, np.int64)))).to(tokens.device)
        starts, scored_from, offsets = pad(starts, 0), pad(scored_from, width), torch.arange(width + 1, device=tokens.device)
        for b in range(0, starts.numel(), batch):
            batch_starts = starts[b : b + batch]
            windows = tokens[batch_starts[:, None] + offsets]  # (B, width + 1)
            x, y = windows[:, :-1], windows[:, 1:]
            target_pos = batch_starts[:, None] + offsets[:-1]  # (B, width): the index of each target
            with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=autocast):
                logits = model(x).float()
            logp = torch.log_softmax(logits, dim=-1)  # one for the targets and the tokens of interest
            self.record(logp, x, y, target_pos, offsets[None, :-1] >= scored_from[b : b + batch, None], tables)

    def record(self, logp: Tensor, x: Tensor, y: Tensor, target_pos: Tensor, scored: Tensor,
               tables: ByteTables) -> Tensor:
        """Adds the scored positions of one forward: logp (B, T, V) log-probabilities, x and y (B, T) inputs and
        targets, target_pos (B, T) each target's index in the stream, scored (B, T) bool. Returns the (B, T) nll."""
        nll = -logp.gather(-1, y[..., None]).squeeze(-1)
        self.totals += torch.stack((torch.where(scored, nll.double(), 0.0).sum(),
                                    torch.where(scored, tables.target_bytes(x, y, target_pos), 0).sum().double(),
                                    scored.sum().double()))
        write_at = torch.where(scored, target_pos, self.n).view(-1)
        if self.losses is not None:
            self.losses.index_put_((write_at,), nll.view(-1))
        if self.counts is not None:  # a check that every position is scored once
            self.counts.index_add_(0, write_at, torch.ones_like(write_at, dtype=torch.int32))
        if self.wanted is not None:
            wanted = self.wanted.view(-1, self.n)[:, target_pos.clamp(0, self.n - 1)].clamp_min(0).movedim(0, -1)
            lp = logp.gather(-1, wanted)  # (B, T, M)
            self.logprobs.view(-1, self.n + 1)[:, write_at] = lp.view(-1, lp.size(-1)).T
        return nll

    def result(self, world_size: int = 1) -> EvalResult:
        if world_size > 1:
            dist.all_reduce(self.totals)
            for t in (self.losses, self.logprobs, self.counts):
                if t is not None:
                    t[..., self.n] = 0.0
                    dist.all_reduce(t)  # each position was written by exactly one rank, zeros elsewhere
        loss_sum, byte_count, count = self.totals.tolist()
        kept = [None if t is None else t[..., : self.n].cpu() for t in (self.losses, self.logprobs, self.counts)]
        return EvalResult(loss_sum, int(byte_count), int(count), *kept)

@torch.no_grad()
def evaluate(model: nn.Module, tokens: Tensor, tables: ByteTables, seq_len: int, stride: int, batch_seqs: int,
             device: torch.device, autocast: bool, rank: int = 0, world_size: int = 1,
             keep_positions: bool = False, token_of_interest: Tensor | None = None) -> EvalResult:
    """Scores tokens[1:] given what precedes them (stride 0: standard evaluation). keep_positions returns
    every position's loss; token_of_interest (N,) or (M, N) log p(those tokens) at each position."""
    scores = Scores(tokens.numel() - 1, device, keep_positions, token_of_interest)
    model.eval()
    scores.add(model, tokens.to(device), tables.to(device), *window_plan(tokens.numel() - 1, seq_len, stride),
               batch_seqs, autocast, rank, world_size)
    model.train()
    return scores.result(world_size)


# ----------------------------------------------------------------------------------------------
# Training
# Schedules are small functions of (step, elapsed time) that the loop reads. The clock runs only
# while training: warm-up steps are undone, validation pauses it; ranks agree on the stop.
# ----------------------------------------------------------------------------------------------

def batch_geometry(s: Settings, world_size: int) -> tuple[int, int]:
    """(grad_accum_steps, tokens per rank per micro-step), or a clear error if they don't divide."""
    accum = s.grad_accum_steps
    if accum <= 0:
        if 8 % world_size:
            raise InputError(f"the world size {world_size} does not divide 8; set GRAD_ACCUM_STEPS explicitly")
        accum = 8 // world_size
    per_micro = world_size * accum * s.train_seq_len
    if s.train_batch_tokens <= 0 or s.train_batch_tokens % per_micro:
        raise InputError(f"TRAIN_BATCH_TOKENS={s.train_batch_tokens} is not a multiple of world size {world_size} x "
                         f"grad accumulation {accum} x TRAIN_SEQ_LEN={s.train_seq_len} = {per_micro}; "
                         f"set TRAIN_BATCH_TOKENS to a multiple of {per_micro}")
    return accum, s.train_batch_tokens // (world_size * accum)

def training_progress(s: Settings, step: int, elapsed_ms: float) -> float:
    """How far training has gone, 0..1, by steps or by the wall clock, whichever is further."""
    by_steps = step / max(s.iterations, 1)
    by_clock = elapsed_ms / (1000 * s.max_wallclock_seconds) if s.max_wallclock_seconds > 0 else 0.0
    return max(by_steps, by_clock)

def training_phase(s: Settings, progress: float) -> tuple[bool, bool]:
    """(looping, QAT on) at this training progress: the two switches of the model's forward, as a schedule."""
    return s.num_loops > 0 and progress >= s.enable_looping_at, s.qat_enabled and progress >= s.qat_start_frac

def warmup_phases(s: Settings) -> list[tuple[bool, bool]]:
    """The phases training passes through, in order: the warm-up compiles each one's graphs before the clock runs."""
    points = sorted({0.0, s.enable_looping_at, s.qat_start_frac})
    return list(dict.fromkeys(training_phase(s, p) for p in points))

def order_fields(cfg: ModelConfig) -> str:
    """The looped order for the log (the plain stack when NUM_LOOPS=0): its encoder and decoder halves."""
    order = cfg.layer_order()
    return (f"virtual_layers:{len(order)} encoder:{','.join(map(str, order[: len(order) // 2]))} "
            f"decoder:{','.join(map(str, order[len(order) // 2 :]))}")

def lr_scale(s: Settings, step: int, elapsed_ms: float) -> float:
    """Flat, then a linear warm-down to LR_FLOOR: over the last WARMDOWN_FRAC of training progress (steps or the
    wall clock, whichever is further), or over the last WARMDOWN_ITERS steps. Under a wall-clock cap those are
    measured in time (WARMDOWN_ITERS x the mean step time) so the warm-down ends on the cap."""
    if s.warmdown_frac > 0:
        return max(s.lr_floor, min(1.0, (1.0 - training_progress(s, step, elapsed_ms)) / s.warmdown_frac))
    if s.warmdown_iters <= 0:
        return 1.0
    by_steps = min(1.0, max(0.0, (s.iterations - step) / s.warmdown_iters))
    if s.max_wallclock_seconds <= 0 or step == 0:
        return max(s.lr_floor, by_steps)
    warmdown_ms = s.warmdown_iters * elapsed_ms / step
    remaining_ms = max(1000 * s.max_wallclock_seconds - elapsed_ms, 0.0)
    return max(s.lr_floor, min(by_steps, remaining_ms / warmdown_ms if remaining_ms < warmdown_ms else 1.0))

def ema_decay(s: Settings, step: int, progress: float) -> float:
    """EMA_DECAY, or the decay whose time constant is EMA_HORIZON of the run's steps, projected as step / progress:
    the same average at 300 steps as at 5,000 (#1855's 0.9965 over 4,931 steps is a horizon of 0.058)."""
    if not s.ema_horizon:
        return s.ema_decay
    return 1.0 - 1.0 / max(1.0, s.ema_horizon * (step / progress if progress > 0 else s.iterations))

def byte_loss_weights(tables: ByteTables, x: Tensor, y: Tensor, alpha: float) -> Tensor | None:
    """Weights for BPB_LOSS_ALPHA's loss, (1 - alpha) mean CE + alpha sum(bytes x CE) / sum(bytes), the bytes BPB counts
    (the seed's: the piece's bytes + 0.7 for a space, over their vocabulary mean); None for alpha 0, the plain mean."""
    if not alpha:
        return None
    b = tables.target_bytes(x, y).float()
    return (1 - alpha) / b.numel() + alpha * b / b.sum().clamp_min(1)

def muon_momentum(s: Settings, step: int) -> float:
    frac = min(step / s.muon_momentum_warmup_steps, 1.0) if s.muon_momentum_warmup_steps > 0 else 1.0
    return (1 - frac) * s.muon_momentum_warmup_start + frac * s.muon_momentum

class WeightAverage:
    """Stochastic weight averaging: a running mean of snapshots, kept in fp32 on the device."""
    def __init__(self):
        self.mean, self.count = {}, 0  # name -> fp32 tensor, snapshots so far
    @torch.no_grad()
    def add(self, state: dict[str, Tensor]) -> None:
        self.count += 1
        for n, t in state.items():
            t = t.detach().float()
            self.mean[n] = t.clone() if self.count == 1 else self.mean[n].add_(t - self.mean[n], alpha=1 / self.count)

class MovingAverage:
    """EMA_DECAY's exponential moving average of the weights, from the initial ones, updated every step, fp32."""
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.state = {n: t.detach().float().clone() for n, t in model.state_dict().items()}
    @torch.no_grad()
    def update(self, model: nn.Module) -> None:  # one multi-tensor kernel on CUDA, not one per tensor
        current = model.state_dict()
        torch._foreach_lerp_(list(self.state.values()), [current[n].detach().float() for n in self.state], 1 - self.decay)

class TrainStep:
    """The model as trained (compiled, in DDP) and its optimizers; a call is one optimizer step."""
    def __init__(self, s: Settings, rt: Runtime, base_model: GPT, loader, byte_tables: ByteTables | None = None):
        self.s, self.rt, self.base_model, self.loader, self.byte_tables = s, rt, base_model, loader, byte_tables
        self.grad_accum, self.local_tokens = batch_geometry(s, rt.world_size)
        self.model = self.compiled = compile_model(base_model, rt.compile_backend) if rt.compile else base_model
        if rt.world_size > 1:
            self.model = nn.parallel.DistributedDataParallel(
                self.compiled, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None,
                broadcast_buffers=False)  # training changes no buffer: nothing to broadcast each forward
        orthogonalizer = compile_model(orthogonalize, rt.compile_backend) if rt.compile else orthogonalize
        self.optimizers = build_optimizers(base_model, s, rt.rank, rt.world_size, rt.device, orthogonalizer,
                                           bf16=rt.autocast)
    def __call__(self, step: int, elapsed_ms: float) -> tuple[Tensor, float]:  # (loss on the device, lr scale)
        s, rt = self.s, self.rt
        scale = lr_scale(s, step, elapsed_ms)
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * scale
        self.optimizers[0].param_groups[0]["momentum"] = muon_momentum(s, step)
        loss_total = torch.zeros((), device=rt.device)
        for micro in range(self.grad_accum):
            x, y = self.loader.next_batch(self.local_tokens, s.train_seq_len)
            if rt.world_size > 1:  # all-reduce gradients on the last micro-step only
                self.model.require_backward_grad_sync = micro == self.grad_accum - 1
            weights = byte_loss_weights(self.byte_tables, x, y, s.bpb_loss_alpha)
            with torch.autocast(device_type=rt.device.type, dtype=torch.bfloat16, enabled=rt.autocast):
                loss = self.model(x, y, weights)
            (loss / self.grad_accum).backward()
            loss_total += loss.detach()
        if s.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.base_model.parameters(), s.grad_clip_norm)
        for opt in self.optimizers:
            opt.step()
        self.base_model.zero_grad(set_to_none=True)
        return loss_total / self.grad_accum, scale

class StepClock:
    """Training time and the wall-clock stop: one clock for all ranks, one sync a step. The step's one
    all-reduce carries (loss, stop vote, each rank's training time at the end of its previous step, in a
    slot of its own); every rank then reads the slowest rank's time, so QAT's start, SWA's snapshots and
    the learning rate follow the same elapsed time on every rank (a step's own end is known only after
    its sync: the agreed time is the previous step's end plus a step). The vote: the step just launched
    will end past the cap."""
    now = staticmethod(time.perf_counter)  # a test skews one rank's clock here
    def __init__(self, s: Settings, rt: Runtime):
        self.cap_ms, self.rt = 1000 * s.max_wallclock_seconds, rt
        self.train_ms, self.last_step_ms = 0.0, 0.0  # agreed by all ranks
        self.local_ms, self.started = 0.0, self.now()  # this rank's own clock
    @property
    def elapsed_ms(self) -> float:
        """The agreed time now, at the end of the step just taken: the slowest rank's time a step earlier
        plus a step. QAT's start, the learning rate and so SWA's snapshots read this."""
        return self.train_ms + self.last_step_ms
    def pause(self, seconds: float) -> None:
        """The clock does not run while validating."""
        self.started += seconds
    def end_step(self, loss: Tensor) -> tuple[float, bool]:
        """(mean training loss over ranks, stop now) for the step just launched."""
        # train_ms is the end of the step before last: the step just launched ends about two steps later
        vote = self.cap_ms > 0 and self.train_ms + 2 * self.last_step_ms >= self.cap_ms
        # new_full fills on the device: a torch.tensor(...) copied from the host would wait for the step here
        packed = loss.float().reshape(()).new_zeros(2 + self.rt.world_size)
        packed[0], packed[1], packed[2 + self.rt.rank] = loss.float().reshape(()), float(vote), self.local_ms
        if self.rt.world_size > 1:
            dist.all_reduce(packed)
        loss_sum, votes, *clocks = packed.tolist()  # the step's one sync
        self.local_ms = 1000 * (self.now() - self.started)
        self.last_step_ms, self.train_ms = max(clocks) - self.train_ms, max(clocks)
        return loss_sum / self.rt.world_size, votes > 0
    def finish(self) -> float:
        """The training time all ranks agree on once the loop has ended (one more all-reduce, outside it)."""
        clocks = torch.zeros(self.rt.world_size, dtype=torch.float64, device=self.rt.device)
        clocks[self.rt.rank] = 1000 * (self.now() - self.started)
        if self.rt.world_size > 1:
            dist.all_reduce(clocks)
        self.train_ms = float(clocks.max())
        return self.train_ms

# The training script and the modules it imports: logged as the code that ran, and counted as its bytes
TRAINING_MODULES = (__file__, token_data.__file__, allocation.__file__, artifact.__file__, quantize.__file__,
                    code_size.__file__, run_files.__file__, str(Path(__file__).with_name("recipes.py")))  # imported by RECIPE

def train(s: Settings) -> dict:
    # Checked before the process group forms and before anything is written: every rank fails alike.
    validate_settings(s)
    # the seed's and the recipe's lines first: export_reserved's copy of the settings does not carry them
    notes = [*s.seed_notes, *s.recipe_notes, *unused_setting_notes(s), *run_length_notes(s)]
    given = s.max_wallclock_seconds
    s = export_reserved(s)  # the wall-clock stop leaves room for the export's calibration, GPTQ and LQER
    if s.max_wallclock_seconds != given:
        notes.append(f"note max_wallclock_seconds:{given:g}->{s.max_wallclock_seconds:g} gptq_reserve_seconds:"
                     f"{s.gptq_reserve_seconds:g} # training stops early: the export's calibration runs in the cap")
    grad_accum, _ = batch_geometry(s, int(os.environ.get("WORLD_SIZE", "1")))
    cfg = ModelConfig.from_settings(s)
    validate_model_config(cfg)
    run_id, out_dir = s.run_id or str(uuid.uuid4()), Path(s.output_dir)
    log_path, artifact_path = out_dir / "logs" / f"{run_id}.txt", out_dir / ARTIFACT_NAME
    for folder in (out_dir, log_path.parent):
        check_writable(folder, f"OUTPUT_DIR={s.output_dir}")
    if artifact_path.is_dir():
        raise InputError(f"{artifact_path} is a folder, where the artifact goes; remove it or set OUTPUT_DIR elsewhere")
    if log_path.exists():
        raise InputError(f"RUN_ID={run_id}: {log_path} already holds a run; choose another RUN_ID or unset it")
    sp = load_tokenizer(s.tokenizer_path, s.vocab_size)
    identity = data_identity(s.data_path, s.tokenizer_path)
    notes += check_calibration_data(s)
    rt = init_runtime(s, (s.model_dim, s.mlp_mult * s.model_dim))
    claim_output_dir(out_dir, run_id, rt.rank, rt.world_size, rt.device)  # before anything is written there
    log = Logger(log_path if rt.is_main else None)
    train_shards = list_shards(s.data_path, "train")
    val_tokens = load_validation_tokens(s.data_path, s.vocab_size, s.train_seq_len, s.val_max_tokens)
    byte_tables = validation_byte_tables(sp, s.data_path, identity, val_tokens)
    log(f"run run_id:{log_value(run_id)} {library_versions()} code_sha256:{file_sha256(__file__)}")
    log.code(*TRAINING_MODULES)  # the modules it imports run as part of it
    for line in (s.log_line(), *notes):
        log(line)
    name = torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else cpu_name()
    log(f"hardware device:{rt.device} name:{log_value(name)} world_size:{rt.world_size} compile:{int(rt.compile)} "
        f"compile_backend:{rt.compile_backend} autocast_bf16:{int(rt.autocast)} {rt.precision_probe} "
        f"grad_accum_steps:{grad_accum} cpu_threads:{torch.get_num_threads()} sdpa:{pin_flash_attention(rt)}")
    val_positions = torch.arange(val_tokens.numel() - 1)
    log(f"data train_shards:{len(train_shards)} val_tokens:{val_tokens.numel() - 1} "
        f"val_bytes:{int(byte_tables.target_bytes(val_tokens[:-1], val_tokens[1:], val_positions).sum())} "
        + " ".join(f"{k}:{v}" for k, v in identity.items()))
    if identity["manifest"] == "none":
        log(f"warning missing:{log_value(Path(s.data_path) / MANIFEST_NAME)} # tokenizer and shards unchecked")
    if artifact_path.is_file():
        log(f"note replacing:{log_value(artifact_path)} bytes:{artifact_path.stat().st_size} # an earlier run's "
            "artifact: this run's export replaces it")
    val_tokens, byte_tables = val_tokens.to(rt.device), byte_tables.to(rt.device)  # resident for every evaluation
    torch.manual_seed(s.seed)
    np.random.seed(s.seed)
    base_model = GPT(cfg).to(rt.device)
    n_params, n_bigram = (sum(p.numel() for p in m.parameters()) for m in (base_model, base_model.bigram))
    log(f"model params:{n_params} params_without_bigram:{n_params - n_bigram} {order_fields(cfg)} num_loops:{cfg.num_loops}"
        + (f" plain_layers:{cfg.num_layers} looping_at:{s.enable_looping_at}" if cfg.num_loops else ""))
    train_step = TrainStep(s, rt, base_model, DistributedTokenLoader(train_shards, s.vocab_size, rt.rank,
                                                                     rt.world_size, rt.device),
                           dataclasses.replace(byte_tables, target_sidecar=None))  # training text: the tables
    compiled, optimizers, loader = train_step.compiled, train_step.optimizers, train_step.loader
    first_rung = MIXED_QUANT_RUNG if s.use_mixed_quant else 0
    qat_rung = EXPORT_LADDER[first_rung]  # QAT trains on the grid the export starts from (rd: #1855's grids)
    qat_grids = quantize.qat_grids(base_model.state_dict()) if s.export_allocation == "rd" else None
    # Warm-up: compile the graphs of every phase (plain and looped, QAT off and on), then restore weights, optimizers
    # and data: free, and no graph is compiled at a switch while the clock runs.
    if s.warmup_steps > 0:
        initial_model = {n: t.detach().clone() for n, t in base_model.state_dict().items()}
        initial_opts = [copy.deepcopy(opt.state_dict()) for opt in optimizers]
        t0, phases = time.perf_counter(), warmup_phases(s)
        for w in range(s.warmup_steps):
            base_model.looping, qat = phases[w * len(phases) // s.warmup_steps]
            set_fake_quant(base_model, qat, qat_rung, qat_grids)
            train_step(0, 0.0)
        sync(rt.device)
        base_model.load_state_dict(initial_model)
        for saved, opt in zip(initial_opts, optimizers):
            opt.load_state_dict(saved)
        set_fake_quant(base_model, False)
        loader.stream.reset()
        log(f"warmup steps:{s.warmup_steps} phases:{len(phases)} time:{1000 * (time.perf_counter() - t0):.0f}ms "
            f"{compiled_graphs(GPT.forward)} # undone")
    def score(model: nn.Module, stride: int, batch_seqs: int) -> tuple[EvalResult, float]:
        t0 = time.perf_counter()
        r = evaluate(model, val_tokens, byte_tables, s.train_seq_len, stride, batch_seqs, rt.device, rt.autocast,
                     rt.rank, rt.world_size)
        return r, 1000 * (time.perf_counter() - t0)
    val_batch_seqs = max(1, s.val_batch_size // (rt.world_size * s.train_seq_len))
    swa = WeightAverage()
    ema = MovingAverage(base_model, s.ema_decay) if s.ema_decay > 0 or s.ema_horizon > 0 else None
    step, qat_on, warmdown_steps, stop_reason = 0, False, 0, "iterations"
    base_model.looping = training_phase(s, 0.0)[0]
    sync(rt.device)
    clock = StepClock(s, rt)
    while step < s.iterations:
        looping, qat = training_phase(s, training_progress(s, step, clock.elapsed_ms))
        if looping and not base_model.looping:
            base_model.looping = True
            log(f"loop_start step:{step} train_time:{clock.elapsed_ms:.0f}ms virtual_layers:{len(base_model.slots)}")
        if qat and not qat_on:
            set_fake_quant(base_model, True, qat_rung, qat_grids)
            qat_on = True
            quantized = sum(bool(getattr(m, "fake_quant", False)) for m in base_model.modules())
            log(f"qat_start step:{step} train_time:{clock.elapsed_ms:.0f}ms fake_quantized_matrices:{quantized}")
        loss, scale = train_step(step, clock.elapsed_ms)
        step += 1
        warmdown_steps += scale < 1.0
        loss, stop = clock.end_step(loss)
        train_ms = clock.local_ms  # for the log: rank 0's own time, to the end of this step
        if not math.isfinite(loss):
            raise InputError(f"the training loss is {loss} at step {step}; nothing was exported (any earlier "
                                   "artifact is kept); lower MATRIX_LR/SCALAR_LR/TIED_EMBED_LR or check the data")
        if ema is not None:
            ema.decay = ema_decay(s, step, training_progress(s, step, clock.elapsed_ms))
            ema.update(base_model)
        if s.swa_enabled and scale < s.swa_start_frac and step % s.swa_every == 0:
            swa.add(ema.state if ema is not None else base_model.state_dict())
        if step % s.train_log_every == 0 or step <= 10:
            log(f"train_step step:{step}/{s.iterations} train_loss:{loss:.4f} train_time:{train_ms:.0f}ms "
                f"step_avg:{train_ms / step:.2f}ms tokens_per_s:{s.train_batch_tokens * step / (train_ms / 1000):.0f} "
                f"lr_scale:{scale:.4f}")
        if stop:
            stop_reason = "wallclock_cap"
            log(f"stopping_early reason:wallclock_cap train_time:{train_ms:.0f}ms step:{step}/{s.iterations} "
                f"last_lr_scale:{scale:.4f} steps_in_warmdown:{warmdown_steps}")
            break
        if s.val_loss_every > 0 and step % s.val_loss_every == 0 and step < s.iterations:
            r, eval_ms = score(compiled, 0, val_batch_seqs)
            clock.pause(eval_ms / 1000)
            log(f"val_step step:{step}/{s.iterations} val_loss:{r.val_loss:.4f} val_bpb:{r.val_bpb:.4f} "
                f"train_time:{train_ms:.0f}ms step_avg:{train_ms / max(step, 1):.2f}ms eval_time:{eval_ms:.0f}ms "
                f"precision:{rt.precision}")
    train_ms = clock.finish()
    log(f"train_done steps:{step} reason:{stop_reason} train_time:{train_ms:.0f}ms "
        f"step_avg:{train_ms / max(step, 1):.2f}ms {peak_memory_line(rt.device)} {compiled_graphs(GPT.forward)}")
    averaged = swa.mean if swa.count else ema.state if ema is not None else None
    if averaged is not None:
        current = base_model.state_dict()
        base_model.load_state_dict({n: t.to(current[n].dtype) for n, t in averaged.items()})
    if swa.count:
        log(f"swa snapshots:{swa.count} # the average is exported" + (", of the EMA's weights" if ema else ""))
    elif ema is not None:
        log(f"ema decay:{ema.decay:.6g} horizon:{s.ema_horizon} # the moving average is exported (decay: the last step's)")
    set_fake_quant(base_model, False)
    if base_model.looping != (cfg.num_loops > 0):  # the artifact's order is the looped one, reached or not
        base_model.looping = True
        log(f"warning loop_start:never # training ended before ENABLE_LOOPING_AT={s.enable_looping_at}; the artifact "
            "and its scores below run the looped order all the same")
    # The artifact is written first: whatever fails after this line, the trained weights are on disk.
    meta = {"model_config": cfg.record(), "train_seq_len": s.train_seq_len, "seed": s.seed, "recipe": s.recipe,
            "run_id": run_id, "steps": step, "precision": rt.precision,
            # evaluation refuses other data, and the other tokenization (plain or case operators)
            "data": {k: identity[k] for k in ("tokenizer_sha256", "val_sha256", "tokenization")}}
    counted = counted_code(s.export_for_eval, s.ship_code)  # the evaluation's code, not only this script's
    if rt.is_main:
        t0 = time.perf_counter()
        state = {n: t.detach().cpu() for n, t in base_model.state_dict().items()}
        budget = counted.code_bytes + counted.reserve_bytes
        try:
            calibration = calibrate(base_model, s, rt.device, rt.autocast)
            blob, rung = (export_artifact(state, meta, budget, s.artifact_cap_bytes, s.zstd_level, first_rung, log,
                                          s.export_quantizer, calibration, s.lqer_rank, s.lqer_tensors,
                                          s.lqer_factor_bits, rt.device) if s.export_allocation == "ladder" else
                          export_rd(state, meta, budget, s.artifact_cap_bytes, s.zstd_level, log, s.export_quantizer,
                                    calibration, rt.device, allocation.replaced_loss(
                                        base_model, calibration_batches(s, rt.device), rt.autocast),
                                    s.max_wallclock_seconds <= 0))
        except (RuntimeError, ValueError, MemoryError) as e:  # the trained weights reach the disk all the same
            fell_back = f" export_allocation:{s.export_allocation}->ladder" if s.export_allocation != "ladder" else ""
            log(f"warning export_quantizer:{s.export_quantizer} failed:{type(e).__name__}{fell_back} # "
                f"{log_value(str(e)[:200])}; exported with round-to-nearest on the ladder instead")
            blob, rung = export_artifact(state, meta, budget, s.artifact_cap_bytes, s.zstd_level, first_rung, log)
        artifact_path = write_artifact(artifact_path, blob, run_id, log)
        log(f"export time:{1000 * (time.perf_counter() - t0):.0f}ms path:{log_value(artifact_path)} rung:{rung.name}")
    # every rank reads back the file rank 0 wrote, and only if it holds the bytes written (checked by hash)
    written = [str(artifact_path), hashlib.sha256(blob).hexdigest() if rt.is_main else ""]
    if rt.world_size > 1:
        dist.broadcast_object_list(written, src=0)
    artifact_path, artifact_sha256 = Path(written[0]), written[1]
    artifact_bytes = artifact_path.read_bytes()
    if hashlib.sha256(artifact_bytes).hexdigest() != artifact_sha256:
        raise InputError(f"{artifact_path} no longer holds the bytes this run wrote (sha256 {artifact_sha256[:16]}): "
                         "another process replaced it; give each run an OUTPUT_DIR of its own and rerun")
    model_bytes, cap = len(artifact_bytes), s.artifact_cap_bytes
    total = model_bytes + counted.code_bytes + counted.reserve_bytes
    log(f"artifact model_bytes:{model_bytes} train_code_bytes:{code_bytes(*TRAINING_MODULES)} "
        f"{counted.log_fields()} "
        f"total_bytes:{total} cap_bytes:{cap} headroom_bytes:{cap - total} artifact_sha256:{artifact_sha256}"
        + ("" if total <= cap else " over_cap:1"))
    # Standard windows (1/32 the cost of sliding ones) before and after the roundtrip: the quantization gap.
    pre, pre_ms = score(compiled, 0, s.eval_batch_seqs)
    log(f"prequant_exact val_loss:{pre.val_loss:.8f} val_bpb:{pre.val_bpb:.8f} eval_time:{pre_ms:.0f}ms stride:0 "
        f"precision:{rt.precision}")
    # What a reader of the file gets: read back, dequantized, into the same (compiled) model: no new graphs.
    current = base_model.state_dict()
    roundtrip_state = unpack_artifact(artifact_bytes, str(artifact_path)).state  # the bytes checked above
    base_model.load_state_dict({n: t.to(current[n].dtype) for n, t in roundtrip_state.items()})
    roundtrip, eval_ms = score(compiled, 0, s.eval_batch_seqs)
    log(f"quant_gap val_bpb:{roundtrip.val_bpb - pre.val_bpb:+.8f} prequant:{pre.val_bpb:.8f} "
        f"roundtrip:{roundtrip.val_bpb:.8f} stride:0 precision:{rt.precision}")
    final, eval_ms = (roundtrip, eval_ms) if s.eval_stride == 0 else score(compiled, s.eval_stride, s.eval_batch_seqs)
    log(f"compile {compiled_graphs(GPT.forward, orthogonalize)} limit_per_function:{COMPILE_RECOMPILE_LIMIT}")
    exact = f"val_loss:{final.val_loss:.8f} val_bpb:{final.val_bpb:.8f}"
    log(f"final_int6_zstd_roundtrip_exact {exact} eval_time:{eval_ms:.0f}ms stride:{s.eval_stride} "
        f"precision:{rt.precision}")
    log(f"final_int8_zlib_roundtrip_exact {exact} precision:{rt.precision}")  # the last line: the community's log readers look for it
    if rt.world_size > 1:
        dist.barrier()
    release_output_dir(out_dir)
    return {"val_loss": final.val_loss, "val_bpb": final.val_bpb, "prequant_val_bpb": pre.val_bpb,
            "model_bytes": model_bytes, "steps": step, "artifact": str(artifact_path)}

def run_main(entry, script: str, *input_errors: type[Exception]) -> None:
    """Runs a script's entry point: bad input (InputError, or input_errors) ends it with one line, exit 2."""
    Logger.active = None  # an error is added to this entry point's own log only
    try:
        entry()
    except (InputError, *input_errors) as e:
        # Under torchrun every rank meets the same bad input: rank 0 says it; the others wait a
        # moment before exiting, so that torchrun does not stop rank 0 before it has spoken.
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"{script}: error: {e}", file=sys.stderr, flush=True)
            if Logger.active is not None:  # the log says how its run ended (console=False: said above)
                Logger.active(f"error script:{script} # {e}", console=False)
        else:
            time.sleep(2)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

def main() -> None:
    train(Settings.from_env())

if __name__ == "__main__":
    run_main(main, "train_gpt.py")
