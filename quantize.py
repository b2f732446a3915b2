"""
quantize.py: the quantizer of the artifact. Round-to-nearest and GPTQ onto one per-row integer grid,
and LQER, a low-rank correction of what the grid loses.

    grid        per row: fp16 scale = row max / top (the ladder's) or = step x row std (a Grid with a step, the
                rate-distortion export's: step = c / top in #1855's terms), top = 2^(bits-1) - 1, integers in
                [-top - 1, top]; a std grid's container (bits) follows from its step: the narrowest that holds
                GRID_CLIP_STDS row stds, values beyond it clamp
    rtn         each weight rounded to its nearest grid point (what QAT trains on)
    gptq        the same grid and scales; the columns are rounded one at a time and each one's rounding
                error is fed back into the columns not yet rounded, weighted by the inverse Hessian of
                the layer's inputs (H = X^T X over training tokens): the layer's OUTPUT error is what it
                minimises, not the weights' (Frantar et al. 2022, "GPTQ")
    lqer        W - dequant(Q) ~ A B of rank r, fitted where it weighs on the outputs (the SVD of the error
                times the Cholesky factor of H), stored as int8 (or fp16) factors beside the integers and
                added back when the artifact is read (Zhang et al. 2024, "LQER")

Why a module of its own: train_gpt.py stays under 1,500 lines, and the quantizer is the one piece that
training (QAT), the export and every reader of an artifact share. It imports nothing of the project, so
train_gpt.py imports it (tests/test_layout.py says so deliberately) and its bytes count wherever
train_gpt.py's do: in the training run's code bytes and in every evaluation's.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

# ----------------------------------------------------------------------------------------------
# The grid
# Divisions are written as multiplications by a reciprocal, as compiled kernels compute them, so
# eager and compiled code round identically and QAT sees exactly the export's grid.

FP16_SMALLEST, FP16_LARGEST = 2.0**-24, 65504.0  # the fp16 scale must stay positive and finite

def grid_top(bits: int) -> int:
    return 2 ** (bits - 1) - 1

def row_scales(w: Tensor, bits: int, step: float = 0.0) -> Tensor:
    """fp16 per-row scales: row max / top (step 0), or step x the row's std (its RMS about zero): positive and
    finite for an all-zero row, a row whose scale underflows fp16 and a row with one huge value."""
    w = w.float()
    stat = w.abs().amax(dim=1) * (1.0 / grid_top(bits)) if not step else w.square().mean(dim=1).sqrt() * step
    return stat.clamp(FP16_SMALLEST, FP16_LARGEST).to(torch.float16)

# A std grid's container holds this many row stds: #1855's MLP rule (11.5 std / 31 at int6) clamps there, and its
# attention (13 / 31, int6) and int7 embedding (14 / 63) rules fall in the same containers under this rule.
GRID_CLIP_STDS = 11.5
GRID_CONTAINERS = (5, 6, 7, 8)

@dataclass(frozen=True)
class Grid:
    """One group's integer grid: `bits` wide, scale = row max / top (step 0) or step x row std."""
    bits: int
    step: float = 0.0
    @classmethod
    def of_step(cls, step: float) -> "Grid":
        """The std grid of `step` (in row stds) in the narrowest container holding GRID_CLIP_STDS stds."""
        bits = next((b for b in GRID_CONTAINERS if grid_top(b) * step >= GRID_CLIP_STDS), GRID_CONTAINERS[-1])
        return cls(bits, float(step))
    @classmethod
    def of_rule(cls, c: float, bits: int) -> "Grid":
        """A fixed rule written as #1855 writes it: scale = c x std / top(bits)."""
        return cls(bits, c / grid_top(bits))
    @property
    def c(self) -> float:
        """The step in #1855's terms: scale = c x std / top."""
        return self.step * grid_top(self.bits)
    def label(self) -> str:
        return "fp16" if not self.bits else f"int{self.bits}" + (f"@{self.c:.2f}std" if self.step else "@max")

def round_to_grid(w: Tensor, inverse_scale: Tensor, bits: int) -> Tensor:
    """w (rows, ...) * its row's inverse scale, rounded and clamped to the grid; still float."""
    top = grid_top(bits)
    shape = (-1,) + (1,) * (w.ndim - 1)
    return torch.clamp(torch.round(w * inverse_scale.view(shape)), -top - 1, top)

def quantize_rows(w: Tensor, bits: int = 6, step: float = 0.0) -> tuple[Tensor, Tensor]:
    """(rows, cols) float -> int8 values in [-2^(bits-1), 2^(bits-1) - 1] and fp16 per-row scales."""
    w = w.float()
    scale = row_scales(w, bits, step)
    return round_to_grid(w, 1.0 / scale.float(), bits).to(torch.int8), scale

def dequantize_rows(q: Tensor, scale: Tensor) -> Tensor:
    return q.float() * scale.float()[:, None]

def fake_quantize(w: Tensor, bits: int = 6, step: float = 0.0) -> Tensor:
    """The export's round trip in the forward pass; the gradient passes straight through."""
    q, scale = quantize_rows(w.detach(), bits, step)
    return w + (dequantize_rows(q, scale).to(w.dtype) - w).detach()

# ----------------------------------------------------------------------------------------------
# What is stored as integers, at which width
# The block matrices and the bigram table; the tied embedding only once the ladder steps down.

SMALL_TENSOR_MAX_NUMEL = 65_536  # tensors this small stay in floating point
TIED_EMBEDDING_NAME = "tok_emb.weight"  # kept in fp16 unless the export ladder steps down

def is_quantized_matrix(name: str, tensor: Tensor) -> bool:
    """The block matrices (and the bigram table): stored as integers; the rest stays float."""
    return tensor.ndim == 2 and tensor.numel() > SMALL_TENSOR_MAX_NUMEL and name != TIED_EMBEDDING_NAME

@dataclass(frozen=True)
class ExportRung:
    name: str
    embedding_bits: int  # the tied embedding: 0 keeps it fp16
    attention_bits: int  # attention matrices and the bigram table
    mlp_bits: int
    why: str

# When the artifact would not fit under the cap beside the code, the export steps down this
# ladder, cheapest loss first, until it fits; each rung keeps the savings of the ones above it.
EXPORT_LADDER = (
    ExportRung("int6", 0, 6, 6, "as trained: int6 block matrices, fp16 tied embedding"),
    ExportRung("embed_int8", 8, 6, 6, "the tied embedding in int8 per row, as the 11-layer records store it"),
    ExportRung("embed_int7", 7, 6, 6, "the tied embedding in int7 per row, as the SP8192 records store it"),
    ExportRung("mlp_int5", 7, 6, 5, "MLP matrices in int5 (the seed's USE_MIXED_QUANT=1, which trains on it)"),
    ExportRung("attn_int5", 7, 5, 5, "attention and bigram matrices in int5 too"),
    ExportRung("mlp_int4", 7, 5, 4, "MLP matrices in int4: the last resort, a large loss"),
)
MIXED_QUANT_RUNG = 3  # USE_MIXED_QUANT=1 starts (and trains) here: mlp_int5

def tensor_bits(name: str, tensor: Tensor, rung: ExportRung) -> int:
    """The integer width `rung` stores this tensor with; 0: floating point."""
    if name == TIED_EMBEDDING_NAME:
        return rung.embedding_bits
    return 0 if not is_quantized_matrix(name, tensor) else rung.mlp_bits if ".mlp." in name else rung.attention_bits

# ----------------------------------------------------------------------------------------------
# Groups: the integers by role (layers together), the unit of a rate-distortion export's grid choice and of
# the version 4 artifact's storage

def weight_group(name: str) -> str:
    """tok_emb, c_q, c_k, c_v, attn_proj, mlp_fc, mlp_proj, bigram_embed, bigram_proj, or other."""
    if name == TIED_EMBEDDING_NAME:
        return "tok_emb"
    parts = name.split(".")
    module = parts[-2] if len(parts) >= 2 else name
    if ".attn." in name:
        return "attn_proj" if module == "proj" else module
    if ".mlp." in name:
        return f"mlp_{module}"
    return f"bigram_{module}" if name.startswith("bigram.") else "other"

def rule_1855(group: str) -> Grid:
    """PR #1855's fixed grids: MLP 11.5 std / 31 (int6), attention 13 / 31 (int6), the tied embedding 14 / 63
    (int7); the bigram table and any other matrix here take attention's rule (#1855 stores neither so)."""
    if group == "tok_emb":
        return Grid.of_rule(14.0, 7)
    return Grid.of_rule(11.5, 6) if group.startswith("mlp_") else Grid.of_rule(13.0, 6)

def qat_grids(state: dict[str, Tensor]) -> dict[str, Grid]:
    """The grids QAT trains on before a rate-distortion export, for the matrices stored as integers: #1855's rule,
    among the allocation's candidates (the tied embedding, a lookup and the output layer, is not fake-quantized)."""
    return {n: rule_1855(weight_group(n)) for n, t in state.items() if is_quantized_matrix(n, t)}

# ----------------------------------------------------------------------------------------------
# Calibration
# The Hessian of a linear layer's squared output error is its inputs' second moment, X^T X / n. It is
# gathered by hooks on the layers during a few forward passes over training tokens, in fp32.

@dataclass
class Calibration:
    hessians: dict[str, Tensor]  # weight name -> (in, in) fp32 second moment of the layer's inputs
    tokens: int
    ms: float

def calibrate(model: nn.Module, batches: list[Tensor], forward=None, output_feeds: str = "") -> Calibration:
    """The input second moments of every nn.Linear layer of model over the token batches (each (B, T) ids), run
    through forward (default: model itself). output_feeds: the weight whose input forward's output is (a layer
    applied as a function, as a tied output layer is), which gets its second moment too."""
    t0 = time.perf_counter()
    hessians, tokens = collect_hessians(model, batches, {n for n, _ in model.named_parameters()}, forward, output_feeds)
    return Calibration(hessians, tokens, 1000 * (time.perf_counter() - t0))

def collect_hessians(model: nn.Module, batches, weight_names: set[str], forward=None,
                     output_feeds: str = "") -> tuple[dict[str, Tensor], int]:
    """({weight name: (in, in) fp32 input second moment}, tokens seen) of the nn.Linear layers whose
    weight is named in weight_names (and of output_feeds, fed forward's output), over the token batches."""
    sums, rows, hooks = {}, {}, []
    def accumulate(name: str, x: Tensor) -> None:
        x = x.detach().float().reshape(-1, x.size(-1))
        with torch.autocast(device_type=x.device.type, enabled=False):  # X^T X in fp32, even inside autocast
            sums[name] = sums.get(name, 0) + x.T @ x
        rows[name] = rows.get(name, 0) + x.size(0)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and f"{name}.weight" in weight_names:
            hooks.append(module.register_forward_pre_hook(lambda m, inputs, n=f"{name}.weight": accumulate(n, inputs[0])))
    tokens = 0
    try:
        with torch.no_grad():
            for idx in batches:
                out = (forward or model)(idx)
                if output_feeds:
                    accumulate(output_feeds, out)
                tokens += idx.numel()
    finally:
        for h in hooks:
            h.remove()
    return {n: (sums[n] / rows[n]).cpu() for n in sums}, tokens

def damped(hessian: Tensor, damp_frac: float) -> Tensor:
    """H + damp_frac x mean(diag H) x I in float64; an input never seen (zero diagonal) gets 1 there, so its
    column is rounded to nearest and passes no error on."""
    h = hessian.double().clone()
    dead = h.diagonal() <= 0
    h[dead, :], h[:, dead] = 0.0, 0.0
    h.diagonal()[dead] = 1.0
    h.diagonal().add_(damp_frac * float(h.diagonal().mean()))
    return h

# ----------------------------------------------------------------------------------------------
# GPTQ
# Columns in order of decreasing input energy (act order); within blocks of columns the error is
# fed back column by column, and onto the later blocks in one matrix product (lazy batch updates).

GPTQ_DAMP_FRAC = 0.01  # of the mean diagonal: keeps the Cholesky factorisation well conditioned
GPTQ_BLOCK_COLS = 128

def gptq_quantize(w: Tensor, hessian: Tensor, bits: int, damp_frac: float = GPTQ_DAMP_FRAC,
                  block_cols: int = GPTQ_BLOCK_COLS, step: float = 0.0) -> tuple[Tensor, Tensor]:
    """(rows, cols) float and its (cols, cols) input second moment -> int8 values and fp16 per-row scales
    on exactly quantize_rows' grid (the same scales, row max or std `step`), rounded to minimise the output error."""
    w = w.float()
    scale = row_scales(w, bits, step)
    inverse = 1.0 / scale.float()
    h = damped(hessian, damp_frac)
    order = torch.argsort(h.diagonal(), descending=True)
    h = h[order][:, order]
    # the upper Cholesky factor of H^-1: row j holds how column j's error spreads over the columns after it
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    work, q = w[:, order].clone(), torch.empty_like(w)
    for start in range(0, w.size(1), block_cols):
        end = min(start + block_cols, w.size(1))
        block, errors = work[:, start:end], torch.empty(w.size(0), end - start, device=w.device)
        for j in range(end - start):
            column = block[:, j]
            rounded = round_to_grid(column, inverse, bits)
            q[:, start + j] = rounded
            errors[:, j] = (column - rounded * scale.float()) / u[start + j, start + j]
            block[:, j + 1 :] -= errors[:, j : j + 1] * u[start + j, start + j + 1 : end][None, :]
        work[:, end:] -= errors @ u[start:end, end:]
    return q[:, torch.argsort(order)].to(torch.int8), scale

def output_error(error: Tensor, hessian: Tensor) -> float:
    """The mean squared output change a weight error (rows, cols) causes on the calibration inputs: tr(E H E^T)."""
    return float(((error.double() @ hessian.double()) * error.double()).sum())

# ----------------------------------------------------------------------------------------------
# LQER
# The error E = W - dequant(Q) is replaced, as far as rank r allows, by A B; fitted on E L where H = L L^T,
# so that the correction removes output error (on the calibration inputs), not weight error. The factors
# are stored as A^T (r, rows) and B (r, cols), each rank component one row: per-row int8 or fp16.

LQER_DAMP_FRAC = 0.01
LQER_FACTOR_BITS = (4, 5, 6, 8, 16)  # 16: fp16 factors; below: per-row integers with fp16 scales
LQER_ROLES = ("lqer_a", "lqer_b")  # the artifact's names for A^T and B

@dataclass
class Correction:
    """A rank-r correction stored as factors: values (int8 or fp16) and, for integer factors, fp16 row scales."""
    a_t: Tensor  # (r, rows)
    b: Tensor  # (r, cols)
    a_scales: Tensor | None
    b_scales: Tensor | None
    bits: int
    def factors(self) -> tuple[Tensor, Tensor]:
        """(A (rows, r), B (r, cols)) in fp32, as a reader of the artifact rebuilds them."""
        a_t, b = ((t.float() if s is None else dequantize_rows(t, s)) for t, s in ((self.a_t, self.a_scales),
                                                                                 (self.b, self.b_scales)))
        return a_t.T, b
    def delta(self) -> Tensor:
        a, b = self.factors()
        return a @ b
    def entries(self) -> list[tuple[str, Tensor]]:
        """(artifact role, tensor) of what the artifact stores: the factors, then any row scales."""
        return [(role + suffix, t) for suffix, pair in (("", (self.a_t, self.b)), ("_scales", (self.a_scales,
                self.b_scales))) for role, t in zip(LQER_ROLES, pair) if t is not None]
    @property
    def rank(self) -> int:
        return self.a_t.size(0)
    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.a_t, self.b, self.a_scales, self.b_scales)
                   if t is not None)

def store_factor(t: Tensor, bits: int) -> tuple[Tensor, Tensor | None]:
    return (t.to(torch.float16), None) if bits == 16 else quantize_rows(t, bits)

def fit_correction(error: Tensor, hessian: Tensor, rank: int, bits: int, damp_frac: float = LQER_DAMP_FRAC) -> Correction:
    """The rank-`rank` correction A B of error (rows, cols) that removes the most output error on inputs
    of second moment `hessian`, its factors stored at `bits`."""
    lower = torch.linalg.cholesky(damped(hessian, damp_frac))
    u, s, vh = torch.linalg.svd(error.double() @ lower, full_matrices=False)
    # B L = sqrt(S) V^T, solved for B: A B L is the best rank-r approximation of E L
    b = torch.linalg.solve_triangular(lower, s[:rank, None].sqrt() * vh[:rank], upper=False, left=False)
    a_t = s[:rank, None].sqrt() * u[:, :rank].T
    (a_t, a_scales), (b, b_scales) = store_factor(a_t.float(), bits), store_factor(b.float(), bits)
    return Correction(a_t, b, a_scales, b_scales, bits)

def correction_problem(a_t: Tensor | None, b: Tensor | None, a_scales: Tensor | None, b_scales: Tensor | None,
                       shape: tuple[int, int] | None) -> str | None:
    """What is wrong with a correction read from an artifact for a tensor of `shape` (None: no such integer
    tensor), or None when it is sound: shapes that fit, finite values."""
    if shape is None:
        return "it corrects no integer tensor of the artifact"
    if a_t is None or b is None:
        return "one of its two factors is missing"
    if a_t.ndim != 2 or b.ndim != 2 or a_t.size(0) != b.size(0) or (a_t.size(1), b.size(1)) != tuple(shape):
        return (f"factor shapes {list(a_t.shape)} and {list(b.shape)} do not make a low-rank correction of a "
                f"{list(shape)} matrix")
    for factor, scales in ((a_t, a_scales), (b, b_scales)):
        if factor.is_floating_point() != (scales is None):
            return "integer factors need their row scales, fp16 factors have none"
        if scales is not None and scales.shape != factor.shape[:1]:
            return f"{scales.numel()} row scales for {factor.size(0)} rows"
        if not all(bool(torch.isfinite(t.float()).all()) for t in (factor, scales) if t is not None):
            return "it holds values that are not finite"
    return None

def read_correction(entries: dict[str, Tensor], shape: tuple[int, int] | None) -> tuple[Correction | None, str | None]:
    """(the correction, None) from an artifact's {role: tensor} of one tensor of `shape`, or (None, what is wrong)."""
    parts = [entries.get(role + suffix) for suffix in ("", "_scales") for role in LQER_ROLES]
    problem = correction_problem(*parts, shape)
    return (None, problem) if problem else (Correction(*parts, bits=0), None)

def rate_correction(error: Tensor, hessian: Tensor, weight: Tensor, rank: int, bits: int) -> tuple[Correction, float]:
    """A fitted correction, and the share of the layer's own output energy it removes per stored byte (so that
    layers of any scale compare), measured on the calibration inputs."""
    correction = fit_correction(error, hessian, rank, bits)
    removed = output_error(error, hessian) - output_error(error - correction.delta(), hessian)
    return correction, removed / max(output_error(weight.float(), hessian), 1e-30) / correction.nbytes

def choose_corrections(rated: dict[str, tuple[Correction, float]], count: int) -> dict[str, Correction]:
    """The corrections of the `count` tensors that gain the most per byte (rate_correction)."""
    best = sorted(rated, key=lambda n: -rated[n][1])[:count]
    return {n: rated[n][0] for n in best if rated[n][1] > 0}

# ----------------------------------------------------------------------------------------------
# One tensor, one rung
# What the export stores for a tensor at a bit width: the quantizer's integers, scales and, where chosen,
# a correction. The quantizers are a table: a name the settings accept -> how it rounds.

QUANTIZERS = {
    "rtn": lambda w, hessian, grid: quantize_rows(w, grid.bits, grid.step),
    "gptq": lambda w, hessian, grid: quantize_rows(w, grid.bits, grid.step) if hessian is None else gptq_quantize(
        w, hessian, grid.bits, step=grid.step),
}

def as_grid(grid: "int | Grid") -> Grid:
    """A bit width alone is the ladder's grid: row max / top."""
    return grid if isinstance(grid, Grid) else Grid(int(grid))

@dataclass
class Quantized:
    values: Tensor  # int8 (rows, cols)
    scales: Tensor  # fp16 (rows,)
    bits: int
    correction: Correction | None = None
    def dequantize(self) -> Tensor:
        w = dequantize_rows(self.values, self.scales)
        return w if self.correction is None else w + self.correction.delta()

def quantize_state(state: dict[str, Tensor], bits_of: "dict[str, int | Grid]", quantizer: str = "rtn",
                   hessians: dict[str, Tensor] | None = None, lqer_rank: int = 0, lqer_tensors: int = 0,
                   lqer_factor_bits: int = 8, cache: dict | None = None,
                   device: torch.device | str = "cpu") -> dict[str, Quantized]:
    """{name: Quantized} for every tensor with a bit width (or Grid) in bits_of: rounded by `quantizer` (GPTQ where
    a Hessian is known, e.g. not for lookup tables), then LQER corrections on the lqer_tensors tensors
    where they remove the most output error per byte. Only layers with inputs (a Hessian) get one: a lookup
    table's error is per row, without a low-rank shape. cache: kept across the rungs of one export, so a
    rung redoes only the tensors whose width it changes. device: where the rounding runs (the GPU that
    trained, where there is one: GPTQ's column loop is thousands of small steps); the results are on the CPU."""
    hessians, cache = hessians or {}, {} if cache is None else cache
    def once(key: tuple, compute):
        if key not in cache:
            cache[key] = compute()
        return cache[key]
    def rounded(n: str, grid: Grid) -> tuple[Tensor, Tensor]:
        h = hessians.get(n)
        q, scale = QUANTIZERS[quantizer](state[n].to(device), None if h is None else h.to(device), grid)
        return q.cpu(), scale.cpu()
    grids = {n: as_grid(b) for n, b in bits_of.items() if as_grid(b).bits}
    out = {n: Quantized(*once((quantizer, n, g), lambda: rounded(n, g)), g.bits) for n, g in grids.items()}
    if lqer_rank > 0 and lqer_tensors > 0:
        rated = {n: once((quantizer, n, grids[n], "lqer", lqer_rank, lqer_factor_bits), lambda: rate_correction(
                     state[n].float() - q.dequantize(), hessians[n], state[n], lqer_rank, lqer_factor_bits))
                 for n, q in out.items() if n in hessians}
        for n, correction in choose_corrections(rated, lqer_tensors).items():
            out[n].correction = correction
    return out

def relative_errors(state: dict[str, Tensor], quantized: dict[str, Quantized],
                    hessians: dict[str, Tensor]) -> tuple[float, float]:
    """(RMS weight error over all weights' RMS; RMS output error of the calibrated layers over their outputs' RMS)."""
    errors = {n: q.dequantize() - state[n].float() for n, q in quantized.items()}
    weight_norm = sum(float(t.float().square().sum()) for t in state.values())
    weight = math.sqrt(sum(float(e.square().sum()) for e in errors.values()) / max(weight_norm, 1e-24))
    pairs = [(output_error(e, hessians[n]), output_error(state[n], hessians[n])) for n, e in errors.items() if n in hessians]
    return weight, math.sqrt(sum(e for e, _ in pairs) / max(sum(w for _, w in pairs), 1e-24)) if pairs else 0.0

def stored_tensors(state: dict[str, Tensor], quantized: dict[str, Quantized]) -> list[tuple[str, str, Tensor, int]]:
    """(name, artifact role, tensor, bits) in the artifact's order: integer values grouped by width (similar bytes
    side by side compress better), the tied embedding's after the block matrices', their scales, the corrections'
    factors, then the tensors kept in float. Embedding last: in front, its int8 rows made zstd-22 compress the
    whole body worse (the trained-like default model's embed_int8 rung: 15,968,979 bytes in front, 14,947,957
    behind, measured with bench/quant_gap.py's fill)."""
    names = sorted((n for n in state if n in quantized),  # stable: model order within a width
                   key=lambda n: (n == TIED_EMBEDDING_NAME, -quantized[n].bits))
    return ([(n, "int_values", quantized[n].values, quantized[n].bits) for n in names]
            + [(n, "int_scales", quantized[n].scales, 0) for n in names]
            + [(n, role, t, q.correction.bits) for n in names if (q := quantized[n]).correction is not None
               for role, t in q.correction.entries()]
            + [(n, "float", t.detach().to(torch.float16 if t.ndim >= 2 else torch.float32), 0)
               for n, t in state.items() if n not in quantized])
