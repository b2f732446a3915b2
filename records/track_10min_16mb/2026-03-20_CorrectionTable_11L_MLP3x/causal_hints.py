"""
causal_hints.py: a legal, score-first "causal hint cache" (issue 14), numpy only.

For every scored position i (input tokens[i], target y_i = tokens[i+1]) a hint h_i is read from
tables built only from text already scored: for each context order k, the token that followed the
last earlier occurrence of the same previous k tokens (tokens[i-k+1..i]), hashed into a table of
2**table_bits slots. Orders back off: the hint comes from the highest order whose context was
seen before. The model's distribution is then tilted towards the hint,

    p'(t) = p(t) * exp(beta * [t = h]) / Z,    Z = 1 + p(h) (e^beta - 1),

which sums to one over the whole vocabulary, so the tilted loss is closed form:

    -log p'(y) = -log p(y) - beta [y = h] + log(1 + p(h)(e^beta - 1)).

beta is a small function of the match (its order, how often the context was seen, how many times
running the context was followed by the hint, how many orders of the ladder agree) and of the
model's own log p(h), which the scoring pass gathers at the same time as log p(y). Every one
of those is known before y_i is: log p(h) comes from the model's distribution at i, which depends
on the prefix only, and the tables hold only tokens[0..i]. Positions with no hint get beta = 0.

Because the hints depend on the token stream and not on the model, they are all computed in one
ordered, vectorised pass over the stream BEFORE scoring: "read before write" becomes "the previous
occurrence strictly before i", which a sort by (slot, position) finds for every position at once.
The tables here are never materialised: sorting simulates a direct-mapped table of 2**table_bits
slots (last writer wins, no tag check, so colliding contexts share a slot exactly as they would in
a real fixed-size table), with a saturating counter of writes per slot. Every rank of a distributed
evaluation computes the same hints from the whole validation stream, so 1 and N ranks agree.

Knobs (orders, table size, beta's coefficients) are fitted by `search_knobs` on a held-out slice of
TRAINING text given the model's log-probabilities there; it is handed arrays only and reads no
file. `encode_knobs` packs them in a few tens of bytes for the artifact; `decode_knobs` refuses
anything malformed with a one-line ValueError that names the field and the fix.

Cost (measured on this machine, one core, numpy 2.4, no AVX-512): see HINT_COST_NOTE below.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from correction_table import boosted_losses

HINT_COST_NOTE = (
    "compute_hints: about 0.14 CPU-seconds per million tokens per order (one core, numpy 2.4, AVX2: one "
    "64-bit sort of N keys per order plus a few gathers and scatters); 7 orders ~1 CPU-second per million "
    "tokens, ~60 s for the 62M-token FineWeb validation stream on one core, less with workers > 1 (orders "
    "run in parallel). Peak memory ~90 bytes per token with one worker, ~35 more per further worker.")

DEFAULT_TABLE_BITS = 24
MIN_TABLE_BITS, MAX_TABLE_BITS = 8, 32
MAX_ORDER = 64
MAX_ORDERS = 16
LOGIT_CLIP = 15.0        # the model's logit of p(h) enters beta clipped to +-15
LOGP_FLOOR = -30.0       # log p(h) below this is treated as this (p ~ 1e-13)
COEF_LIMIT = 64.0        # a decoded coefficient beyond this is refused as corrupt

# Backoff ladders the search tries (each a set of orders, hint from the highest order that has
# one). Long orders pay on repetitive text; the search decides on training text.
DEFAULT_LADDERS: tuple[tuple[int, ...], ...] = (
    (4,),
    (1, 2, 3, 4),
    (1, 2, 3, 4, 6),
    (1, 2, 3, 4, 5, 6, 8),
    (2, 3, 4, 5, 6, 8),
    (1, 2, 3, 4, 6, 8, 12),
    (1, 2, 3, 4, 5, 6, 8, 12, 16),
    (1, 2, 3, 4, 6, 8, 12, 16, 24),
    (1, 2, 3, 4, 6, 8, 16, 32),
    (1, 2, 3, 4, 6, 8, 12, 16, 24, 32),
)

_M64 = (1 << 64) - 1
_HASH_BASE = 0x9E3779B97F4A7C15            # odd, so invertible modulo 2**64
_HASH_BASE_INV = pow(_HASH_BASE, -1, 1 << 64)
_ORDER_SALT = 0xD6E8FEB86659FD93
_PAIR_SALT = 0xA0761D6478BD642F


# ----- hashing ----------------------------------------------------------------------------------

def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise on uint64 (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


class _PrefixHash:
    """Polynomial hashes of every window of the inputs, any order, in O(1) passes each.

    P[i] = sum_{j<=i} (x_j + 1) B^j mod 2**64, so the window x[i-k+1..i] hashes to
    (P[i] - P[i-k]) * B^-(i-k+1) = sum_t (x_{i-k+1+t} + 1) B^t, identical wherever the window
    occurs. B is odd, hence invertible modulo 2**64. Only tokens[0..N-1] (the inputs) enter.
    """

    def __init__(self, inputs: np.ndarray):
        n = inputs.size
        with np.errstate(over="ignore"):
            powers = np.empty(n, dtype=np.uint64)
            inv_powers = np.empty(n, dtype=np.uint64)
            if n:
                powers[0] = inv_powers[0] = 1
                powers[1:] = _HASH_BASE
                inv_powers[1:] = _HASH_BASE_INV
                np.cumprod(powers, out=powers)
                np.cumprod(inv_powers, out=inv_powers)
            self.prefix = np.cumsum((inputs.astype(np.uint64) + np.uint64(1)) * powers, dtype=np.uint64)
        self.inv_powers = inv_powers
        self.n = n

    def window_keys(self, order: int) -> np.ndarray:
        """64-bit keys of the windows ending at positions order-1 .. n-1 (in that order)."""
        with np.errstate(over="ignore"):
            end = self.prefix[order - 1:]
            before = np.concatenate((np.zeros(1, np.uint64), self.prefix[:self.n - order]))
            raw = (end - before) * self.inv_powers[:self.n - order + 1]
            return _mix64(raw ^ np.uint64((order * _ORDER_SALT) & _M64))


# ----- one order's table, for every position at once --------------------------------------------

@dataclass
class OrderTable:
    """What a read of one order's tables returns at each position (-1 / 0 where nothing is known).

    hint:   the token that followed the last earlier occurrence of this slot's context
    seen:   how many earlier positions wrote to this slot (the context's count, collisions included)
    streak: how many times running, up to that last occurrence, the slot was followed by the hint
    (A hashed (slot, next token) pair counter was tried as a further feature: it added nothing once
    seen, streak and agree were in, and cost a second sort per order, so it went.)
    """
    hint: np.ndarray
    seen: np.ndarray
    streak: np.ndarray


def _group_sorted(slots: np.ndarray, positions: np.ndarray, table_bits: int):
    """positions sorted by (slot, position): (sorted positions, start-of-new-slot mask)."""
    pos_bits = max(int(positions[-1]).bit_length(), 1) if positions.size else 1
    if table_bits + pos_bits > 64:
        raise ValueError(f"table_bits={table_bits} with a stream of {positions[-1] + 1} positions does not "
                         f"fit a 64-bit sort key; lower table_bits to {64 - pos_bits} or less")
    shift = np.uint64(pos_bits)
    keys = np.sort((slots << shift) | positions.astype(np.uint64))
    sorted_pos = (keys & np.uint64((1 << pos_bits) - 1)).astype(np.int64)
    sorted_slots = keys >> shift
    del keys
    new_group = np.empty(sorted_pos.size, dtype=bool)
    if sorted_pos.size:
        new_group[0] = True
        np.not_equal(sorted_slots[1:], sorted_slots[:-1], out=new_group[1:])
    return sorted_pos, new_group


def _rank_in_run(breaks: np.ndarray) -> np.ndarray:
    """For a boolean start-of-run mask: 0-based index of each element within its run."""
    idx = np.arange(breaks.size, dtype=np.int64)
    return idx - np.maximum.accumulate(np.where(breaks, idx, 0))


# Packed per-position read result: hint + 1 (17 bits, vocabularies up to 65536 tokens), seen (a
# saturating 23-bit counter), streak (a saturating 24-bit counter).
_HINT_BITS, _SEEN_BITS, _STREAK_BITS = 17, 23, 24
MAX_VOCAB = (1 << _HINT_BITS) - 1


def order_table(hasher: _PrefixHash, targets: np.ndarray, order: int, table_bits: int) -> OrderTable:
    """Read-before-write hints of one order for every position, strictly causal.

    Position i's context is inputs[i-order+1..i]; its hint is targets[j] = tokens[j+1] for the
    largest j < i in the same slot, so it uses tokens[0..i] only. Positions before order-1 have no
    full context and get no hint. Everything is computed in (slot, position) order, where "the
    previous write to this slot" is the previous element, then scattered back in one pass.
    """
    n = targets.size
    if n < order:
        z = np.zeros(n, dtype=np.int32)
        return OrderTable(np.full(n, -1, dtype=np.int32), z, z.copy())
    slots = hasher.window_keys(order) >> np.uint64(64 - table_bits)   # positions order-1 .. n-1
    sorted_pos, new_group = _group_sorted(slots, np.arange(order - 1, n, dtype=np.int64), table_bits)
    del slots
    next_tok = targets[sorted_pos]
    run_break = new_group.copy()
    run_break[1:] |= next_tok[1:] != next_tok[:-1]
    streak = _rank_in_run(run_break) + 1            # the run of equal next tokens ending at each write
    del run_break
    seen = _rank_in_run(new_group)                  # earlier writes to this slot
    # element s reads what element s-1 wrote, when both are in the same slot
    packed = np.minimum(streak[:-1], (1 << _STREAK_BITS) - 1).astype(np.uint64)
    del streak
    packed <<= np.uint64(_SEEN_BITS)
    packed |= np.minimum(seen[1:], (1 << _SEEN_BITS) - 1).astype(np.uint64)
    del seen
    packed <<= np.uint64(_HINT_BITS)
    packed |= (next_tok[:-1] + 1).astype(np.uint64)
    del next_tok
    packed[new_group[1:]] = 0
    out = np.zeros(n, dtype=np.uint64)
    out[sorted_pos[1:]] = packed
    del packed, sorted_pos, new_group
    hint = (out & np.uint64((1 << _HINT_BITS) - 1)).astype(np.int32) - 1
    out >>= np.uint64(_HINT_BITS)
    seen = (out & np.uint64((1 << _SEEN_BITS) - 1)).astype(np.int32)
    out >>= np.uint64(_SEEN_BITS)
    return OrderTable(hint, seen, out.astype(np.int32))


# ----- hints over a ladder of orders ------------------------------------------------------------

@dataclass
class Hints:
    """One hint per position (or -1) and the features of the match it came from."""
    hint: np.ndarray         # int32 (N,), -1: none
    order_index: np.ndarray  # int8 (N,): index into the ladder's orders of the order used, -1: none
    seen: np.ndarray         # int32 (N,)
    streak: np.ndarray       # int32 (N,)
    agree: np.ndarray        # int8 (N,): how many orders of the ladder give this same hint
    orders: tuple[int, ...] = ()

    @property
    def has_hint(self) -> np.ndarray:
        return self.hint >= 0


def _check_stream(tokens) -> np.ndarray:
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or tokens.size < 2:
        raise ValueError(f"tokens: expected a 1-D stream of at least 2 token ids, got shape {tokens.shape}; "
                         "pass the scored stream (inputs and targets, N + 1 tokens)")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens: expected integer token ids, got dtype {tokens.dtype}; pass token ids")
    if int(tokens.min()) < 0 or int(tokens.max()) >= MAX_VOCAB:
        raise ValueError(f"tokens: ids must lie in [0, {MAX_VOCAB}); pass the token ids of a vocabulary of at "
                         f"most {MAX_VOCAB} tokens")
    return tokens.astype(np.int64, copy=False)


def check_orders(orders: Sequence[int], table_bits: int, where: str = "orders") -> tuple[int, ...]:
    orders = tuple(int(k) for k in orders)
    if not orders or len(orders) > MAX_ORDERS:
        raise ValueError(f"{where}: {len(orders)} orders; give 1 to {MAX_ORDERS}")
    if any(not 1 <= k <= MAX_ORDER for k in orders) or list(orders) != sorted(set(orders)):
        raise ValueError(f"{where}={orders}: orders must be strictly increasing integers in 1..{MAX_ORDER}; "
                         "e.g. (1, 2, 3, 4, 6, 8)")
    if not MIN_TABLE_BITS <= int(table_bits) <= MAX_TABLE_BITS:
        raise ValueError(f"table_bits={table_bits}: must lie in {MIN_TABLE_BITS}..{MAX_TABLE_BITS}; "
                         f"use e.g. {DEFAULT_TABLE_BITS}")
    return orders


def _combine(tables: dict[int, OrderTable], orders: tuple[int, ...], n: int) -> Hints:
    """Backoff: the hint of the highest order that has one; agreement counted over all orders."""
    hint = np.full(n, -1, dtype=np.int32)
    order_index = np.full(n, -1, dtype=np.int8)
    seen = np.zeros(n, dtype=np.int32)
    streak = np.zeros(n, dtype=np.int32)
    agree = np.zeros(n, dtype=np.int8)
    for idx in range(len(orders) - 1, -1, -1):   # highest first: the first hint found is kept
        t = tables[orders[idx]]
        _merge_order(t, idx, hint, order_index, seen, streak, agree)
    return Hints(hint, order_index, seen, streak, agree, orders)


def _merge_order(t: OrderTable, idx, hint, order_index, seen, streak, agree) -> None:
    """Fold one order (visited from the highest down) into the running backoff arrays in place."""
    fresh = (hint < 0) & (t.hint >= 0)
    agree += ((t.hint == hint) & (hint >= 0)).astype(np.int8)   # a lower order agreeing with the kept hint
    hint[fresh] = t.hint[fresh]
    order_index[fresh] = idx
    seen[fresh] = t.seen[fresh]
    streak[fresh] = t.streak[fresh]
    agree[fresh] = 1


def compute_hints(tokens, orders: Sequence[int], table_bits: int = DEFAULT_TABLE_BITS, workers: int = 1) -> Hints:
    """Hints for every position of a scored stream, in validation order, strictly causal.

    tokens: the stream as scored, N + 1 ids (inputs tokens[:-1], targets tokens[1:]). Returns
    arrays of length N; position i's hint and features use tokens[0..i] only (the last token is
    only ever written, never read). Orders are independent: with workers > 1 that many are computed
    at once on threads (numpy's sorts and ufuncs release the GIL), each adding ~60 bytes a token to
    the peak memory; they are folded in highest first, so the result does not depend on workers.
    """
    tokens = _check_stream(tokens)
    orders = check_orders(orders, table_bits)
    n = tokens.size - 1
    hasher = _PrefixHash(tokens[:-1])
    targets = tokens[1:]
    hint = np.full(n, -1, dtype=np.int32)
    order_index = np.full(n, -1, dtype=np.int8)
    seen = np.zeros(n, dtype=np.int32)
    streak = np.zeros(n, dtype=np.int32)
    agree = np.zeros(n, dtype=np.int8)
    descending = list(range(len(orders) - 1, -1, -1))

    def table(idx):
        return order_table(hasher, targets, orders[idx], table_bits)

    if workers <= 1:
        tables = map(table, descending)
    else:
        from concurrent.futures import ThreadPoolExecutor
        pool = ThreadPoolExecutor(max_workers=int(workers), thread_name_prefix="causal-hints")
        tables = pool.map(table, descending)  # results come back in submission order
    try:
        for idx, t in zip(descending, tables):
            _merge_order(t, idx, hint, order_index, seen, streak, agree)
            del t
    finally:
        if workers > 1:
            pool.shutdown()
    return Hints(hint, order_index, seen, streak, agree, orders)


# ----- knobs: beta as a function of the match ---------------------------------------------------

COEF_NAMES = ("bias", "logit_coef", "seen_coef", "streak_coef", "agree_coef")


@dataclass(frozen=True)
class HintKnobs:
    """For a hint from order index o (into orders):

        beta = bias[o] + logit_coef[o] * clip(logit p(h), +-15) + seen_coef[o] * log1p(seen)
               + streak_coef[o] * log1p(streak) + agree_coef[o] * agree

    i.e. the tilted p'(h) = sigmoid(logit p(h) + beta) is a logistic regression, per order, on the
    match's features with the model's own logit of p(h) as offset. search_knobs fits it to minimise
    the tilted loss on held-out training text. (Coefficients shared across orders for seen, streak
    and agree were tried first: per order they gained a further ~0.01 BPB on the demo, for 3 x 2
    bytes an order.)"""
    orders: tuple[int, ...]
    table_bits: int
    bias: tuple[float, ...]
    logit_coef: tuple[float, ...] = ()
    seen_coef: tuple[float, ...] = ()
    streak_coef: tuple[float, ...] = ()
    agree_coef: tuple[float, ...] = ()

    def __post_init__(self):
        check_orders(self.orders, self.table_bits, "HintKnobs.orders")
        n = len(self.orders)
        for name in COEF_NAMES:
            value = tuple(float(v) for v in getattr(self, name)) or (0.0,) * n
            if len(value) != n:
                raise ValueError(f"HintKnobs.{name}: {len(value)} values for {n} orders; give one per order")
            object.__setattr__(self, name, value)

    @classmethod
    def fixed_beta(cls, orders: Sequence[int], beta: float, table_bits: int = DEFAULT_TABLE_BITS) -> "HintKnobs":
        """The naive rule: the same beta wherever there is a hint."""
        orders = tuple(orders)
        return cls(orders, table_bits, (float(beta),) * len(orders))

    def vector(self) -> np.ndarray:
        """All coefficients, name by name (COEF_NAMES), each one per order."""
        return np.array([v for name in COEF_NAMES for v in getattr(self, name)], dtype=np.float64)

    @classmethod
    def from_vector(cls, orders, table_bits, w) -> "HintKnobs":
        n = len(orders)
        w = [float(v) for v in w]
        if len(w) != len(COEF_NAMES) * n:
            raise ValueError(f"HintKnobs: {len(w)} coefficients for {n} orders; give {len(COEF_NAMES) * n}")
        return cls(tuple(orders), int(table_bits), *(tuple(w[i * n:(i + 1) * n]) for i in range(len(COEF_NAMES))))


def _clipped_logit(hint_logprobs: np.ndarray) -> np.ndarray:
    lp = np.clip(np.asarray(hint_logprobs, dtype=np.float64), LOGP_FLOOR, -1e-12)
    return np.clip(lp - np.log(-np.expm1(lp)), -LOGIT_CLIP, LOGIT_CLIP)


def _features(hints: Hints, hint_logprobs: np.ndarray, mask) -> list[np.ndarray]:
    """The per-position features that COEF_NAMES multiply, in that order (1 for the bias)."""
    return [np.ones(int(np.count_nonzero(mask)) if mask is not None else hints.hint.size),
            _clipped_logit(hint_logprobs if mask is None else hint_logprobs[mask]),
            np.log1p((hints.seen if mask is None else hints.seen[mask]).astype(np.float64)),
            np.log1p((hints.streak if mask is None else hints.streak[mask]).astype(np.float64)),
            (hints.agree if mask is None else hints.agree[mask]).astype(np.float64)]


def _design(hints: Hints, hint_logprobs: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Feature rows (one per masked position) whose dot product with HintKnobs.vector() is beta."""
    o = hints.order_index[mask].astype(np.int64)
    m, n_orders = o.size, len(hints.orders)
    onehot = np.zeros((m, n_orders))
    onehot[np.arange(m), o] = 1.0
    return np.concatenate([onehot * f[:, None] for f in _features(hints, hint_logprobs, mask)], axis=1)


def hint_betas(hints: Hints, hint_logprobs, knobs: HintKnobs) -> np.ndarray:
    """beta at every position (0 where there is no hint). hint_logprobs: the model's log p(hint).
    The same numbers as _design(...) @ knobs.vector(), without building the design matrix."""
    if tuple(hints.orders) != tuple(knobs.orders):
        raise ValueError(f"hints were computed for orders {hints.orders} but the knobs are for {knobs.orders}; "
                         "compute the hints with knobs.orders")
    hint_logprobs = np.asarray(hint_logprobs, dtype=np.float64)
    o = np.maximum(hints.order_index, 0).astype(np.intp)
    beta = np.zeros(hints.hint.size, dtype=np.float64)
    for name, feature in zip(COEF_NAMES, _features(hints, hint_logprobs, None)):
        beta += np.asarray(getattr(knobs, name), dtype=np.float64)[o] * feature
    beta[~hints.has_hint] = 0.0
    return beta


def tilted_position_losses(position_losses, hint_logprobs, hints: Hints, targets, knobs: HintKnobs) -> np.ndarray:
    """The whole eval-time step: per-position losses (-log p(y), from evaluate(keep_positions=True))
    and log p(hint) (evaluate(token_of_interest=hints.hint)) to the tilted losses, in nats."""
    targets = np.asarray(targets)
    beta = hint_betas(hints, hint_logprobs, knobs)
    right = hints.has_hint & (hints.hint == targets)
    return boosted_losses(position_losses, hint_logprobs, right, beta)


# ----- knob search on training text -------------------------------------------------------------

@dataclass
class SearchResult:
    knobs: HintKnobs
    base_nats: float           # sum of -log p(y) over the training slice
    tilted_nats: float         # the same with the chosen (stored, float16-rounded) knobs
    hint_rate: float           # share of positions with a hint
    hint_accuracy: float       # share of hinted positions whose hint is the target
    ladders: list = field(default_factory=list)   # (orders, held-out nats, in-sample nats) per ladder tried
    note: str = ""


def _fit_logistic(x: np.ndarray, right: np.ndarray, offset: np.ndarray, l2: float, iters: int = 60) -> np.ndarray:
    """Newton's method with backtracking for the weights w minimising mean BCE(sigmoid(offset + x w), right)
    + l2/2 |w|^2. With p'(h) = sigmoid(logit p(h) + beta) the tilted loss is exactly this BCE plus a
    term that does not depend on beta, so this minimises the tilted loss."""
    n = max(right.size, 1)
    z = right.astype(np.float64)

    def objective(w):
        a = offset + x @ w
        return float((np.logaddexp(0.0, a) - z * a).sum() / n + 0.5 * l2 * (w @ w))

    w = np.zeros(x.shape[1])
    f = objective(w)
    for _ in range(iters):
        a = offset + x @ w
        q = 0.5 * (1.0 + np.tanh(0.5 * a))
        g = x.T @ (q - z) / n + l2 * w
        h = (x * (q * (1 - q))[:, None]).T @ x / n + l2 * np.eye(w.size)
        step = np.linalg.solve(h, g)
        t, f_new = 1.0, f
        while t > 1e-8:
            f_new = objective(w - t * step)
            if f_new <= f - 1e-4 * t * float(g @ step):
                break
            t *= 0.5
        else:
            break
        w = w - t * step
        done = f - f_new < 1e-12
        f = f_new
        if done:
            break
    return w


def _round_f16(w: np.ndarray) -> np.ndarray:
    return np.clip(w, -COEF_LIMIT, COEF_LIMIT).astype(np.float16).astype(np.float64)


def _ladder_nats(hints: Hints, lph: np.ndarray, lpy: np.ndarray, targets: np.ndarray, w: np.ndarray,
                 mask: np.ndarray) -> float:
    has = hints.has_hint & mask
    beta = np.zeros(lpy.size)
    beta[has] = _design(hints, lph, has) @ w
    right = hints.has_hint & (hints.hint == targets)
    return float(boosted_losses(-lpy, lph, right, beta)[mask].sum())


def _candidate_tables(tokens: np.ndarray, ladders, table_bits: int):
    all_orders = sorted({k for ld in ladders for k in ld})
    hasher = _PrefixHash(tokens[:-1])
    return all_orders, {k: order_table(hasher, tokens[1:], k, table_bits) for k in all_orders}


def candidate_hints(train_tokens, ladders: Sequence[Sequence[int]] = DEFAULT_LADDERS,
                    table_bits: int = DEFAULT_TABLE_BITS) -> np.ndarray:
    """The (M, N) hint matrix search_knobs will hand hint_logprobs_fn (one row per order of the ladders,
    in increasing order): for a caller that scores the slice once, gathering log p(target) and these
    tokens in the same pass, before calling search_knobs."""
    tokens = _check_stream(train_tokens)
    ladders = [check_orders(ld, table_bits, "ladders") for ld in ladders]
    all_orders, tables = _candidate_tables(tokens, ladders, table_bits)
    return np.stack([tables[k].hint.astype(np.int64) for k in all_orders])


def search_knobs(train_tokens, target_logprobs, hint_logprobs_fn: Callable[[np.ndarray], np.ndarray], *,
                 ladders: Sequence[Sequence[int]] = DEFAULT_LADDERS, table_bits: int = DEFAULT_TABLE_BITS,
                 l2: float = 1e-4) -> SearchResult:
    """Choose the knobs on a held-out slice of TRAINING text. Never touches validation data: it
    gets only these arrays and reads no file.

    train_tokens:     the training slice as scored, N + 1 ids
    target_logprobs:  (N,) the model's log p(train_tokens[i+1]) at each position
    hint_logprobs_fn: called once with an (M, N) int array of hint tokens (-1: none; one row per
                      order tried) and returning (M, N) log p of those tokens at each position
                      (anything where the hint is -1): e.g. one scoring pass gathering M tokens.

    How: every order of every ladder is hashed once; for each ladder (backoff over its orders)
    beta's coefficients are fitted by logistic regression on one half of the slice's hinted
    positions and scored on the other half, and the other way round; the ladder with the lowest
    held-out tilted loss wins and is refitted on the whole slice; its coefficients are rounded to
    float16 (as stored) before the final figure is taken. table_bits is a given: a slice of
    training text is too short to tell table sizes apart (collisions grow with the stream scored).
    """
    tokens = _check_stream(train_tokens)
    n = tokens.size - 1
    lpy = np.asarray(target_logprobs, dtype=np.float64)
    if lpy.shape != (n,):
        raise ValueError(f"target_logprobs: shape {lpy.shape}, expected ({n},) for {n + 1} tokens; "
                         "pass one log p(target) per scored position")
    ladders = [check_orders(ld, table_bits, "ladders") for ld in ladders]
    all_orders, tables = _candidate_tables(tokens, ladders, table_bits)
    targets = tokens[1:]
    matrix = np.stack([tables[k].hint.astype(np.int64) for k in all_orders])
    lp_matrix = np.asarray(hint_logprobs_fn(matrix), dtype=np.float64)
    if lp_matrix.shape != matrix.shape:
        raise ValueError(f"hint_logprobs_fn returned shape {lp_matrix.shape}, expected {matrix.shape}; "
                         "return log p of each given hint token at each position")
    row_of = {k: r for r, k in enumerate(all_orders)}
    half = np.zeros(n, dtype=bool)
    half[: n // 2] = True
    results = []
    best = None
    for ladder in ladders:
        hints = _combine(tables, ladder, n)
        has = hints.has_hint
        rows = np.array([row_of[k] for k in ladder])
        lph = np.zeros(n)
        lph[has] = lp_matrix[rows[hints.order_index[has]], np.flatnonzero(has)]
        right = has & (hints.hint == targets)
        held_out = 0.0
        for fit_mask in (half, ~half):
            m = has & fit_mask
            if not m.any():
                continue
            w = _fit_logistic(_design(hints, lph, m), right[m], _clipped_logit(lph[m]), l2)
            held_out += _ladder_nats(hints, lph, lpy, targets, _round_f16(w), ~fit_mask)
        w_all = _round_f16(_fit_logistic(_design(hints, lph, has), right[has], _clipped_logit(lph[has]), l2)) \
            if has.any() else np.zeros(len(COEF_NAMES) * len(ladder))
        in_sample = _ladder_nats(hints, lph, lpy, targets, w_all, np.ones(n, bool))
        results.append((ladder, held_out, in_sample))
        if best is None or held_out < best[1]:
            best = (ladder, held_out, in_sample, w_all, hints, right)
    ladder, _, in_sample, w, hints, right = best
    knobs = HintKnobs.from_vector(ladder, table_bits, w)
    has = hints.has_hint
    return SearchResult(knobs, float(-lpy.sum()), in_sample, float(has.mean()),
                        float(right[has].mean()) if has.any() else 0.0, results,
                        note=f"chosen by 2-fold held-out tilted loss over {len(ladders)} ladders on {n} "
                             "training positions; coefficients fitted by logistic regression, stored as float16")


# ----- serialisation -----------------------------------------------------------------------------
# Layout (little-endian): b"CH" | version u8 | table_bits u8 | n_orders u8 | orders u8 * n |
# float16 * 5n (COEF_NAMES in order, each one per order: bias, logit, seen, streak, agree) |
# crc32 of everything before it, low 16 bits, u16. 7 orders: 2+1+1+1+7+70+2 = 84 bytes.

KNOBS_MAGIC = b"CH"
KNOBS_VERSION = 1


def encode_knobs(knobs: HintKnobs) -> bytes:
    check_orders(knobs.orders, knobs.table_bits, "knobs.orders")
    w = knobs.vector()
    if not np.all(np.isfinite(w)) or np.any(np.abs(w) > COEF_LIMIT):
        raise ValueError(f"knobs: coefficients must be finite and within +-{COEF_LIMIT}; refit them")
    body = KNOBS_MAGIC + struct.pack("<BBB", KNOBS_VERSION, knobs.table_bits, len(knobs.orders))
    body += bytes(knobs.orders) + w.astype("<f2").tobytes()
    return body + struct.pack("<H", zlib.crc32(body) & 0xFFFF)


def decode_knobs(blob) -> HintKnobs:
    """The knobs stored by encode_knobs, or a one-line ValueError naming the field and the fix."""
    fix = ("choose the knobs again on training text: CHECKPOINT=<the artifact without hints> CORRECTION_MODE=causal "
           "python build_correction_table.py")
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise ValueError(f"causal hint knobs: expected bytes, got {type(blob).__name__}; {fix}")
    blob = bytes(blob)
    if len(blob) < 7:
        raise ValueError(f"causal hint knobs: {len(blob)} bytes is shorter than the 7-byte header; {fix}")
    if blob[:2] != KNOBS_MAGIC:
        raise ValueError(f"causal hint knobs: magic {blob[:2]!r} is not {KNOBS_MAGIC!r} (not a knob record); {fix}")
    version, table_bits, n_orders = struct.unpack_from("<BBB", blob, 2)
    if version != KNOBS_VERSION:
        raise ValueError(f"causal hint knobs: version {version} is not supported (expected {KNOBS_VERSION}); {fix}")
    expected = 5 + n_orders + 2 * len(COEF_NAMES) * n_orders + 2
    if len(blob) != expected:
        raise ValueError(f"causal hint knobs: {len(blob)} bytes, but n_orders={n_orders} needs {expected} "
                         f"(truncated or padded); {fix}")
    if struct.unpack_from("<H", blob, len(blob) - 2)[0] != zlib.crc32(blob[:-2]) & 0xFFFF:
        raise ValueError(f"causal hint knobs: checksum mismatch (corrupted bytes); {fix}")
    if not MIN_TABLE_BITS <= table_bits <= MAX_TABLE_BITS:
        raise ValueError(f"causal hint knobs: table_bits={table_bits} outside {MIN_TABLE_BITS}.."
                         f"{MAX_TABLE_BITS}; {fix}")
    if not 1 <= n_orders <= MAX_ORDERS:
        raise ValueError(f"causal hint knobs: n_orders={n_orders} outside 1..{MAX_ORDERS}; {fix}")
    orders = tuple(blob[5:5 + n_orders])
    if any(not 1 <= k <= MAX_ORDER for k in orders) or list(orders) != sorted(set(orders)):
        raise ValueError(f"causal hint knobs: orders={orders} are not strictly increasing in 1..{MAX_ORDER}; {fix}")
    w = np.frombuffer(blob, dtype="<f2", count=len(COEF_NAMES) * n_orders, offset=5 + n_orders).astype(np.float64)
    if not np.all(np.isfinite(w)) or np.any(np.abs(w) > COEF_LIMIT):
        raise ValueError(f"causal hint knobs: coefficients not finite or beyond +-{COEF_LIMIT}; {fix}")
    return HintKnobs.from_vector(orders, table_bits, w)


def knobs_summary(knobs: HintKnobs) -> str:
    """key:value pairs for a log line (one value per order, comma-separated)."""
    def fmt(values):
        return ",".join(f"{v:.3g}" for v in values)
    return (f"orders:{','.join(map(str, knobs.orders))} table_bits:{knobs.table_bits} "
            + " ".join(f"{name.replace('_coef', '')}:{fmt(getattr(knobs, name))}" for name in COEF_NAMES))
