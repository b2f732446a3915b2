"""
phased_ttt.py: phased score-first test-time training (TTT_MODE=phased) over the validation stream.

The stream is cut into documents at BOS (each target belongs to the document of the token that
predicts it, so a document's last target is the next document's BOS). Each document is scored on
its own, with no context from any other document, in short chunks of `doc_chunk_tokens` targets:

  1. chunk j's window (the document's tokens up to the chunk's end, at most seq_len of them) goes
     through the model with this document's own rank-r LoRA on the block matrices; the chunk's
     targets are scored from that forward, before anything is learned from them;
  2. then one Adam step on this document's LoRA from the same forward's loss on the chunk.

The LoRA starts afresh (B = 0: the model itself) at every document. Documents are grouped into
`phases` phases in stream order (the first `phase_docs` documents; 0: the first P/(P+1)). When every document of
a phase is scored, the model's own weights take `epochs` passes of SGD over exactly that phase's
targets (score_first_ttt's training step: a fixed global batch split across ranks, the gradient
all-reduced), and the next phase is scored with the improved model. Documents after the phased
prefix are scored with the model as the last phase left it, each with its own LoRA.

Every target is scored exactly once, by a model that has learned only from targets already scored:
its own document's earlier chunks (LoRA) and the earlier phases' documents (SGD). A document's
scores depend on its own tokens and on earlier phases only, so documents can be spread over ranks
in any order and batched together: each rank scores its share (documents sorted by length, dealt
round robin), each batch row carries its own LoRA (an Adam step is per element, and each row's loss
is normalised by its own count), and 1 rank and N ranks give the same scores to float rounding.

The records that made this the frontier's TTT (PR #1530, #1610, #1626, #1855 in openai/parameter-
golf) describe it; this is our own code. Their settings for FineWeb: chunks of 48 tokens, rank 80,
3 phases over the first 2,500 documents, SGD momentum 0.9 for the global step.

    result = phased_evaluate(model, tokens, byte_tables, seq_len, PhasedSettings(...), device=device)
    result.val_bpb, result.phases_adapted, result.lora_steps, result.stop_note()

eval_final.py runs it with USE_TTT=1 TTT_MODE=phased; its settings come from the artifact (chosen by
build_ttt_settings.py on held-out training text), each one given by hand winning.
"""

from __future__ import annotations

import dataclasses
import math
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

import train_gpt
from score_first_ttt import LORA_TARGETS, ChunkPlan, TTTSettingError, _Adapter, _base_module, _Run
from train_gpt import ByteTables, EvalResult

MODE = "phased"
BOS_ID = 1  # data/prepare.py writes every document as BOS and its tokens
ADAM_BETAS = (0.9, 0.99)  # the per-document LoRA's Adam
# Adam's epsilon, above float rounding of a gradient: Adam's first steps move each weight by about the rate times the
# sign of its gradient, so with a tiny epsilon a gradient that is rounding noise (the all-reduce's summation order
# on N ranks) would take a full step; at 1e-6 it takes a negligible one, and 1 and N ranks agree
ADAM_EPS = 1e-6


@dataclass(frozen=True)
class PhasedSettings:
    """The phased mode's knobs, by their eval_final environment names."""
    doc_chunk_tokens: int = 32  # TTT_DOC_CHUNK_TOKENS: targets scored per LoRA step
    rank_r: int = 8  # TTT_RANK
    lora_alpha: float = 16.0  # TTT_LORA_ALPHA: the LoRA's scale is alpha / rank
    lora_lr: float = 0.01  # TTT_LR: the per-document Adam's learning rate; 0: no LoRA steps
    phases: int = 3  # TTT_PHASES: global SGD rounds; 0: none
    phase_docs: int = 0  # TTT_PHASE_DOCS: documents the phases cover, from the first; 0: the first P/(P+1) of them
    global_lr: float = 0.002  # TTT_GLOBAL_LR
    momentum: float = 0.9  # TTT_MOMENTUM
    epochs: int = 1  # TTT_EPOCHS: passes over a phase's targets
    batch_seqs: int = 16  # TTT_BATCH_SEQS: global step sequences, all ranks together
    clip: float = 1.0  # TTT_GRAD_CLIP: the global step's gradient-norm clip; 0: none
    doc_batch: int = 16  # TTT_DOC_BATCH: documents per forward on a rank
    max_seconds: float = 0.0  # TTT_MAX_SECONDS: 0: no budget

    def check(self, seq_len: int) -> None:
        def bad(setting: str, value, fix: str):
            raise TTTSettingError(f"{setting}={value} {fix}")

        def whole(value, least: int) -> bool:
            return isinstance(value, int) and value >= least

        if not (whole(self.doc_chunk_tokens, 1) and self.doc_chunk_tokens <= seq_len):
            bad("TTT_DOC_CHUNK_TOKENS", self.doc_chunk_tokens, f"must be between 1 and the window {seq_len}; set e.g. "
                "TTT_DOC_CHUNK_TOKENS=32")
        if not whole(self.rank_r, 1):
            bad("TTT_RANK", self.rank_r, "must be a whole number of at least 1; set e.g. TTT_RANK=8")
        if not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            bad("TTT_LORA_ALPHA", self.lora_alpha, "must be positive; set e.g. TTT_LORA_ALPHA=16")
        for setting, value in (("TTT_LR", self.lora_lr), ("TTT_GLOBAL_LR", self.global_lr)):
            if not (math.isfinite(value) and value >= 0):
                bad(setting, value, f"must be at least 0 (0: that step is not taken); set e.g. {setting}=0.01")
        if not whole(self.phases, 0):
            bad("TTT_PHASES", self.phases, "must be a whole number of at least 0 (0: no global step); set TTT_PHASES=3")
        if not whole(self.phase_docs, 0):
            bad("TTT_PHASE_DOCS", self.phase_docs, "must be at least 0 (0: P/(P+1) of the documents); set e.g. "
                "TTT_PHASE_DOCS=2500")
        if not (math.isfinite(self.momentum) and 0 <= self.momentum < 1):
            bad("TTT_MOMENTUM", self.momentum, "must be in [0, 1); set e.g. TTT_MOMENTUM=0.9")
        if not whole(self.epochs, 1):
            bad("TTT_EPOCHS", self.epochs, "must be a whole number of at least 1; set e.g. TTT_EPOCHS=1")
        if not whole(self.batch_seqs, 1):
            bad("TTT_BATCH_SEQS", self.batch_seqs, "must be at least 1; set e.g. TTT_BATCH_SEQS=16")
        if not (math.isfinite(self.clip) and self.clip >= 0):
            bad("TTT_GRAD_CLIP", self.clip, "must be at least 0 (0: no clipping); set e.g. TTT_GRAD_CLIP=1.0")
        if not whole(self.doc_batch, 1):
            bad("TTT_DOC_BATCH", self.doc_batch, "must be at least 1; set e.g. TTT_DOC_BATCH=16")
        if not (self.max_seconds >= 0 and not math.isnan(self.max_seconds)):
            bad("TTT_MAX_SECONDS", self.max_seconds, "must be at least 0 (0: no budget); set e.g. TTT_MAX_SECONDS=500")


# ----------------------------------------------------------------------------------------------
# The plan: documents, their chunks, the phases, and who scores what
# ----------------------------------------------------------------------------------------------

def document_bounds(tokens: np.ndarray, num_targets: int) -> np.ndarray:
    """(D + 1,) target positions where documents start, then num_targets: a document starts at every BOS
    (the target of position t is tokens[t + 1], predicted from tokens[t] back to the document's BOS)."""
    starts = np.flatnonzero(tokens[1:num_targets] == BOS_ID) + 1
    return np.concatenate(([0], starts, [num_targets])).astype(np.int64)


def phase_bounds(docs: np.ndarray, phases: int, phase_docs: int) -> np.ndarray:
    """(P + 1,) document indices where each phase starts, then where the phased prefix ends. phase_docs == 0: the
    first P / (P + 1) of the documents, so that the last global step still has documents to improve (a step
    after the last document would teach nothing scored later)."""
    total = docs.size - 1
    covered = total * phases // (phases + 1) if phase_docs == 0 else min(phase_docs, total)
    phases = min(phases, covered)
    return np.asarray([covered * p // phases for p in range(phases + 1)] if phases else [0], dtype=np.int64)


def check_phases(tokens: np.ndarray, s: PhasedSettings, stream: str = "validation stream") -> list[str]:
    """Global phases against the documents of the stream: none to phase is refused (the settings would do nothing);
    fewer than asked, or a global rate with no phase, is a note line."""
    docs = document_bounds(tokens, tokens.size - 1)
    planned = phase_bounds(docs, s.phases, s.phase_docs).size - 1
    if s.phases and s.global_lr and not planned:
        raise TTTSettingError(f"TTT_PHASES={s.phases} with TTT_GLOBAL_LR={s.global_lr:g}: the {stream} holds "
                              f"{docs.size - 1} document(s), none scored before the last for a global step to help; "
                              "set TTT_PHASES=0 and unset TTT_GLOBAL_LR (no global step), or score more documents")
    if s.phases and s.global_lr and planned < s.phases:
        return [f"note ttt_phases:{s.phases}->{planned} documents:{docs.size - 1} # the {stream} has documents for "
                f"{planned} phase(s) only"]
    if not s.phases and s.global_lr != PhasedSettings.global_lr:
        return [f"note unused:TTT_GLOBAL_LR={s.global_lr:g} # TTT_PHASES=0: no global step"]
    return []


def documents_of_rank(first: int, last: int, docs: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """This rank's documents among [first, last): longest first, dealt round robin (ties by position)."""
    index = np.arange(first, last)
    lengths = docs[index + 1] - docs[index]
    order = index[np.lexsort((index, -lengths))]
    return order[rank::world_size]


def chunks_of(length: int, chunk: int) -> int:
    return -(-length // chunk)


BUCKET_GROWTH = 4  # each window length the pass compiles is this many times the one before


def window_buckets(chunk: int, seq_len: int) -> tuple[int, ...]:
    """The window lengths a document's chunks are padded to, so that a compiled pass runs a few fixed shapes: the
    chunk, then BUCKET_GROWTH times longer each, up to the window (chunk j's window, up to the chunk's end, is
    min((j + 1) * chunk, seq_len) tokens; a chunk is padded to the first length that holds it)."""
    sizes, width = [], chunk
    while width < seq_len:
        sizes.append(width)
        width *= BUCKET_GROWTH
    return (*sizes, seq_len)


def bucket_of(j: int, chunk: int, seq_len: int, buckets: tuple[int, ...]) -> int:
    need = min((j + 1) * chunk, seq_len)
    return next(b for b in buckets if b >= need)


def bucket_steps(lengths: np.ndarray, chunk: int, seq_len: int, doc_batch: int) -> dict[int, int]:
    """The forwards a rank runs over documents of these lengths (already dealt to it, longest first), by window
    length: each batch of doc_batch documents runs one forward per chunk of its longest document."""
    buckets = window_buckets(chunk, seq_len)
    counts = dict.fromkeys(buckets, 0)
    lengths = np.asarray(lengths, dtype=np.int64)
    for b in range(0, lengths.size, doc_batch):
        for j in range(chunks_of(int(lengths[b : b + doc_batch].max()), chunk)):
            counts[bucket_of(j, chunk, seq_len, buckets)] += 1
    return counts


def window_tokens(lengths: np.ndarray, chunk: int, seq_len: int) -> int:
    """Tokens the phased pass puts through the model for documents of these lengths (targets): chunk j of a
    document reads a window of min((j + 1) * chunk, its length, seq_len) tokens ending at the chunk's end."""
    total = 0
    for length in np.asarray(lengths, dtype=np.int64).tolist():
        ends = np.minimum(chunk * np.arange(1, chunks_of(length, chunk) + 1), length)
        total += int(np.minimum(ends, ends - np.maximum(0, chunk * np.arange(1, ends.size + 1) - seq_len)).sum())
    return total


def global_steps(docs: np.ndarray, s: PhasedSettings, seq_len: int) -> int:
    """The global SGD steps of a pass: per phase, epochs x batches of its targets' training sequences."""
    if s.global_lr == 0:
        return 0
    phases = phase_bounds(docs, s.phases, s.phase_docs)
    return sum(s.epochs * chunks_of(chunks_of(int(docs[b] - docs[a]), seq_len), s.batch_seqs)
               for a, b in zip(phases[:-1], phases[1:]))


# ----------------------------------------------------------------------------------------------
# Per-document adapters: one LoRA per batch row
# ----------------------------------------------------------------------------------------------

_ATTACHED: "weakref.WeakKeyDictionary[nn.Module, DocumentLoRA]" = weakref.WeakKeyDictionary()


class DocumentLoRA:
    """Rank-r adapters on the block matrices, one set per batch row: row i's output of W x is W x + (alpha / r)
    B_i A_i x. Every row starts with the same A (random, seeded) and B = 0, so it starts as the model itself
    and B gets a gradient from the first step. Applied by forward hooks while `enabled` (inside `with lora:`).

    The hooks stay on the model once attached (`for_model`), adding nothing while disabled: a compiled graph traces
    the hooks it finds and torch.compile does not guard on them, so hooks added or removed between passes would be
    missed or looked up where they no longer are. One set per model; asking for another shape replaces it and
    drops the compiled graphs that read the old one."""

    def __init__(self, model: nn.Module, rows: int, rank_r: int, alpha: float, seed: int, device: torch.device):
        self.scale, self.rows = alpha / rank_r, rows
        self.key = (rows, rank_r, float(alpha), seed, str(device))
        gen = torch.Generator().manual_seed(seed)
        self.modules, self.a0, self.a, self.b = [], [], [], []
        for name, module in _base_module(model).named_modules():
            if name.startswith("blocks.") and isinstance(module, nn.Linear) and name.endswith(LORA_TARGETS):
                a = torch.randn(rank_r, module.in_features, generator=gen) / math.sqrt(module.in_features)
                self.modules.append(module)
                self.a0.append(a.to(device))
                self.a.append(a.to(device).expand(rows, -1, -1).clone().requires_grad_(True))
                self.b.append(torch.zeros(rows, module.out_features, rank_r, device=device, requires_grad=True))
        if not self.modules:
            raise TTTSettingError("TTT_MODE=phased: the model has no block matrices to adapt; set TTT_MODE=full")
        self.enabled = False  # off: the hooks add nothing (the model itself)
        self.compiled = False  # a compiled graph has read these adapters
        self._handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.modules)]

    @classmethod
    def for_model(cls, model: nn.Module, rows: int, rank_r: int, alpha: float, seed: int,
                  device: torch.device) -> "DocumentLoRA":
        """The model's adapters, made and attached on first use, reset (every row the model itself) after."""
        base = _base_module(model)
        lora = _ATTACHED.get(base)
        if lora is not None and lora.key == (rows, rank_r, float(alpha), seed, str(device)):
            lora.reset()
            return lora
        if lora is not None:
            lora.detach()
        lora = _ATTACHED[base] = cls(model, rows, rank_r, alpha, seed, device)
        return lora

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self.compiled:  # graphs that read these hooks' tensors must not run again
            torch._dynamo.reset()

    @property
    def parameters(self) -> list[Tensor]:
        return [*self.a, *self.b]

    def reset(self) -> None:
        """Every row back to the start: the shared A, B = 0 (the model itself)."""
        with torch.no_grad():
            for a0, a, b in zip(self.a0, self.a, self.b):
                a.copy_(a0.expand_as(a))
                b.zero_()
                a.grad = b.grad = None

    def reset_rows(self, rows: Tensor) -> None:
        """The rows marked in `rows` (bool) back to the start."""
        with torch.no_grad():
            for a0, a, b in zip(self.a0, self.a, self.b):
                a.copy_(torch.where(rows[:, None, None], a0.expand_as(a), a))
                b.masked_fill_(rows[:, None, None], 0.0)

    def _hook(self, i: int):
        def add_delta(module: nn.Module, args: tuple, out: Tensor) -> Tensor:
            if not self.enabled:
                return out
            x = args[0]  # (rows, T, in): the first rows (all of them in a compiled pass)
            a, b = self.a[i][: x.shape[0]], self.b[i][: x.shape[0]]
            delta = (x @ a.transpose(1, 2).to(x.dtype)) @ b.transpose(1, 2).to(x.dtype)
            return out + self.scale * delta
        return add_delta

    def __enter__(self) -> "DocumentLoRA":
        self.enabled = True
        return self

    def __exit__(self, *exc) -> None:
        self.enabled = False


class DocumentAdam:
    """Adam on every row's LoRA at once (each element on its own: rows never mix). A step whose result is not
    finite is undone row by row and that row stops adapting, without a host sync."""

    def __init__(self, params: list[Tensor], lr: float, rows: int):
        self.params, self.lr = params, lr
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.steps = 0
        self.alive = torch.ones(rows, dtype=torch.bool, device=params[0].device)

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        b1, b2 = ADAM_BETAS
        fix1, fix2 = 1 - b1 ** self.steps, 1 - b2 ** self.steps
        new = []
        for p, m, v in zip(self.params, self.m, self.v):
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            new.append(p - self.lr * (m / fix1) / ((v / fix2).sqrt() + ADAM_EPS))
        finite = self.alive.clone()
        for q in new:
            finite &= torch.isfinite(q).flatten(1).all(1)
        self.alive &= finite
        for p, q in zip(self.params, new):
            keep = finite.view(-1, *([1] * (p.dim() - 1)))
            p.copy_(torch.where(keep, q, p))
            p.grad = None


# ----------------------------------------------------------------------------------------------
# The result
# ----------------------------------------------------------------------------------------------

@dataclass
class PhasedResult:
    scores: EvalResult
    documents: int
    phases: int  # global rounds planned
    phases_adapted: int  # global rounds taken
    chunk_tokens: int  # targets per LoRA step
    chunks: int  # document chunks scored, all ranks
    chunks_adapted: int  # of those, followed by a step of their document's LoRA
    global_steps: int
    adapted_parameters: int  # the model's parameters (global step) plus one document's LoRA
    stopped: list[str] = field(default_factory=list)  # key:value notes: where and why adaptation stopped
    fixes: list[str] = field(default_factory=list)  # the setting to change, for a step that was not finite
    seconds: float = 0.0
    score_seconds: float = 0.0  # documents: scoring with its LoRA steps
    train_seconds: float = 0.0  # the global steps
    mode: str = MODE

    @property
    def val_bpb(self) -> float:
        return self.scores.val_bpb

    @property
    def lora_steps(self) -> int:  # one per document chunk adapted on, however the documents were batched
        return self.chunks_adapted

    @property
    def train_steps(self) -> int:
        return self.lora_steps + self.global_steps

    @property
    def diverged_at_chunk(self) -> None:  # the chunked mode's divergence line: this mode names its own in stop_note
        return None

    @property
    def stopped_at_chunk(self) -> int | None:  # eval_final's budget line: where adaptation stopped, if it did
        return None if not self.stopped else self.chunks_adapted

    def stop_note(self) -> str:
        if not self.stopped:
            return "budget:not_reached"
        return " ".join(self.stopped) + (f" # {'; '.join(self.fixes)}" if self.fixes else "")

    def summary(self) -> str:
        return (f"documents:{self.documents} phases:{self.phases_adapted}/{self.phases} chunk_tokens:{self.chunk_tokens} "
                f"chunks:{self.chunks} chunks_adapted:{self.chunks_adapted} lora_steps:{self.lora_steps} "
                f"global_steps:{self.global_steps} adapted_parameters:{self.adapted_parameters} "
                f"score_time:{1000 * self.score_seconds:.0f}ms train_time:{1000 * self.train_seconds:.0f}ms")


# ----------------------------------------------------------------------------------------------
# Scoring documents, and the global step
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Pace:
    """Seconds per target scored with LoRA steps, per target scored without, and per global step; bucket_s: per
    window length the pass compiles, (length, seconds of a forward of doc_batch rows with its LoRA step, without)."""
    adapt_token_s: float
    score_token_s: float
    global_step_s: float
    bucket_s: tuple = ()

    @property
    def train_step_s(self) -> float:  # eval_final's plan line names the training step so in every mode
        return self.global_step_s


class _Forecast:
    """Seconds the forwards left will take (counts by window length): a forward's cost at each length (the warm-up's
    measure, else proportional to the length) times the ratio of the seconds measured so far to their forecast."""

    def __init__(self, pace: Pace | None, buckets: tuple[int, ...]):
        table = {w: (a, s) for w, a, s in pace.bucket_s} if pace is not None and pace.bucket_s else {}
        self.cost = {mode: {w: table[w][i] if w in table else float(w) for w in buckets}
                     for i, mode in enumerate(("adapt", "score"))}
        known = 1.0 if len(table) == len(buckets) else None  # no warm-up: nothing is known before a batch ran
        self.ratio = {"adapt": known, "score": known}
        self.seen = {"adapt": [0.0, 0.0], "score": [0.0, 0.0]}  # forecast, measured

    def units(self, counts: dict[int, int], mode: str) -> float:
        return sum(n * self.cost[mode][w] for w, n in counts.items())

    def seconds(self, counts: dict[int, int], mode: str) -> float | None:
        ratio = self.ratio[mode] if self.ratio[mode] is not None else self.ratio["adapt" if mode == "score" else "score"]
        return None if ratio is None else ratio * self.units(counts, mode)

    def measured(self, counts: dict[int, int], mode: str, seconds: float) -> None:
        seen = self.seen[mode]
        seen[0] += self.units(counts, mode)
        seen[1] += seconds
        self.ratio[mode] = seen[1] / max(seen[0], 1e-12)


def _lora_forward(model: nn.Module, x: Tensor) -> Tensor:
    """The model's logits with its document LoRA's hooks: a function of its own, so that its compiled graphs (all
    traced with the hooks on) are kept apart from the model's own forward's."""
    return model(x)


_COMPILED_FORWARD: dict[str, Callable] = {}


def lora_forward(model: nn.Module, compile_backend: str | None) -> Callable[[Tensor], Tensor]:
    """(x) -> logits through the model and its document LoRA: compiled with compile_backend (train_gpt.compile_model:
    one graph per shape), or eager when None."""
    base = _base_module(model)
    if compile_backend is None:
        return base
    if compile_backend not in _COMPILED_FORWARD:
        _COMPILED_FORWARD[compile_backend] = train_gpt.compile_model(_lora_forward, compile_backend)
    compiled = _COMPILED_FORWARD[compile_backend]
    return lambda x: compiled(base, x)


class _Documents:
    """Scores documents, each with its own LoRA (reset per document), and takes the global steps. With fixed shapes
    (a compiled pass) every forward has doc_batch rows (rows without a document are padding) and a window of one of
    window_buckets' lengths (the document's tokens, then padding), so the pass runs a few shapes; eager, only the
    rows whose document has chunk j run, in a window just long enough. The model is causal, so padding after a
    position changes nothing before it, and padding is left out of every score and every loss."""

    def __init__(self, model: nn.Module, tokens: Tensor, tables: ByteTables, docs: np.ndarray, seq_len: int,
                 s: PhasedSettings, device: torch.device, autocast: bool, rank: int, world_size: int,
                 token_of_interest: Tensor | None, count_positions: bool, seed: int,
                 compile_backend: str | None = None, fixed_shapes: bool | None = None):
        self.model, self.base = model, _base_module(model)
        self.tokens, self.tables, self.docs, self.seq_len, self.s = tokens, tables, docs, seq_len, s
        self.device, self.autocast, self.rank, self.world_size = device, autocast, rank, world_size
        n = tokens.numel() - 1
        self.scores = train_gpt.Scores(n, device, True, token_of_interest, count_positions)
        self.lora = DocumentLoRA.for_model(model, s.doc_batch, s.rank_r, s.lora_alpha, seed, device)
        self.lora.compiled |= compile_backend is not None
        self.forward = lora_forward(model, compile_backend)
        self.buckets = window_buckets(s.doc_chunk_tokens, seq_len)
        self.fixed = compile_backend is not None if fixed_shapes is None else fixed_shapes
        # a rank's global-step batch made up to one shape when the shapes are fixed; eager, the sequences it has (the
        # padding sequences train on nothing and cost as much as real ones; a rank may then have none in the last
        # batch and still joins the gradients' all-reduce with zeros: score_first_ttt's global step)
        self.pad_rows = chunks_of(s.batch_seqs, world_size) if self.fixed else 0
        self.chunks = self.chunks_adapted = 0
        self.nonfinite_rows = 0

    def counts(self, doc_ids: np.ndarray) -> dict[int, int]:
        """The forwards score(doc_ids) runs, by window length."""
        return bucket_steps(np.sort(self.docs[doc_ids + 1] - self.docs[doc_ids])[::-1], self.s.doc_chunk_tokens,
                            self.seq_len, self.s.doc_batch)

    def window(self, j: int, lo_t: Tensor, len_t: Tensor, longest: int | None = None) -> tuple[Tensor, Tensor, int]:
        """Chunk j's windows, document-relative (rows, width + 1): up to seq_len tokens ending at the chunk's end,
        then padding to the bucket's width (a row's tokens are its document's, its next BOS included, then 0);
        their positions (width + 1,); and where chunk j starts in them. Eager, the window ends at the chunk's end or
        at `longest` (the longest row's targets), the earlier: a last chunk shorter than the others runs shorter."""
        C = self.s.doc_chunk_tokens
        first = max(0, (j + 1) * C - self.seq_len)
        end = (j + 1) * C if longest is None else min((j + 1) * C, longest)
        width = bucket_of(j, C, self.seq_len, self.buckets) if self.fixed else end - first
        rel = first + torch.arange(width + 1, device=self.device)
        inside = rel[None, :] <= len_t[:, None]
        window = torch.where(inside, self.tokens[torch.where(inside, lo_t[:, None] + rel[None, :], 0)], 0)
        return window, rel, j * C - first

    def step(self, window: Tensor, rel: Tensor, off: int, len_t: Tensor, lo_t: Tensor, opt, adapt: bool,
             record: bool = True) -> tuple[Tensor, Tensor]:
        """One chunk for every row: the forward, its scores (recorded first), then the LoRA's loss on the chunk.
        Returns (the chunk's positions scored, the rows whose LoRA overflowed)."""
        C = min(self.s.doc_chunk_tokens, window.shape[1] - 1 - off)  # a last chunk may run short (eager)
        with torch.set_grad_enabled(adapt), torch.autocast(device_type=self.device.type, dtype=torch.bfloat16,
                                                           enabled=self.autocast):
            logits = self.forward(window[:, :-1])[:, off : off + C].float()  # (rows, C, V): chunk j's
        x, y = window[:, off : off + C], window[:, off + 1 : off + C + 1]
        pos = rel[None, off : off + C]
        scored = pos < len_t[:, None]
        logp = torch.log_softmax(logits, dim=-1)
        given = logp.detach()
        bad = ~torch.isfinite(given).all(-1) & scored  # (rows, C): a diverged LoRA overflowed there
        row_bad = bad.any(1)
        if record:
            if bool(row_bad.any()):  # those positions are scored by the model itself
                plain = self._plain_logp(window[:, :-1])[:, off : off + C]
                given = torch.where(bad[..., None], plain, given)
            self.scores.record(given, x, y, lo_t[:, None] + pos, scored, self.tables)  # scored first
        if adapt:
            per_row = torch.where(scored, -logp.gather(-1, y[..., None]).squeeze(-1), 0.0).sum(1)
            (per_row / scored.sum(1).clamp_min(1)).sum().backward()
            opt.alive[: row_bad.numel()] &= ~row_bad  # a diverged row adapts no more: back to the model itself below
            opt.step()
            self.lora.reset_rows(~opt.alive)
        return scored, row_bad

    def score(self, doc_ids: np.ndarray, adapt: bool) -> int:
        """Scores these documents (at most doc_batch, one per row), each chunk before its LoRA step when `adapt`.
        Every row goes through the model at every step (a row whose document has ended is padding). Returns the
        targets scored."""
        s, rows, C = self.s, self.s.doc_batch, self.s.doc_chunk_tokens
        lo = self.docs[doc_ids]
        length = self.docs[doc_ids + 1] - lo
        order = np.argsort(-length, kind="stable")  # longest first
        pad = np.zeros(rows - doc_ids.size, dtype=np.int64)  # rows without a document: no target
        lo, length = np.concatenate([lo[order], pad]), np.concatenate([length[order], pad])
        steps = chunks_of(int(length[0]), C)
        adapt = adapt and s.lora_lr > 0
        self.lora.reset()
        opt = DocumentAdam(self.lora.parameters, s.lora_lr, rows) if adapt else None
        lo_t, len_t = torch.from_numpy(lo).to(self.device), torch.from_numpy(length).to(self.device)
        self.base.eval()
        with self.lora:
            for j in range(steps):
                n = rows if self.fixed else int((j * C < length).sum())  # eager: the rows still running, a prefix
                window, rel, off = self.window(j, lo_t[:n], len_t[:n], int(length[0]))
                # a step after a document's last chunk would teach nothing scored later
                self.step(window, rel, off, len_t[:n], lo_t[:n], opt, adapt and j < steps - 1)
                self.chunks += int((j * C < length).sum())
                if adapt and j < steps - 1:
                    self.chunks_adapted += int(((j + 1) * C < length).sum())
        if opt is not None:
            self.nonfinite_rows += int((~opt.alive[: doc_ids.size]).sum())
        return int(length.sum())

    @torch.no_grad()
    def _plain_logp(self, x: Tensor) -> Tensor:
        """log p from the model without any row's LoRA (eager: a rare path, never compiled)."""
        enabled, self.lora.enabled = self.lora.enabled, False
        try:
            with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                return torch.log_softmax(self.base(x).float(), dim=-1)
        finally:
            self.lora.enabled = enabled

    @torch.no_grad()
    def finite_on(self, lo: int, hi: int) -> bool:
        """Whether the model's log p is finite on the last window of targets [lo, hi) (already scored)."""
        start = max(lo, hi - self.seq_len)
        return bool(torch.isfinite(self._plain_logp(self.tokens[start:hi][None])).all())

    def global_step(self, first_doc: int, last_doc: int, adapter: _Adapter) -> int:
        """SGD on the model's own weights over the targets of documents [first_doc, last_doc), all scored."""
        s = self.s
        lo, hi = int(self.docs[first_doc]), int(self.docs[last_doc])
        bounds = np.asarray([lo, hi], dtype=np.int64)
        empty = np.zeros(0, dtype=np.int64)
        plan = ChunkPlan(empty, empty, self.seq_len, empty, bounds)
        run = _Run(adapter, self.tokens, self.tables, plan, self.seq_len, self.device, self.autocast, self.rank,
                   self.world_size, 1, None, False)
        opt = torch.optim.SGD(adapter.trainable, lr=s.global_lr, momentum=s.momentum)
        for p in adapter.trainable:
            p.requires_grad_(True)
        try:
            return run.train_chunk(0, opt, s.global_lr, s.epochs, s.batch_seqs, s.clip, pad_rows=self.pad_rows)
        finally:
            for p in adapter.trainable:
                p.requires_grad_(False)
                p.grad = None


def _finite(params: list[Tensor]) -> bool:
    return bool(torch.stack([torch.isfinite(p).all() for p in params]).all())


def my_batches(docs: np.ndarray, s: PhasedSettings, rank: int, world_size: int) -> list[tuple[int, int, bool,
                                                                                            list[np.ndarray]]]:
    """This rank's work: per segment (each phase, then the documents after them), (first, last, phased, its batches
    of documents)."""
    phases = phase_bounds(docs, s.phases, s.phase_docs)
    segments = [(int(phases[p]), int(phases[p + 1]), True) for p in range(phases.size - 1)]
    segments.append((int(phases[-1]), docs.size - 1, False))  # after the phased prefix: LoRA only
    out = []
    for first, last, phased in segments:
        ids = documents_of_rank(first, last, docs, rank, world_size)
        out.append((first, last, phased, [ids[b : b + s.doc_batch] for b in range(0, ids.size, s.doc_batch)]))
    return out


def planned_seconds(tokens: np.ndarray, s: PhasedSettings, seq_len: int, pace: Pace, rank: int = 0,
                    world_size: int = 1) -> tuple[float, float]:
    """(scoring with LoRA steps, the global steps): the pass's seconds on this rank at the warm-up's pace, from the
    forwards it will run at each window length and the global steps it will take."""
    docs = document_bounds(tokens, tokens.size - 1)
    counts = dict.fromkeys(window_buckets(s.doc_chunk_tokens, seq_len), 0)
    for _, _, _, batches in my_batches(docs, s, rank, world_size):
        for batch in batches:
            lengths = np.sort(docs[batch + 1] - docs[batch])[::-1]
            for w, n in bucket_steps(lengths, s.doc_chunk_tokens, seq_len, s.doc_batch).items():
                counts[w] += n
    forecast = _Forecast(pace, tuple(counts))
    return forecast.seconds(counts, "adapt") or 0.0, pace.global_step_s * global_steps(docs, s, seq_len)


def phased_evaluate(model: nn.Module, tokens: Tensor, byte_tables: ByteTables, seq_len: int, s: PhasedSettings, *,
                    device: torch.device | str = "cpu", autocast: bool = False, rank: int = 0, world_size: int = 1,
                    token_of_interest: Tensor | None = None, count_positions: bool = False, seed: int = 0,
                    pace: Pace | None = None, deadline: float | None = None,
                    progress: Callable[[dict], None] | None = None,
                    clock: Callable[[], float] = time.perf_counter, train_first: bool = False,
                    compile_backend: str | None = None, fixed_shapes: bool | None = None) -> PhasedResult:
    """Scores tokens[1:] document by document (see the module's docstring). deadline: a time on `clock` by which
    the call must end; with max_seconds, the earlier. Before each global step and each batch of documents the
    rest is projected from the cost of its forwards at each window length (`pace`, from warm_up, scaled by what
    this pass has measured; without a pace, from the batches already run): a global step that would not leave
    time to score the rest is skipped (ranks agree), and a rank whose documents left would not be scored in time
    with LoRA steps scores them without. compile_backend: the documents' forwards compiled with it, else eager;
    fixed_shapes: doc_batch rows and window_buckets' lengths in every forward (default: when compiled). train_first: the rule-breaking variant for the tests only (each phase's
    global step taken before its documents are scored). Returns a PhasedResult; the model's weights and
    requires_grad flags are as they were on entry (its LoRA hooks stay, adding nothing outside a pass)."""
    t_start = clock()
    s.check(seq_len)
    if not (isinstance(world_size, int) and world_size >= 1 and 0 <= rank < world_size):
        raise TTTSettingError(f"rank={rank} world_size={world_size}: need 0 <= rank < world_size; "
                              "launch with torchrun or pass rank=0, world_size=1")
    device = torch.device(device)
    n = tokens.numel() - 1
    docs = document_bounds(tokens.numpy() if tokens.device.type == "cpu" else tokens.cpu().numpy(), n)
    phases = phase_bounds(docs, s.phases, s.phase_docs)
    tokens, tables = tokens.to(device), byte_tables.to(device)
    adapter = _Adapter(model, "full", "all", 1, 1.0, seed)  # the model's own weights, restored in the finally
    for p in adapter.trainable:
        p.requires_grad_(False)
    stopped: list[str] = []
    fixes: list[str] = []
    end = min([t for t in (t_start + s.max_seconds if s.max_seconds > 0 else None, deadline) if t is not None],
              default=None)
    global_rate = None if pace is None else pace.global_step_s
    try:
        run = _Documents(model, tokens, tables, docs, seq_len, s, device, autocast, rank, world_size,
                         token_of_interest, count_positions, seed, compile_backend, fixed_shapes)
        forecast = _Forecast(pace, run.buckets)
        work = my_batches(docs, s, rank, world_size)
        left = dict.fromkeys(run.buckets, 0)  # this rank's forwards not yet run, by window length
        for _, _, _, batches in work:
            for batch in batches:
                for w, c in run.counts(batch).items():
                    left[w] += c
        global_steps = phases_adapted = 0
        score_s = train_s = 0.0
        adapting, global_on = True, s.phases > 0 and s.global_lr > 0
        for first, last, phased, batches in work:
            if phased and train_first and global_on:  # the rule-breaking variant: learns before scoring
                global_steps += run.global_step(first, last, adapter)
            for batch in batches:
                projected = forecast.seconds(left, "adapt")
                if adapting and end is not None and projected is not None and clock() + projected > end:
                    adapting = False
                    stopped.append(f"lora_budget_ran_out_at_document:{int(batch[0])}")
                counts = run.counts(batch)
                t0 = clock()
                run.score(batch, adapting)
                spent = clock() - t0
                score_s += spent
                forecast.measured(counts, "adapt" if adapting else "score", spent)
                for w, c in counts.items():
                    left[w] -= c
            if run.nonfinite_rows and adapting:
                adapting = False
                stopped.append(f"lora_nonfinite_documents:{run.nonfinite_rows}")
                fixes.append("a LoRA step was not finite: lower TTT_LR")
            if not (phased and global_on and not train_first and last > first):
                continue
            now = clock()
            steps_needed = s.epochs * chunks_of(chunks_of(int(docs[last] - docs[first]), seq_len), s.batch_seqs)
            rest = forecast.seconds(left, "adapt" if adapting else "score")
            projected = now + steps_needed * (global_rate or 0.0) + (rest or 0.0)
            late_t = torch.tensor([-1.0 if end is None else projected - end], dtype=torch.float64, device=device)
            if world_size > 1:
                dist.all_reduce(late_t, op=dist.ReduceOp.MAX)
            if float(late_t.item()) >= 0:
                global_on = False
                stopped.append(f"global_budget_ran_out_at_phase:{phases_adapted}")
                continue
            saved = [p.detach().clone() for p in adapter.trainable]
            taken = run.global_step(first, last, adapter)
            finite = _finite(adapter.trainable) and run.finite_on(int(docs[first]), int(docs[last]))
            ok = torch.tensor([float(finite)], device=device)
            if world_size > 1:
                dist.all_reduce(ok, op=dist.ReduceOp.MIN)
            if not ok.item():
                with torch.no_grad():
                    for p, q in zip(adapter.trainable, saved):
                        p.copy_(q)
                global_on = False
                stopped.append(f"global_nonfinite_at_phase:{phases_adapted}")
                fixes.append("a global step was not finite and was undone: lower TTT_GLOBAL_LR")
                continue
            global_steps += taken
            phases_adapted += 1
            spent = clock() - now
            train_s += spent
            global_rate = spent / max(taken, 1)
            if progress is not None:
                progress(dict(phase=phases_adapted, phases=phases.size - 1, elapsed=clock() - t_start))
        scores = run.scores.result(world_size)
        counts_t = torch.tensor([run.chunks, run.chunks_adapted], dtype=torch.float64, device=device)
        if world_size > 1:
            dist.all_reduce(counts_t)
        chunks, chunks_adapted = (int(c) for c in counts_t.tolist())
    finally:
        adapter.restore()
    lora_params = sum(p[0].numel() for p in run.lora.parameters)
    return PhasedResult(scores, docs.size - 1, phases.size - 1, phases_adapted, s.doc_chunk_tokens, chunks,
                        chunks_adapted, global_steps, adapter.parameter_count + lora_params, stopped, fixes,
                        clock() - t_start, score_s, train_s)


# ----------------------------------------------------------------------------------------------
# Warm-up: the pace on random tokens (never validation tokens); changes no weight
# ----------------------------------------------------------------------------------------------

def warm_up(model: nn.Module, seq_len: int, s: PhasedSettings, *, device: torch.device | str = "cpu",
            autocast: bool = False, world_size: int = 1, seed: int = 0,
            clock: Callable[[], float] = time.perf_counter, compile_backend: str | None = None) -> Pace:
    """Compiles every graph the pass runs, on random tokens (never validation tokens): a batch of doc_batch random
    documents of seq_len tokens goes through every window length with and without LoRA steps, and a global step
    of this rank's batch shape. Then times each: a forward of doc_batch rows at every window length with its LoRA
    step and without, and a global step (the second run of each). Changes no weight."""
    device = torch.device(device)
    vocab = _base_module(model).tok_emb.num_embeddings
    gen = torch.Generator().manual_seed(seed)
    rows = s.doc_batch
    length = seq_len * max(rows, chunks_of(s.batch_seqs, world_size)) + 1
    tokens = torch.randint(BOS_ID + 1, vocab, (length,), generator=gen)
    tokens[:: seq_len] = BOS_ID  # documents of seq_len tokens
    vocab_bytes = torch.ones(vocab, dtype=torch.int64)
    tables = ByteTables(vocab_bytes, torch.zeros(vocab, dtype=torch.bool), torch.zeros(vocab, dtype=torch.bool))
    settings = dataclasses.replace(s, phases=0, max_seconds=0.0, lora_lr=s.lora_lr or PhasedSettings.lora_lr)
    for adapt in (True, False):  # every window length, with and without LoRA steps: compiled here
        phased_evaluate(model, tokens[: seq_len * rows + 1], tables, seq_len,
                        dataclasses.replace(settings, lora_lr=settings.lora_lr if adapt else 0.0), device=device,
                        autocast=autocast, seed=seed, compile_backend=compile_backend)
    adapter = _Adapter(model, "full", "all", 1, 1.0, seed)
    for p in adapter.trainable:  # as in the pass (the global step turns them on for itself): the same graphs
        p.requires_grad_(False)
    try:
        docs = document_bounds(tokens.numpy(), tokens.numel() - 1)
        run = _Documents(model, tokens.to(device), tables.to(device), docs, seq_len, settings, device, autocast, 0,
                         1, None, False, seed, compile_backend)
        # this rank's full batch when the pass runs on world_size: an eager pass's last batch may be smaller, so
        # the global step's time planned from it is an upper bound there
        run.pad_rows = chunks_of(s.batch_seqs, world_size)
        bucket_s = []
        lo_t = torch.from_numpy(docs[:rows]).to(device)
        len_t = torch.full((rows,), seq_len, dtype=torch.int64, device=device)
        C, timed = s.doc_chunk_tokens, set()
        run.base.eval()
        with run.lora:
            # the last chunk of each bucket first: an eager pass runs exact widths, and its widest stands for the bucket
            for j in reversed(range(chunks_of(seq_len, C))):
                width = bucket_of(j, C, seq_len, run.buckets)
                if width in timed:
                    continue
                timed.add(width)
                window, rel, off = run.window(j, lo_t, len_t)
                seconds = []
                for adapt in (True, False):
                    for _ in range(2):
                        run.lora.reset()
                        opt = DocumentAdam(run.lora.parameters, settings.lora_lr, rows) if adapt else None
                        t0 = clock()
                        run.step(window, rel, off, len_t, lo_t, opt, adapt, record=False)
                        train_gpt.sync(device)
                        took = clock() - t0
                    seconds.append(took)
                bucket_s.insert(0, (width, *seconds))  # narrowest first
        run.lora.reset()
        step_s = 0.0
        for _ in range(2):
            t0 = clock()
            run.global_step(0, min(run.pad_rows, docs.size - 1), adapter)
            train_gpt.sync(device)
            step_s = (clock() - t0) / max(1, s.epochs)
    finally:
        adapter.restore()
    per_doc = {w: 0 for w in run.buckets}  # a seq_len document's forwards: the pace per target below
    for j in range(chunks_of(seq_len, C)):
        per_doc[bucket_of(j, C, seq_len, run.buckets)] += 1
    cost = {w: (a, b) for w, a, b in bucket_s}
    return Pace(sum(n * cost[w][0] for w, n in per_doc.items()) / (rows * seq_len),
                sum(n * cost[w][1] for w, n in per_doc.items()) / (rows * seq_len), step_s, tuple(bucket_s))
