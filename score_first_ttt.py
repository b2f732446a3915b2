"""
score_first_ttt.py: legal, score-first test-time training (TTT) over the validation stream.

The stream of targets is cut into chunks of `chunk_tokens` positions. For chunk n:

  1. score every position of chunk n, under torch.no_grad(), with the model as adapted on
     chunks 0..n-1 only (sliding windows may read context from earlier chunks, never from later
     ones: every window's scored positions lie in the one chunk being scored);
  2. then, unless chunk n is the last one or the time budget has run out, train on chunk n's
     targets for `epochs` epochs (SGD with momentum, cosine learning-rate decay across chunks,
     gradient clipping).

Every position is scored exactly once, by a model that has seen only positions before its chunk:
the challenge's rule (test-time training may only use validation tokens already scored; one pass).

Ranks split each chunk's scoring windows and each training batch. A training batch is a fixed
global set of sequences (independent of the world size), split contiguously across ranks; each
rank back-propagates (sum of its tokens' losses) / (the global batch's token count), and the
gradients are all-reduced by sum, so every rank takes the step one rank would take on the whole
batch: 1 rank and N ranks give the same BPB to within float rounding.

The caller's model is never changed when this returns: "full" mode trains the model's own
parameters in place and restores them (and their requires_grad flags) in a `finally`; "lora" mode
never touches them (the adapters live here and are applied by torch.func.functional_call).

Which adaptation (TTT_MODE): "full" SGD over all parameters is the default. Measured on the demo's
model (seed 2024, base 1.8204 BPB at stride 64, 8,192-token chunks, 3 epochs, 2-core CPU): full SGD
lr 0.04 gave 1.7193 in 80 s; rank-8 LoRA on every block matrix, SGD lr 0.5, 1.7449 in 66 s; rank-16
LoRA with Adam lr 1e-3, 1.7657 in 65 s; full SGD without the tied embedding (TTT_PARAMS=no_embed,
lr 0.03) 1.7520. What the validation text teaches a small model (the vocabulary of a narrow domain)
lives largely in the tied embedding and the scalar gains, which LoRA on the block matrices cannot
reach, and LoRA's forward (W + B A, a functional call) costs nearly what full SGD's does. LoRA stays
an option (TTT_RANK, the seed's knob) for models whose full optimizer state is dear; it starts with
B = 0 and A random, so it starts as the identity and B gets a gradient from the first step (the
seed's adapter started with both factors at zero and never moved).

    result = ttt_evaluate(model, tokens, byte_tables, seq_len, stride, chunk_tokens=32768, epochs=3,
                          lr=0.002, momentum=0.9, batch_seqs=16, device=device, autocast=True)
    result.val_bpb, result.chunks_adapted, result.stopped_at_chunk, result.scores.position_losses

eval_final.py runs it with USE_TTT=1 and its TTT_* settings, whose defaults live there.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

import train_gpt
from train_gpt import ByteTables, EvalResult, InputError

MODES = ("full", "lora")
OPTIMIZERS = ("sgd", "adam")  # adam: betas (momentum, 0.999)
SCHEDULES = ("cosine", "constant")  # the learning rate across chunks
PARAM_SETS = ("all", "blocks", "no_embed")  # full mode: which parameters adapt
LORA_TARGETS = ("c_q", "c_k", "c_v", "attn.proj", "fc", "mlp.proj")  # the block matrices LoRA adapts


class TTTSettingError(InputError, ValueError):
    """A bad TTT setting, explained in one line that names the setting and the fix."""


# ----------------------------------------------------------------------------------------------
# Settings check: one line naming the setting (by its eval_final environment name) and the fix.
# ----------------------------------------------------------------------------------------------

def check_ttt_settings(*, seq_len: int, stride: int, chunk_tokens: int, epochs: int, lr: float, momentum: float,
                       mode: str, rank_r: int, batch_seqs: int, eval_batch_seqs: int, clip: float,
                       max_seconds: float, params: str, lora_alpha: float, optimizer: str = "sgd",
                       schedule: str = "cosine") -> None:
    def bad(setting: str, value, fix: str):
        raise TTTSettingError(f"{setting}={value} {fix}")

    if mode not in MODES:
        bad("TTT_MODE", mode, f"is not one of {', '.join(MODES)}; set TTT_MODE=full or TTT_MODE=lora")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        bad("TTT_LR", lr, "must be a positive number; set e.g. TTT_LR=0.01 (to turn TTT off, unset USE_TTT)")
    if not (math.isfinite(momentum) and 0 <= momentum < 1):
        bad("TTT_MOMENTUM", momentum, "must be in [0, 1); set e.g. TTT_MOMENTUM=0.9")
    if not (isinstance(epochs, int) and epochs >= 1):
        bad("TTT_EPOCHS", epochs, "must be a whole number of at least 1; set e.g. TTT_EPOCHS=2")
    if mode == "lora" and not (isinstance(rank_r, int) and rank_r >= 1):
        bad("TTT_RANK", rank_r, "must be a whole number of at least 1 with TTT_MODE=lora; set e.g. TTT_RANK=8")
    if mode == "lora" and not (math.isfinite(lora_alpha) and lora_alpha > 0):
        bad("TTT_LORA_ALPHA", lora_alpha, "must be positive; set e.g. TTT_LORA_ALPHA=16")
    if not (isinstance(chunk_tokens, int) and chunk_tokens >= seq_len):
        bad("TTT_CHUNK_TOKENS", chunk_tokens, f"is smaller than the sequence length {seq_len}; set it to at least "
            f"{seq_len}, e.g. TTT_CHUNK_TOKENS={max(32 * seq_len, 8192)}")
    if not 0 <= stride <= seq_len:
        bad("EVAL_STRIDE", stride, f"must be between 0 (standard windows) and the sequence length {seq_len}")
    if not (isinstance(batch_seqs, int) and batch_seqs >= 1):
        bad("TTT_BATCH_SEQS", batch_seqs, "must be at least 1; set e.g. TTT_BATCH_SEQS=16")
    if not (isinstance(eval_batch_seqs, int) and eval_batch_seqs >= 1):
        bad("EVAL_BATCH_SEQS", eval_batch_seqs, "must be at least 1; set e.g. EVAL_BATCH_SEQS=32")
    if not (math.isfinite(clip) and clip >= 0):
        bad("TTT_GRAD_CLIP", clip, "must be at least 0 (0: no clipping); set e.g. TTT_GRAD_CLIP=1.0")
    if not (max_seconds >= 0 and not math.isnan(max_seconds)):
        bad("TTT_MAX_SECONDS", max_seconds, "must be at least 0 (0: no budget); set e.g. TTT_MAX_SECONDS=500")
    if params not in PARAM_SETS:
        bad("TTT_PARAMS", params, f"is not one of {', '.join(PARAM_SETS)}; set TTT_PARAMS=all")
    if optimizer not in OPTIMIZERS:
        bad("TTT_OPTIMIZER", optimizer, f"is not one of {', '.join(OPTIMIZERS)}; set TTT_OPTIMIZER=sgd")
    if schedule not in SCHEDULES:
        bad("TTT_SCHEDULE", schedule, f"is not one of {', '.join(SCHEDULES)}; set TTT_SCHEDULE=cosine")


# ----------------------------------------------------------------------------------------------
# The plan: which windows score which chunk
# ----------------------------------------------------------------------------------------------

@dataclass
class ChunkPlan:
    starts: np.ndarray  # (W,) window starts, in scoring order
    scored_from: np.ndarray  # (W,) first window-relative position each window scores
    width: int
    window_chunk: np.ndarray  # (W,) the chunk each window's scored positions belong to
    chunk_bounds: np.ndarray  # (K + 1,) chunk k covers target positions [bounds[k], bounds[k + 1])

    @property
    def num_chunks(self) -> int:
        return self.chunk_bounds.size - 1

    def windows_of(self, chunk: int) -> np.ndarray:
        return np.flatnonzero(self.window_chunk == chunk)


def chunk_plan(num_targets: int, seq_len: int, stride: int, chunk_tokens: int) -> ChunkPlan:
    """train_gpt.window_plan's windows, unchanged and in their order, each assigned whole to the chunk its
    first scored position falls in: TTT with nothing adapted scores exactly what evaluate() scores, so
    its gain is adaptation's alone. A chunk is then the run of windows whose first scored position lies
    in [k * chunk_tokens, (k + 1) * chunk_tokens): its bounds move to the nearest window edge (by less
    than the stride) where chunk_tokens is not a multiple of it. A window reads no token past its
    scored range, so a chunk's windows read nothing of a later chunk."""
    starts, scored_from, width = train_gpt.window_plan(num_targets, seq_len, stride)
    first = starts + scored_from  # first scored target position of each window, increasing
    labels = first // chunk_tokens
    _, window_chunk = np.unique(labels, return_inverse=True)  # chunks numbered 0.. with no empty one
    window_chunk = window_chunk.astype(np.int64)
    covered = int(starts[-1]) + width  # window_plan's coverage: all targets, or whole windows of standard eval
    opening = np.flatnonzero(np.diff(window_chunk, prepend=-1))  # each chunk's first window
    bounds = np.append(first[opening], covered).astype(np.int64)
    # the scored ranges tile [0, covered) in order, so each chunk's positions are [bounds[k], bounds[k + 1])
    assert (starts >= 0).all() and bounds[0] == 0 and (np.diff(bounds) > 0).all()
    return ChunkPlan(starts.astype(np.int64), scored_from.astype(np.int64), width, window_chunk, bounds)


def training_sequences(lo: int, hi: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Sequence starts and first trained (window-relative) target covering target positions [lo, hi)
    exactly once: whole sequences from lo, the last one ending at hi (it may start before lo, reading
    already scored context, and trains only on its targets not trained by the one before)."""
    n = -(-(hi - lo) // seq_len)
    starts = lo + seq_len * np.arange(n, dtype=np.int64)
    first = np.zeros(n, dtype=np.int64)
    if starts[-1] + seq_len > hi:
        first[-1] = starts[-1] - (hi - seq_len)
        starts[-1] = hi - seq_len
    return starts, first


# ----------------------------------------------------------------------------------------------
# The adapters
# ----------------------------------------------------------------------------------------------

def _base_module(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # a torch.compile wrapper shares its module's parameters


class LoRA(nn.Module):
    """Rank-r adapters on the block matrices: W_eff = W + (alpha / r) B A, B starting at zero."""

    def __init__(self, model: nn.Module, rank_r: int, alpha: float, seed: int = 0):
        super().__init__()
        self.names, self.scale = [], alpha / rank_r
        gen = torch.Generator().manual_seed(seed)
        a, b = [], []
        for name, p in _base_module(model).named_parameters():
            if name.startswith("blocks.") and p.ndim == 2 and any(f".{t}.weight" in name for t in LORA_TARGETS):
                out_f, in_f = p.shape
                self.names.append(name)
                a.append(nn.Parameter((torch.randn(rank_r, in_f, generator=gen) / math.sqrt(in_f)).to(p.device)))
                b.append(nn.Parameter(torch.zeros(out_f, rank_r, device=p.device)))
        if not self.names:
            raise TTTSettingError("TTT_MODE=lora: the model has no block matrices to adapt; set TTT_MODE=full")
        self.a, self.b = nn.ParameterList(a), nn.ParameterList(b)

    def weights(self, model: nn.Module) -> dict[str, Tensor]:
        params = dict(_base_module(model).named_parameters())
        return {n: params[n] + self.scale * (b @ a) for n, a, b in zip(self.names, self.a, self.b)}


class _Adapter:
    """The trainable state of one TTT run and the forward it trains and scores with."""

    def __init__(self, model: nn.Module, mode: str, params: str, rank_r: int, lora_alpha: float, seed: int):
        self.model, self.mode = model, mode
        base = _base_module(model)
        self._flags = {n: p.requires_grad for n, p in base.named_parameters()}
        self._snapshot: dict[str, Tensor] = {}
        if mode == "lora":
            self.lora = LoRA(model, rank_r, lora_alpha, seed)
            for p in base.parameters():
                p.requires_grad_(False)
            self.trainable = list(self.lora.parameters())
            self.names = [f"lora[{n}]" for n in self.lora.names]
        else:
            self.lora = None
            chosen = [(n, p) for n, p in base.named_parameters() if self._adapts(n, params)]
            for n, p in base.named_parameters():
                p.requires_grad_(any(n == m for m, _ in chosen))
            with torch.no_grad():
                self._snapshot = {n: p.detach().clone() for n, p in chosen}
            self.trainable = [p for _, p in chosen]
            self.names = [n for n, _ in chosen]

    @staticmethod
    def _adapts(name: str, params: str) -> bool:
        if params == "all":
            return True
        if params == "blocks":
            return name.startswith("blocks.")
        return not name.startswith("tok_emb.")  # no_embed: everything but the tied embedding

    @property
    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.trainable)

    def logits(self, x: Tensor) -> Tensor:
        if self.lora is None:
            return self.model(x)
        return torch.func.functional_call(_base_module(self.model), self.lora.weights(self.model), (x,), strict=False)

    def restore(self) -> None:
        base = _base_module(self.model)
        with torch.no_grad():
            for n, p in base.named_parameters():
                if n in self._snapshot:
                    p.copy_(self._snapshot[n])
                p.grad = None
                p.requires_grad_(self._flags[n])


# ----------------------------------------------------------------------------------------------
# The result
# ----------------------------------------------------------------------------------------------

@dataclass
class TTTResult:
    scores: EvalResult  # the score-first pass: sums, every position's loss, log p(tokens of interest)
    mode: str
    chunks: int  # chunks in the stream
    chunk_tokens: int
    chunks_adapted: int  # chunks trained on (the last chunk never is)
    stopped_at_chunk: int | None  # the first chunk left untrained because the budget ran out; None: never
    stopped_at_position: int | None  # that chunk's first target position
    train_steps: int  # optimizer steps taken
    adapted_parameters: int  # parameters (or adapter weights) trained
    adapted_names: list[str] = field(default_factory=list)
    diverged_at_chunk: int | None = None  # training on this chunk made a weight non-finite: undone, adaptation stopped
    seconds: float = 0.0  # the whole call
    score_seconds: float = 0.0
    train_seconds: float = 0.0

    @property
    def val_bpb(self) -> float:
        return self.scores.val_bpb

    def stop_note(self) -> str:
        if self.diverged_at_chunk is not None:
            return (f"diverged:1 adaptation_stopped_after_chunk:{self.diverged_at_chunk}/{self.chunks} # that chunk's "
                    "training made a weight non-finite and was undone; the weights before it scored the rest")
        if self.stopped_at_chunk is None:
            return "budget:not_reached"
        return (f"budget:ran_out adaptation_stopped_before_chunk:{self.stopped_at_chunk}/{self.chunks} "
                f"position:{self.stopped_at_position}")


# ----------------------------------------------------------------------------------------------
# Scoring and training one chunk
# ----------------------------------------------------------------------------------------------

class _Run:
    def __init__(self, adapter: _Adapter, tokens: Tensor, tables: ByteTables, plan: ChunkPlan, seq_len: int,
                 device: torch.device, autocast: bool, rank: int, world_size: int, eval_batch_seqs: int,
                 token_of_interest: Tensor | None, count_positions: bool):
        self.adapter, self.tokens, self.tables, self.plan = adapter, tokens, tables, plan
        self.seq_len, self.device, self.autocast = seq_len, device, autocast
        self.rank, self.world_size, self.eval_batch_seqs = rank, world_size, eval_batch_seqs
        self.scores = train_gpt.Scores(tokens.numel() - 1, device, True, token_of_interest, count_positions)
        self.score_batch = stream_batch(plan, eval_batch_seqs, world_size)  # one shape for every chunk
        self.train_offsets = torch.arange(seq_len + 1, device=device)

    def _mine(self, n: int) -> slice:
        return slice(n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size)

    # no_grad, not inference_mode: inference tensors would compile the model's forward a third time (a
    # different dispatch key set), and a public record crashed scoring under inference_mode on torch 2.9.1.
    @torch.no_grad()
    def score_chunk(self, chunk: int) -> None:
        """Scores this rank's share of the chunk's windows with evaluate()'s loop; nothing is trained here."""
        idx = self.plan.windows_of(chunk)
        self.adapter.model.eval()
        self.scores.add(self.adapter.logits, self.tokens, self.tables, self.plan.starts[idx],
                        self.plan.scored_from[idx], self.plan.width, self.eval_batch_seqs, self.autocast,
                        self.rank, self.world_size, batch=self.score_batch)

    def train_chunk(self, chunk: int, optimizer: torch.optim.Optimizer, lr: float, epochs: int, batch_seqs: int,
                    clip: float, pad_rows: int = 0) -> int:
        """`epochs` passes over the chunk's targets (already scored): returns the optimizer steps. pad_rows: every
        rank's batch is made up to this many sequences with ones that train on nothing (one compiled shape)."""
        lo, hi = int(self.plan.chunk_bounds[chunk]), int(self.plan.chunk_bounds[chunk + 1])
        seq_starts, first = training_sequences(lo, hi, self.seq_len)
        for group in optimizer.param_groups:
            group["lr"] = lr
        params = self.adapter.trainable
        steps = 0
        self.before_training = [p.detach().clone() for p in params]  # undone if the chunk's training diverges
        self.adapter.model.train()
        with torch.enable_grad():
            for _ in range(epochs):
                for b in range(0, seq_starts.size, batch_seqs):
                    g_starts, g_first = seq_starts[b : b + batch_seqs], first[b : b + batch_seqs]
                    global_count = int((self.seq_len - g_first).sum())
                    mine = self._mine(g_starts.size)
                    my_starts, my_first = g_starts[mine], g_first[mine]
                    if my_starts.size < pad_rows:  # sequences that train on nothing: their first target is past the end
                        fill = pad_rows - my_starts.size
                        my_starts = np.concatenate([my_starts, np.full(fill, seq_starts[0], dtype=np.int64)])
                        my_first = np.concatenate([my_first, np.full(fill, self.seq_len, dtype=np.int64)])
                    optimizer.zero_grad(set_to_none=False)
                    if my_starts.size:
                        bs = torch.from_numpy(my_starts).to(self.device)
                        windows = self.tokens[bs[:, None] + self.train_offsets]
                        x, y = windows[:, :-1], windows[:, 1:]
                        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16,
                                            enabled=self.autocast):
                            logits = self.adapter.logits(x).float()
                        nll = F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1),
                                              reduction="none").view_as(y)
                        keep = self.train_offsets[None, :-1] >= torch.from_numpy(my_first).to(self.device)[:, None]
                        (torch.where(keep, nll, 0.0).sum() / global_count).backward()
                    for p in params:
                        if p.grad is None:
                            p.grad = torch.zeros_like(p)
                    if self.world_size > 1:
                        flat = torch.cat([p.grad.reshape(-1) for p in params])
                        dist.all_reduce(flat)  # sum of each rank's (its loss sum / global count)
                        offset = 0
                        for p in params:
                            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
                            offset += p.numel()
                    if clip > 0:
                        torch.nn.utils.clip_grad_norm_(params, clip)
                    optimizer.step()
                    steps += 1
        self.adapter.model.eval()
        return steps

    def diverged(self) -> bool:
        """Whether the chunk just trained on left a weight non-finite; if so its training is undone. The
        weights are the same on every rank (the same all-reduced steps), so all ranks answer alike."""
        params = self.adapter.trainable
        bad = (~torch.stack([torch.isfinite(p).all() for p in params]).all()).to(torch.int32)
        if self.world_size > 1:  # the same on every rank by construction; agreed all the same, never a hang
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if not bad.item():
            return False
        with torch.no_grad():
            for p, saved in zip(params, self.before_training):
                p.copy_(saved)
        return True

def cosine_lr(lr: float, chunk: int, num_chunks: int) -> float:
    """lr at chunk 0, decaying to 0 at the last chunk (which is scored, never trained on)."""
    return lr * 0.5 * (1.0 + math.cos(math.pi * chunk / max(num_chunks - 1, 1)))


def chunk_lr(lr: float, chunk: int, num_chunks: int, schedule: str) -> float:
    return cosine_lr(lr, chunk, num_chunks) if schedule == "cosine" else lr


# ----------------------------------------------------------------------------------------------
# Time: what a chunk costs, and when adaptation must stop
# The pass must end inside its budget with every position scored, so before training on a chunk it
# projects the end of the pass: that chunk's training plus the scoring of every chunk left, at the
# pace of recent chunks. One-off costs are kept out of the pace: graphs are compiled by warm_up on
# random tokens before the pass starts (which also measures the pace the first chunks are planned
# with), and chunk 0's own time is set aside once a later chunk has been measured.
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Pace:
    """Seconds for one scoring forward (a batch of windows) and one training step, compiled."""
    score_batch_s: float
    train_step_s: float


@dataclass(frozen=True)
class Workload:
    """What each chunk asks of this rank: scoring forwards and training steps."""
    score_batches: np.ndarray  # (K,)
    train_steps: np.ndarray  # (K,) with every epoch; the last chunk's is 0 (never trained on)
    score_shapes: tuple[int, ...]  # windows per scoring forward: one shape (stream_batch)
    train_shapes: tuple[int, ...]  # distinct sequences per training forward on this rank


def stream_batch(plan: ChunkPlan, eval_batch_seqs: int, world_size: int) -> int:
    """Windows per scoring forward in every chunk: the base pass's choice for the whole stream, so a chunk
    with few windows pads its batch rather than compile a graph of its own (and the base pass's graph
    scores every chunk)."""
    return train_gpt.scoring_batch(plan.starts.size, eval_batch_seqs, world_size)


def workload(plan: ChunkPlan, seq_len: int, epochs: int, batch_seqs: int, eval_batch_seqs: int, rank: int,
             world_size: int) -> Workload:
    K = plan.num_chunks
    score_batches, train_steps = np.zeros(K, np.int64), np.zeros(K, np.int64)
    batch = stream_batch(plan, eval_batch_seqs, world_size)
    train_shapes = set()
    for chunk in range(K):
        windows = plan.windows_of(chunk).size
        mine = windows * (rank + 1) // world_size - windows * rank // world_size
        score_batches[chunk] = -(-mine // batch)
        if chunk < K - 1:
            n = training_sequences(int(plan.chunk_bounds[chunk]), int(plan.chunk_bounds[chunk + 1]), seq_len)[0].size
            train_steps[chunk] = epochs * -(-n // batch_seqs)
            for b in range(0, n, batch_seqs):
                g = min(batch_seqs, n - b)
                train_shapes.add(g * (rank + 1) // world_size - g * rank // world_size)
    return Workload(score_batches, train_steps, (batch,), tuple(sorted(train_shapes - {0})))


def warm_up(model: nn.Module, load: Workload, seq_len: int, *, mode: str = "full", params: str = "all",
            rank_r: int = 8, lora_alpha: float = 16.0, device: torch.device | str = "cpu", autocast: bool = False,
            world_size: int = 1, clip: float = 1.0, seed: int = 0,
            clock: Callable[[], float] = time.perf_counter) -> Pace:
    """Compiles every graph the pass will run (each scoring and training shape, on random tokens: never
    validation tokens) and measures the pace, the second run of each shape timed. Changes no weight."""
    device = torch.device(device)
    adapter = _Adapter(model, mode, params, rank_r, lora_alpha, seed)
    vocab = _base_module(model).tok_emb.num_embeddings
    gen = torch.Generator().manual_seed(seed)
    randoms = lambda n: torch.randint(0, vocab, (n, seq_len + 1), generator=gen).to(device)
    score_s, train_s = [], []
    try:
        for batch in load.score_shapes:
            x = randoms(batch)[:, :-1]
            for _ in range(2):
                t0 = clock()
                with torch.no_grad(), torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast):
                    adapter.model.eval()
                    adapter.logits(x).float().sum().item()
                score_s.append(clock() - t0)
        for batch in load.train_shapes:
            w = randoms(batch)
            for _ in range(2):
                t0 = clock()
                adapter.model.train()
                with torch.enable_grad(), torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                                                         enabled=autocast):
                    logits = adapter.logits(w[:, :-1]).float()
                F.cross_entropy(logits.view(-1, logits.size(-1)), w[:, 1:].reshape(-1)).backward()
                if clip > 0:
                    torch.nn.utils.clip_grad_norm_(adapter.trainable, clip)
                train_gpt.sync(device)
                train_s.append(clock() - t0)
                for p in adapter.trainable:
                    p.grad = None
        adapter.model.eval()
        # the step's gradient all-reduce, timed apart: ranks may see different shapes above, never a
        # different number of collectives
        collective_s = 0.0
        if world_size > 1:
            flat = torch.zeros(sum(p.numel() for p in adapter.trainable), device=device)
            for _ in range(2):
                t0 = clock()
                dist.all_reduce(flat)
                train_gpt.sync(device)
                collective_s = clock() - t0
    finally:
        adapter.restore()
    # the second (timed) run of the largest shape stands for every batch: an over- rather than an under-estimate
    return Pace(score_s[-1] if score_s else 0.0, train_s[-1] + collective_s if train_s else 0.0)


class _Clock:
    """The pass's budget: when it must end, and the pace that projects whether it will."""

    def __init__(self, load: Workload, start: float, max_seconds: float, deadline: float | None, pace: Pace | None,
                 device: torch.device, world_size: int):
        self.load, self.device, self.world_size = load, device, world_size
        ends = ([start + max_seconds] if max_seconds > 0 else []) + ([deadline] if deadline is not None else [])
        self.end = min(ends) if ends else None
        self.pace = pace
        self.score_rates: list[float] = []  # seconds per scoring forward, chunk by chunk
        self.train_rates: list[float] = []  # seconds per training step

    def scored(self, chunk: int, seconds: float) -> None:
        self.score_rates.append(seconds / max(int(self.load.score_batches[chunk]), 1))

    def trained(self, chunk: int, seconds: float) -> None:
        self.train_rates.append(seconds / max(int(self.load.train_steps[chunk]), 1))

    @staticmethod
    def _recent(rates: list[float], warm: float | None) -> float:
        """The median of the last four chunks, chunk 0 set aside once another is measured; before any
        chunk (or with only the first, and a warm-up's pace at hand), the warm-up's pace."""
        later = rates[1:]
        if later:
            return float(np.median(later[-4:]))
        if warm is not None:
            return warm
        return rates[0] if rates else 0.0

    def out_of_time(self, chunk: int, now: float) -> bool:
        """Whether training on `chunk` and then scoring every chunk left would end past the budget. Ranks
        agree: the latest projected end among them decides, so all stop adapting at the same chunk."""
        if self.end is None:
            return False
        score = self._recent(self.score_rates, None if self.pace is None else self.pace.score_batch_s)
        train = self._recent(self.train_rates, None if self.pace is None else self.pace.train_step_s)
        left = int(self.load.score_batches[chunk + 1 :].sum())  # scoring forwards of the chunks after this one
        projected = now + train * int(self.load.train_steps[chunk]) + score * left
        late = torch.tensor([projected - self.end], device=self.device, dtype=torch.float64)
        if self.world_size > 1:
            dist.all_reduce(late, op=dist.ReduceOp.MAX)
        return float(late.item()) >= 0


# ----------------------------------------------------------------------------------------------
# The entry point
# ----------------------------------------------------------------------------------------------

def ttt_evaluate(model: nn.Module, tokens: Tensor, byte_tables: ByteTables, seq_len: int, stride: int, *,
                 chunk_tokens: int, epochs: int, lr: float, momentum: float, batch_seqs: int,
                 mode: str = "full", rank_r: int = 8, lora_alpha: float = 16.0, params: str = "all",
                 eval_batch_seqs: int = 32, clip: float = 1.0, max_seconds: float = 0.0,
                 optimizer: str = "sgd", schedule: str = "cosine",
                 device: torch.device | str = "cpu", autocast: bool = False, rank: int = 0, world_size: int = 1,
                 token_of_interest: Tensor | None = None, count_positions: bool = False, seed: int = 0,
                 progress: Callable[[dict], None] | None = None, pace: Pace | None = None,
                 deadline: float | None = None, clock: Callable[[], float] = time.perf_counter) -> TTTResult:
    """Scores tokens[1:] given what precedes them, chunk by chunk, training on each chunk only after
    scoring it. stride == 0: standard non-overlapping windows; else sliding windows (evaluate()'s).

    chunk_tokens: target positions per chunk (>= seq_len). epochs: passes over a chunk after scoring
    it. lr, momentum: SGD, lr decayed by a cosine across chunks. mode: "full" (the parameters chosen
    by `params`: all, blocks, no_embed) or "lora" (rank `rank_r` adapters, scale lora_alpha/rank_r,
    on every block matrix). batch_seqs: training sequences of seq_len per step (global, over all
    ranks). eval_batch_seqs: scoring windows per forward (per rank). clip: gradient-norm clip (0:
    none). max_seconds: time budget for the whole call (0: none); deadline: a time on `clock` by which it
    must end (None: none). Adaptation stops before a chunk whose training, with the scoring of the
    chunks left (at the pace of recent chunks, or `pace` from warm_up before any), would overrun either;
    the rest is scored without training, and the result says where adaptation stopped.
    rank, world_size: this process in an initialized torch.distributed group. token_of_interest (N,)
    or (M, N), -1 for none: also return log p(those tokens) at each position (a table's, or hints).
    count_positions: also return how many times each position was scored (a check: once each).
    progress: called after each chunk with a dict (chunk, chunks, adapted, elapsed). clock: the time
    source (tests inject one). Compile the graphs first with warm_up (eval_final.py does): its pace
    then plans the first chunks, and no compilation lands inside the pass.

    A chunk whose training leaves a weight non-finite (a learning rate far too high) is undone, and
    adaptation stops there: the rest is scored with the weights from before it (diverged_at_chunk).

    Returns a TTTResult; the model's weights and requires_grad flags are as they were on entry.
    """
    t_start = clock()
    check_ttt_settings(seq_len=seq_len, stride=stride, chunk_tokens=chunk_tokens, epochs=epochs, lr=lr,
                       momentum=momentum, mode=mode, rank_r=rank_r, batch_seqs=batch_seqs,
                       eval_batch_seqs=eval_batch_seqs, clip=clip, max_seconds=max_seconds, params=params,
                       lora_alpha=lora_alpha, optimizer=optimizer, schedule=schedule)
    if not (isinstance(world_size, int) and world_size >= 1 and 0 <= rank < world_size):
        raise TTTSettingError(f"rank={rank} world_size={world_size}: need 0 <= rank < world_size; "
                              "launch with torchrun or pass rank=0, world_size=1")
    device = torch.device(device)
    num_targets = tokens.numel() - 1
    plan = chunk_plan(num_targets, seq_len, stride, chunk_tokens)
    tokens, tables = tokens.to(device), byte_tables.to(device)
    adapter = _Adapter(model, mode, params, rank_r, lora_alpha, seed)
    try:
        if optimizer == "sgd":
            opt = torch.optim.SGD(adapter.trainable, lr=lr, momentum=momentum)
        else:
            opt = torch.optim.Adam(adapter.trainable, lr=lr, betas=(momentum, 0.999))
        run = _Run(adapter, tokens, tables, plan, seq_len, device, autocast, rank, world_size, eval_batch_seqs,
                   token_of_interest, count_positions)
        K = plan.num_chunks
        budget = _Clock(workload(plan, seq_len, epochs, batch_seqs, eval_batch_seqs, rank, world_size), t_start,
                        max_seconds, deadline, pace, device, world_size)
        adapted, steps, stopped, diverged = 0, 0, None, None
        score_s = train_s = 0.0
        for chunk in range(K):
            t0 = clock()
            run.score_chunk(chunk)
            t1 = clock()
            score_s += t1 - t0
            budget.scored(chunk, t1 - t0)
            if chunk < K - 1 and stopped is None and diverged is None:
                if budget.out_of_time(chunk, t1):
                    stopped = chunk
                else:
                    steps += run.train_chunk(chunk, opt, chunk_lr(lr, chunk, K, schedule), epochs, batch_seqs, clip)
                    if run.diverged():
                        diverged = chunk
                    else:
                        adapted += 1
                    trained_s = clock() - t1
                    train_s += trained_s
                    budget.trained(chunk, trained_s)
            if progress is not None:
                progress(dict(chunk=chunk, chunks=K, adapted=adapted, stopped_at_chunk=stopped,
                              elapsed=clock() - t_start))
        scores = run.scores.result(world_size)
    finally:
        adapter.restore()
    return TTTResult(scores, mode, K, chunk_tokens, adapted, stopped,
                     None if stopped is None else int(plan.chunk_bounds[stopped]), steps, adapter.parameter_count,
                     adapter.names, diverged, clock() - t_start, score_s, train_s)
