"""
allocation.py: the rate-distortion export (EXPORT_ALLOCATION=rd). Each group of stored matrices (quantize.
weight_group: tok_emb, c_q, c_k, c_v, attn_proj, mlp_fc, mlp_proj, bigram_embed, bigram_proj, other; layers
together) takes one grid, per-row scale = step x row std (quantize.Grid), chosen under the cap:

    options     per group and candidate grid (CANDIDATE_STEPS, #1855's rule, the ladder's row max grids int5-8, and
                fp16 for the tied embedding):
                the stored bytes (the group's integers compressed on their own as the version 4 artifact holds
                them, by zstd at the export's level (on these integers zstd-22 beat xz -9e by 1-2%, measured:
                docs/export.md), on evenly spaced chunks when `sample` < 1, scaled up; its fp16 row scales
                counted at 2 bytes a row) and the distortion: the group's summed output error tr(E H E^T)
                (quantize.output_error) with H its layer inputs' second moment from training tokens
                (calibration; never validation), H = I where there is none (a lookup table, or no calibration)
    sensitivity each group's error is weighted by its measured effect on the loss (`loss`: the mean loss over the
                calibration's training tokens with some weights replaced): E_g = the group's rounding error on
                #1855's grid (SENSITIVITY_GRID), lambda_g = (L(W+E_g) + L(W-E_g) - 2 L(W)) / 2 / error_g(E_g):
                the second-order loss increase per unit of output error (antithetic: the first-order term of an
                unconverged model cancels), clamped to the least positive lambda measured (noise can make a flat
                group's curvature negative). Without it, output errors of different groups are on different
                scales (a lookup table's H = I against the layers' input moments: docs/export.md, run 3). The
                search minimises sum lambda_g x error_g, the predicted loss increase in nats a token. Cost: 2
                forwards a group over the calibration tokens (and one for L(W)).
    search      exact, not greedy: the multiple-choice knapsack solved by dynamic programming over bytes (in units
                of budget / 20,000, each option's bytes rounded up), keeping per byte count only the least error
                (a Pareto front, a few hundred points). A Lagrangian or marginal-error-per-byte greedy search finds
                only the points on each group's lower convex hull; measured on synthetic curves (tests/
                test_export_rd.py) the greedy one missed combinations that fit with less error.
    rounding    the options are measured rounded to nearest (cheap: one rounding and one product with H each);
                the chosen grids are then rounded by the export's quantizer (GPTQ: one pass over the model, as
                the ladder's first rung costs), whose error is logged beside the prediction
    check       the artifact is packed for real (artifact.grouped_artifact); over the cap, the budget shrinks
                by the overshoot and the search runs again; under it by more than SLACK_FRACTION of the cap (the
                sampled sizes run long), the budget grows by what is left; once one budget fitted and another
                went over, the next is halfway between (a bisection); the last pack that fits stands
    finalists   with `loss`, the search's pick is measured against CHECK_FINALISTS' grids packed the same way (the
                ladder's highest rung whose per-group pack fits the cap; #1855's rule where it fits): each
                finalist's artifact is read back and its stored weights' loss measured per sequence of the same
                training tokens. The ladder's finalist is the incumbent (the search's pick where no rung fits);
                another finalist replaces it only if its mean loss is lower by more than CHECK_MARGIN_SE standard
                errors of the paired per-sequence difference (of those that are, the lowest; each gain and its
                error logged). The margin, measured on six seeds (docs/export.md, run 8): 2 standard errors kept
                the ladder's grids wherever the check's gain was smaller, never worse than the ladder on the
                validation but giving up gains of 3 to 5.5 of its standard errors; 0 (the default: the lowest mean
                stands, the ladder's on a tie) lower on average at both caps, at most +0.00009 +/- 0.00019 BPB
                behind on one seed. So rd is never worse than the ladder on the loss the export can measure, at a
                forward a finalist and a pack (and one more for each higher rung predicted within
                CHECK_TOLERANCE of the room that goes over the cap). Without `loss`: no check. Not
                under a training clock (`final_check` False): its forwards read training tokens after the
                measuring and packing, which run after the clock, and training data is read only on the clock
                (GPTQ_RESERVE_SECONDS, docs/export.md)

Imported by train_gpt.py, so its bytes count wherever train_gpt.py's do (code_size.EVALUATION_BASE).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Protocol

import torch
from torch import Tensor

from artifact import compress_best, grouped_artifact, pool_workers, stored_bytes, unpack
from quantize import EXPORT_LADDER, TIED_EMBEDDING_NAME, Grid, Quantized, is_quantized_matrix, output_error, \
    quantize_state, rule_1855, tensor_bits, weight_group

# in row stds: 0.1 to 0.75, each 1.25 x the last (containers int8 down to int5 follow: Grid.of_step); beside them
# the ladder's row max grids (int5 to int8: never clamped, so the ladder's own rungs are always among the options)
CANDIDATE_STEPS = tuple(round(0.1 * 1.25**i, 4) for i in range(10))
ROW_MAX_BITS = (5, 6, 7, 8)
FLOAT_GRID = Grid(0)  # the tied embedding kept in fp16, as the ladder's first rung keeps it
SAMPLE_CHUNK = 1 << 16
PACK_TRIES = 6
SLACK_FRACTION = 0.002  # a pack that fits with more of the cap left than this repacks with the leftover added
SENSITIVITY_GRID = rule_1855  # the grid whose rounding error measures each group's loss curvature
CHECK_TOLERANCE = 0.1  # a finalist predicted over the model's room by more than this share is not packed
CHECK_MARGIN_SE = 0.0  # a finalist replaces the ladder's only if its loss is lower by more than this many
# standard errors of the paired per-sequence difference (module docstring: finalists; 2: never worse on run 8's
# six seeds, fewer wins)


def ladder_finalists(state: dict[str, Tensor], groups: dict[str, list[str]]) -> list[tuple[str, dict[str, Grid]]]:
    """The ladder's rungs as per-group grids (row max at the rung's width; fp16 where it keeps float), first first."""
    return [(rung.name, {g: Grid(tensor_bits(names[0], state[names[0]], rung)) for g, names in groups.items()})
            for rung in EXPORT_LADDER]


def rule_finalists(state: dict[str, Tensor], groups: dict[str, list[str]]) -> list[tuple[str, dict[str, Grid]]]:
    """#1855's fixed grids (k 11.5 MLP, 13 attention, 14 int7 embedding), one row."""
    return [("k11.5_13_14", {g: rule_1855(g) for g in groups})]


# what the search's pick is measured against when the export has a loss: (log name, its rows of grids, highest
# first; the first whose pack fits the cap is that kind's finalist)
CHECK_FINALISTS = (("ladder", ladder_finalists), ("rule_1855", rule_finalists))


class Loss(Protocol):
    """The mean next-token loss over the calibration's training tokens with the named weights replaced
    (replaced_loss); per_sequence: each sequence's mean, a 1-D tensor (the check's paired noise)."""
    def __call__(self, replaced: dict[str, Tensor], per_sequence: bool = False) -> float | Tensor: ...


@dataclass(frozen=True)
class Option:
    grid: Grid
    nbytes: float  # predicted stored bytes
    error: float  # summed output error
    compress_ms: float = 0.0  # the time its size took to measure (the rest of measuring it is rounding and error)


def grouped_names(state: dict[str, Tensor]) -> dict[str, list[str]]:
    """{group: its tensors' names, model order}: the block matrices, the bigram table and the tied embedding."""
    groups: dict[str, list[str]] = {}
    for name, t in state.items():
        if name == TIED_EMBEDDING_NAME or is_quantized_matrix(name, t):
            groups.setdefault(weight_group(name), []).append(name)
    return groups


def candidates(group: str) -> list[Grid]:
    grids = {Grid.of_step(s) for s in CANDIDATE_STEPS} | {rule_1855(group)} | {Grid(b) for b in ROW_MAX_BITS}
    return sorted(grids | ({FLOAT_GRID} if group == "tok_emb" else set()), key=lambda g: (g.bits == 0, g.step == 0, -g.step, g.bits))  # coarsest std first, row max, fp16


def sampled_size(raw: bytes, codecs: tuple[str, ...], zstd_level: int, sample: float) -> float:
    """The compressed size of raw by the best of codecs, from evenly spaced chunks when sample < 1."""
    chunks = len(raw) // SAMPLE_CHUNK
    if sample >= 1 or chunks < 4:
        return float(len(compress_best(raw, codecs, zstd_level)[1]))
    every = max(1, round(1 / sample))
    part = b"".join(raw[i * SAMPLE_CHUNK : (i + 1) * SAMPLE_CHUNK] for i in range(0, chunks, every))
    return len(compress_best(part, codecs, zstd_level)[1]) * len(raw) / len(part)


def group_error(state: dict[str, Tensor], names: list[str], dequantized: dict[str, Tensor],
                hessians: dict[str, Tensor], device: torch.device | str = "cpu") -> float:
    """The group's summed output error tr(E H E^T) (H = I for a weight without a Hessian), on device."""
    total = 0.0
    for n in names:
        e = dequantized[n].to(device) - state[n].to(device).float()
        total += output_error(e, hessians[n].to(device)) if n in hessians else float(e.double().square().sum())
    return total


def measure_option(state: dict[str, Tensor], names: list[str], grid: Grid, hessians: dict[str, Tensor],
                   quantizer: str, codecs: tuple[str, ...], zstd_level: int, sample: float,
                   device) -> tuple[Option, dict[str, Quantized]]:
    if grid.bits == 0:
        halves = {n: state[n].to(torch.float16) for n in names}
        raw = b"".join(stored_bytes(halves[n], False) for n in names)
        error = group_error(state, names, {n: h.float() for n, h in halves.items()}, hessians, device)
        t0 = time.perf_counter()
        nbytes = sampled_size(raw, codecs, zstd_level, sample)
        return Option(grid, nbytes, error, 1000 * (time.perf_counter() - t0)), {}
    quantized = quantize_state({n: state[n] for n in names}, {n: grid for n in names}, quantizer, hessians,
                               device=device)
    raw = b"".join(stored_bytes(quantized[n].values, False) for n in names)
    t0 = time.perf_counter()
    nbytes = sampled_size(raw, codecs, zstd_level, sample) + 2 * sum(state[n].size(0) for n in names)
    compress_ms = 1000 * (time.perf_counter() - t0)
    error = group_error(state, names, {n: q.dequantize() for n, q in quantized.items()}, hessians, device)
    return Option(grid, nbytes, error, compress_ms), quantized


def sensitivities(state: dict[str, Tensor], groups: dict[str, list[str]], hessians: dict[str, Tensor],
                  loss: Loss, device: torch.device | str = "cpu") -> dict[str, float]:
    """{group: lambda_g}, the loss increase per unit of its output error (module docstring)."""
    base, raw = loss({}), {}
    for g, names in groups.items():
        grid = SENSITIVITY_GRID(g)
        quantized = quantize_state({n: state[n] for n in names}, {n: grid for n in names})
        dequantized = {n: q.dequantize() for n, q in quantized.items()}
        error = group_error(state, names, dequantized, hessians, device)
        plus = loss({n: dequantized[n] for n in names})
        minus = loss({n: 2 * state[n].float() - dequantized[n] for n in names})
        raw[g] = (plus + minus - 2 * base) / 2 / error if error > 0 else 0.0
    floor = min((v for v in raw.values() if v > 0), default=1.0)
    return {g: max(v, floor) for g, v in raw.items()}


def level_ratio(state: dict[str, Tensor], names: list[str], zstd_level: int, measure_level: int,
                sample: float) -> float:
    """How much smaller zstd at the export's level makes a group's integers than at the measuring level, on
    SENSITIVITY_GRID's rounding (one grid a group): the correction applied to all its candidates' sizes."""
    grid = SENSITIVITY_GRID(weight_group(names[0]))
    quantized = quantize_state({n: state[n] for n in names}, {n: grid for n in names})
    raw = b"".join(stored_bytes(quantized[n].values, False) for n in names)
    return sampled_size(raw, ("zstd",), zstd_level, sample) / sampled_size(raw, ("zstd",), measure_level, sample)


def allocate(options: dict[str, list[Option]], budget: float, unit: float = 0.0) -> dict[str, int]:
    """{group: index of its chosen option}: the least total error whose bytes fit `budget` (module docstring), by
    dynamic programming over bytes counted in units (default budget / 20,000, an option's bytes rounded up: what
    fits here fits). Nothing fits: each group's cheapest option."""
    unit = unit or max(budget / 20_000, 1.0)
    limit = math.floor(budget / unit)
    frontier = [(0, 0.0, ())]  # (units used, error, option indices): the Pareto front, fewer units first
    for group, opts in options.items():
        reached = sorted((used + math.ceil(o.nbytes / unit), error + o.error, picks + (i,))
                         for used, error, picks in frontier for i, o in enumerate(opts)
                         if used + math.ceil(o.nbytes / unit) <= limit)
        frontier = []
        for point in reached:  # more units must buy less error
            if not frontier or point[1] < frontier[-1][1]:
                frontier.append(point)
    if not frontier:
        return {g: min(range(len(o)), key=lambda i: o[i].nbytes) for g, o in options.items()}
    return dict(zip(options, min(frontier, key=lambda p: p[1])[2]))


def fixed_bytes(state: dict[str, Tensor], groups: dict[str, list[str]], zstd_level: int) -> int:
    """What the artifact holds beside the groups' integers: the small float tensors compressed, and room for
    the header (1 KB a group)."""
    grouped = {n for names in groups.values() for n in names}
    raw = b"".join(stored_bytes(t.detach().to(torch.float16 if t.ndim >= 2 else torch.float32), False)
                   for n, t in state.items() if n not in grouped)
    return len(compress_best(raw, ("zstd",), zstd_level)[1]) + 1024 * (len(groups) + 2)


def export_rd(state: dict[str, Tensor], meta: dict, code_bytes: int, cap_bytes: int, zstd_level: int, log,
              quantizer: str = "rtn", hessians: dict[str, Tensor] | None = None, codecs: tuple[str, ...] = ("zstd",
              "lzma"), sample: float = 0.25, device: torch.device | str = "cpu", measure_codecs=("zstd",),
              grids: dict[str, list[Grid]] | None = None,
              loss: Loss | None = None,
              measure_level: int | None = None, final_check: bool = True) -> tuple[bytes, dict[str, Grid]]:
    """The version 4 artifact whose groups' grids the rate-distortion search chose under cap_bytes less
    code_bytes, and {group: grid}. grids: the candidates of each group (default: candidates(group)). codecs: those
    the pack chooses from, per group; measure_codecs: those the options are measured with. loss: the mean loss over
    training tokens with some weights replaced, for the groups' sensitivities (None: every lambda_g is 1).
    measure_level: the zstd level the candidates are measured at (default zstd_level), their sizes then scaled by
    each group's ratio between the two levels (level_ratio). final_check: measure the finalists (module docstring)
    when `loss` is given; off under a training clock.
    Logs a line per group (chosen grid, bits a parameter, error) and one for the whole."""
    hessians = hessians or {}
    groups = grouped_names(state)
    t0 = time.perf_counter()
    lambdas = sensitivities(state, groups, hessians, loss, device) if loss else {g: 1.0 for g in groups}
    sensitivity_ms = 1000 * (time.perf_counter() - t0)
    t0 = time.perf_counter()
    level = measure_level or zstd_level
    jobs = [(g, grid) for g in groups for grid in (grids or {}).get(g, candidates(g))]
    with ThreadPoolExecutor(pool_workers()) as pool:  # zstd, lzma and torch's kernels release the GIL
        measured = list(pool.map(lambda job: measure_option(state, groups[job[0]], job[1], hessians, "rtn",
                                                            measure_codecs, level, sample, device), jobs))
        ratios = dict(zip(groups, pool.map(lambda g: level_ratio(state, groups[g], zstd_level, level, sample),
                                           groups))) if level != zstd_level else {g: 1.0 for g in groups}
    def at_export_level(g: str, option: Option) -> Option:
        scales = 2 * sum(state[n].size(0) for n in groups[g]) if option.grid.bits else 0
        return replace(option, nbytes=(option.nbytes - scales) * ratios[g] + scales)
    options, rounded = {g: [] for g in groups}, {}
    for (g, grid), (option, quantized) in zip(jobs, measured):
        options[g].append(at_export_level(g, option))
        rounded[(g, grid)] = quantized if quantizer == "rtn" else None
    measure_ms = 1000 * (time.perf_counter() - t0)
    def final(g: str, grid: Grid) -> dict[str, Quantized]:
        if rounded.get((g, grid)) is None and grid.bits:  # the export's quantizer (GPTQ) on the chosen grid, once
            rounded[(g, grid)] = quantize_state({n: state[n] for n in groups[g]}, {n: grid for n in groups[g]},
                                                quantizer, hessians, device=device)
        return rounded.get((g, grid)) or {}
    def pack(chosen: dict[str, Grid]) -> tuple[bytes, list[dict], dict[str, Quantized], float, float]:
        """(blob, its streams, the quantized tensors, quantize ms, pack ms) of these grids."""
        t1 = time.perf_counter()
        quantized = {n: q for g, grid in chosen.items() for n, q in final(g, grid).items()}
        t2 = time.perf_counter()
        blob, stored = grouped_artifact(state, {**meta, "export_rung": "rd"}, quantized, zstd_level=zstd_level,
                                        codecs=codecs)
        return blob, stored, quantized, 1000 * (t2 - t1), 1000 * (time.perf_counter() - t2)
    quantize_ms = 0.0
    room = cap_bytes - code_bytes - fixed_bytes(state, groups, zstd_level)
    budget = room
    best, packs, fitted, over = None, 0, 0.0, None  # best: the last pack that fits (the largest budget that fitted)
    for attempt in range(PACK_TRIES):
        choice = allocate({g: [replace(o, error=lambdas[g] * o.error) for o in opts] for g, opts in options.items()},
                          budget)
        if best is not None and choice == best[2]:
            break  # the budget grew by less than any option's step: nothing to gain from another pack
        chosen = {g: options[g][i].grid for g, i in choice.items()}
        blob, stored, quantized, step_ms, pack_ms = pack(chosen)
        quantize_ms += step_ms
        packs += 1
        total = len(blob) + code_bytes
        if total <= cap_bytes:
            best, fitted = (blob, stored, choice, chosen, quantized, total), budget
            if cap_bytes - total <= SLACK_FRACTION * cap_bytes:
                break
            # the sampled predictions were long: spend what is left (halfway to a budget that went over, if one did)
            budget = budget + cap_bytes - total if over is None else (budget + over) / 2
        else:
            over = budget
            # the predictions were short: by more next time; after a pack that fitted, halfway back to its budget
            budget = budget - 2 * (total - cap_bytes) - 4096 * (attempt + 1) if best is None else (fitted + budget) / 2
    if best is not None:
        blob, stored, choice, chosen, quantized, total = best
        if loss is not None and final_check:  # the finalists, measured (module docstring)
            (blob, stored, quantized, chosen, total), line = check_finalists(
                state, groups, options, pack, loss, room, cap_bytes, code_bytes, (blob, stored, quantized, chosen, total))
            log(line)
        elif loss is not None:
            log("export_rd_check skipped:training_clock # its forwards would read training tokens after the clock; "
                "the search's pick stands (MAX_WALLCLOCK_SECONDS=0 runs the check)")
    picked = {g: next((o for o in options[g] if o.grid == grid), None) or at_export_level(g, measure_option(
        state, groups[g], grid, hessians, "rtn", measure_codecs, level, sample, device)[0])
        for g, grid in chosen.items()}  # a finalist's grid may be no candidate (the ladder's int4): measured for the log
    streams, actual = {s["name"]: s for s in stored}, 0.0
    for g, grid in chosen.items():
        numel = sum(state[n].numel() for n in groups[g])
        option = picked[g]
        error = group_error(state, groups[g], {n: quantized[n].dequantize() for n in groups[g]}, hessians, device) \
            if grid.bits else option.error
        actual += error
        stream = streams.get(g) or streams.get("float", {})
        group_bytes = stream.get("nbytes", 0) if g in streams else option.nbytes  # fp16: inside the float group
        log(f"export_group group:{g} grid:{grid.label()} c:{grid.c:.2f} step_std:{grid.step:.4f} "
            f"container_bits:{grid.bits} params:{numel} bytes:{group_bytes:.0f} "
            f"bits_per_param:{8 * group_bytes / numel:.3f} output_error:{error:.6g} predicted_error:{option.error:.6g} "
            f"sensitivity:{lambdas[g]:.6g} predicted_loss:{lambdas[g] * option.error:.6g} "
            f"codec:{stream.get('codec', '-')} transposed:{int(bool(stream.get('transposed')))} "
            f"predicted_bytes:{option.nbytes:.0f}")
    log(f"export_rd model_bytes:{len(blob)} total_bytes:{total} cap_bytes:{cap_bytes} fits:{int(total <= cap_bytes)} "
        f"search:knapsack_dp candidates:{sum(len(o) for o in options.values())} "
        f"output_error:{actual:.6g} predicted_error:{sum(o.error for o in picked.values()):.6g} "
        f"quantizer:{quantizer} "
        f"predicted_loss:{sum(lambdas[g] * o.error for g, o in picked.items()):.6g} "
        f"sensitivities:{'measured' if loss else 'none'} sensitivity_ms:{sensitivity_ms:.0f} "
        f"sample:{sample} measure_level:{level} workers:{pool_workers()} measure_ms:{measure_ms:.0f} compress_ms_serial:{sum(o.compress_ms for opts in options.values() for o in opts):.0f} quantize_ms:{quantize_ms:.0f} pack_ms:{pack_ms:.0f} "
        f"packs:{packs}")
    if total > cap_bytes:
        log(f"over_cap rung:rd over_bytes:{total - cap_bytes} cap_bytes:{cap_bytes} # even the coarsest grids are "
            "over the cap: the artifact is written, but the challenge rejects it; make the model smaller")
    return blob, chosen


def stored_loss(blob: bytes, groups: dict[str, list[str]], loss: Loss, per_sequence: bool = False) -> float | Tensor:
    """The loss with the groups' weights replaced by what the artifact stores (read back, as the evaluation reads it;
    the other tensors are stored alike by every finalist): its mean, or per_sequence each sequence's."""
    stored = unpack(blob, "<memory>")[0]
    return loss({n: stored[n] for names in groups.values() for n in names}, per_sequence=per_sequence)


def replaced_loss(model: torch.nn.Module, batches: list[Tensor], autocast: bool) -> Loss:
    """The Loss of `model` (forward(ids): the logits; forward(ids, targets): the mean loss) over the (B, T) id
    batches, on training tokens: the named weights replaced for the measurement, then put back."""
    params = dict(model.named_parameters())
    def loss(replaced: dict[str, Tensor], per_sequence: bool = False) -> float | Tensor:
        kept = {n: params[n].detach().clone() for n in replaced}
        total, count, sequences = 0.0, 0, []
        try:
            with torch.no_grad(), torch.autocast(device_type=batches[0].device.type, dtype=torch.bfloat16,
                                                 enabled=autocast):
                for n, t in replaced.items():
                    params[n].copy_(t.to(params[n].device, params[n].dtype))
                for b in batches:
                    if per_sequence:
                        logits = model(b[:, :-1]).float()  # (B, T, V): flattened, not transposed (no copy)
                        token_losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1), b[:, 1:].flatten(),
                                                                         reduction="none")
                        sequences.append(token_losses.view(b.size(0), -1).mean(dim=1).cpu())
                    else:
                        total += float(model(b[:, :-1], b[:, 1:])) * b[:, 1:].numel()
                        count += b[:, 1:].numel()
        finally:
            with torch.no_grad():
                for n, t in kept.items():
                    params[n].copy_(t)
        return torch.cat(sequences) if per_sequence else total / count
    return loss


def paired_gain(challenger: Tensor, incumbent: Tensor) -> tuple[float, float]:
    """(the incumbent's mean loss less the challenger's, its standard error from the per-sequence differences; 0
    with one sequence: nothing to measure the noise by)."""
    difference = incumbent.double().flatten() - challenger.double().flatten()
    error = float(difference.std() / math.sqrt(difference.numel())) if difference.numel() > 1 else 0.0
    return float(difference.mean()), error


def check_finalists(state: dict[str, Tensor], groups: dict[str, list[str]], options: dict[str, list[Option]],
                    pack: Callable[[dict[str, Grid]], tuple], loss: Loss, room: float, cap_bytes: int, code_bytes: int,
                    searched: tuple) -> tuple[tuple, str]:
    """The finalist that stands, (blob, streams, quantized, {group: grid}, total bytes), and the export_rd_check log
    line. Each kind of CHECK_FINALISTS offers its rows highest first; a row predicted over `room` (the model's bytes
    beside the fixed ones) by more than CHECK_TOLERANCE is not packed; the first row whose pack fits the cap is the
    kind's finalist; none fits: none. The ladder's finalist is the incumbent (none: the search's, `searched`); another
    replaces it only if its per-sequence loss is lower by more than CHECK_MARGIN_SE paired standard errors."""
    t0 = time.perf_counter()
    def predicted(grids: dict[str, Grid]) -> float | None:
        sizes = [next((o.nbytes for o in options[g] if o.grid == grid), None) for g, grid in grids.items()]
        return None if None in sizes else sum(sizes)
    chosen = searched[3]
    finalists = {"rd": (searched, stored_loss(searched[0], groups, loss, per_sequence=True))}
    fields, packs = [f"rd_loss:{float(finalists['rd'][1].mean()):.6f} rd_bytes:{len(searched[0])}"], 0
    for kind, rows in CHECK_FINALISTS:
        entry = None
        for label, grids in rows(state, groups):
            if grids == chosen:  # the search chose exactly these grids: no other finalist
                entry = (label, searched, finalists["rd"][1])
                break
            estimate = predicted(grids)
            if estimate is not None and estimate > room * (1 + CHECK_TOLERANCE):
                continue
            blob, stored, quantized, _, _ = pack(grids)
            packs += 1
            if len(blob) + code_bytes <= cap_bytes:
                entry = (label, (blob, stored, quantized, grids, len(blob) + code_bytes),
                         stored_loss(blob, groups, loss, per_sequence=True))
                break
        if entry is None:
            fields.append(f"{kind}_rung:none {kind}_loss:none")
            continue
        fields.append(f"{kind}_rung:{entry[0]} {kind}_loss:{float(entry[2].mean()):.6f} {kind}_bytes:{len(entry[1][0])}")
        finalists[kind] = (entry[1], entry[2])
    kept, judged = standing({kind: losses for kind, (_, losses) in finalists.items()})
    return finalists[kept][0], (f"export_rd_check {' '.join(fields + judged)} margin_se:{CHECK_MARGIN_SE:g} "
                                f"chose:{kept} check_packs:{packs} check_ms:{1000 * (time.perf_counter() - t0):.0f}")


def standing(losses: dict[str, Tensor]) -> tuple[str, list[str]]:
    """The finalist that stands, of {kind: its per-sequence losses} (the search's pick "rd" always among them), and
    the log fields: the ladder is the incumbent (absent: rd); another replaces it only if its mean loss is lower by
    more than CHECK_MARGIN_SE paired standard errors, and of those that are, the lowest mean stands."""
    incumbent = "ladder" if "ladder" in losses else "rd"
    kept, fields = incumbent, []
    for kind, challenger in losses.items():
        if kind == incumbent:
            continue
        gain, error = paired_gain(challenger, losses[incumbent])
        fields.append(f"{kind}_gain:{gain:.6f} {kind}_gain_se:{error:.6f}")
        if gain > 0 and gain > CHECK_MARGIN_SE * error and challenger.mean() < losses[kept].mean():
            kept = kind
    return kept, fields + [f"incumbent:{incumbent}"]
