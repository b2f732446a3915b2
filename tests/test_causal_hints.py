"""The causal hint cache (causal_hints.py, issue 14): causality, normalisation, codec, and a knob search
that cannot have read validation text.

The model here is a deterministic stand-in whose distribution at position i depends only on the prefix
tokens[0..i] (the current token, the one before it, and a running sum over the whole prefix), so any
dependence of a tilted loss on later tokens can only come from the hints.
"""

import inspect
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import causal_hints as ch  # noqa: E402
from correction_table import boosted_losses  # noqa: E402

V = 48
ORDERS = (1, 2, 3, 5)
BITS = 32  # no slot collisions on these short streams, so the dict reference below is exact
KNOBS = ch.HintKnobs(ORDERS, BITS, bias=(0.5, 1.0, 1.5, 2.0), logit_coef=(-0.5, -0.25, -0.5, -0.75),
                     seen_coef=(-0.25, 0.0, -0.125, -0.25), streak_coef=(0.75, 0.5, 1.0, 0.25),
                     agree_coef=(0.0, 0.5, 0.25, 0.5))


def repetitive_stream(n: int, seed: int = 0) -> np.ndarray:
    """A Markov-ish source with copied spans, so hints exist at most positions and are often right."""
    rng = np.random.default_rng(seed)
    out = [int(rng.integers(V))]
    while len(out) < n:
        if len(out) > 40 and rng.random() < 0.3:
            start = int(rng.integers(0, len(out) - 20))
            out.extend(out[start:start + int(rng.integers(5, 20))])
        else:
            out.append(int((out[-1] * 7 + rng.integers(0, 4)) % V))
    return np.array(out[:n], dtype=np.int64)


_RNG = np.random.default_rng(1)
_A, _B, _C = _RNG.normal(0, 2, (V, V)), _RNG.normal(0, 1, (V, V)), _RNG.normal(0, 1, (17, V))


def stand_in_logprobs(tokens: np.ndarray) -> np.ndarray:
    """(N, V) log p(. | tokens[0..i]) for i < N = len(tokens) - 1; prefix-only by construction."""
    x = tokens[:-1]
    before = np.concatenate(([0], x[:-1]))
    logits = _A[x] + _B[before] + _C[np.cumsum(x) % 17]
    return logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)


def reference_hints(tokens, orders, read_after_write: bool = False):
    """A plain dict per order, visited in stream order: read the table, then write the true next token.
    read_after_write=True is the deliberately leaky variant: it writes first, so position i's read
    returns (and counts) the target tokens[i+1] itself."""
    tokens = [int(t) for t in tokens]
    n = len(tokens) - 1
    per_order = []
    for k in orders:
        last, seen, streak = {}, {}, {}
        hint, f_seen, f_streak = np.full(n, -1), np.zeros(n, int), np.zeros(n, int)
        for i in range(n):
            if i < k - 1:
                continue
            key, y = tuple(tokens[i - k + 1:i + 1]), tokens[i + 1]

            def write():
                streak[key] = streak[key] + 1 if last.get(key) == y else 1
                last[key] = y
                seen[key] = seen.get(key, 0) + 1

            if read_after_write:
                write()
            if key in last:
                hint[i] = last[key]
                f_seen[i] = seen[key] - (1 if read_after_write else 0)
                f_streak[i] = streak[key]
            if not read_after_write:
                write()
        per_order.append((hint, f_seen, f_streak))
    h = ch.Hints(np.full(n, -1, np.int32), np.full(n, -1, np.int8), np.zeros(n, np.int32), np.zeros(n, np.int32),
                 np.zeros(n, np.int8), tuple(orders))
    for idx in range(len(orders) - 1, -1, -1):
        hint, f_seen, f_streak = per_order[idx]
        h.agree += ((hint == h.hint) & (h.hint >= 0)).astype(np.int8)
        fresh = (h.hint < 0) & (hint >= 0)
        h.hint[fresh], h.order_index[fresh] = hint[fresh], idx
        h.seen[fresh], h.streak[fresh], h.agree[fresh] = f_seen[fresh], f_streak[fresh], 1
    return h


def fast_hints(tokens, orders):
    return ch.compute_hints(tokens, orders, BITS)


def leaky_hints(tokens, orders):
    return reference_hints(tokens, orders, read_after_write=True)


def tilted_log_distribution(tokens, hints_fn, knobs=KNOBS) -> np.ndarray:
    """(N, V): at every position the tilted loss the pipeline gives each candidate target t, as
    -log p'(t), via the closed form with the hints computed on this stream."""
    logp = stand_in_logprobs(tokens)
    n = logp.shape[0]
    hints = hints_fn(tokens, knobs.orders)
    lph = logp[np.arange(n), np.maximum(hints.hint, 0)]
    beta = ch.hint_betas(hints, lph, knobs)
    cols = [boosted_losses(-logp[:, t], lph, hints.has_hint & (hints.hint == t), beta) for t in range(V)]
    return -np.stack(cols, axis=1)


def tilted_target_losses(tokens, hints_fn, knobs=KNOBS) -> np.ndarray:
    logp = stand_in_logprobs(tokens)
    n = logp.shape[0]
    hints = hints_fn(tokens, knobs.orders)
    lph = logp[np.arange(n), np.maximum(hints.hint, 0)]
    return ch.tilted_position_losses(-logp[np.arange(n), tokens[1:]], lph, hints, tokens[1:], knobs)


STREAM = repetitive_stream(3001)


# ----- the vectorised cache is the dict cache -------------------------------------------------------

def test_vectorised_hints_equal_the_dict_reference():
    fast, ref = fast_hints(STREAM, ORDERS), reference_hints(STREAM, ORDERS)
    assert 0.5 < fast.has_hint.mean() and 0.3 < (fast.hint == STREAM[1:])[fast.has_hint].mean()
    for name in ("hint", "order_index", "seen", "streak", "agree"):
        np.testing.assert_array_equal(getattr(fast, name), getattr(ref, name), err_msg=name)


def test_hints_of_a_prefix_are_the_prefix_of_the_hints():
    full = fast_hints(STREAM, ORDERS)
    for cut in (3, 700, 2999):
        part = fast_hints(STREAM[:cut + 1], ORDERS)
        for name in ("hint", "order_index", "seen", "streak", "agree"):
            np.testing.assert_array_equal(getattr(part, name), getattr(full, name)[:cut], err_msg=f"{name} {cut}")


def test_threads_give_the_same_hints():
    one, two = ch.compute_hints(STREAM, ORDERS, BITS), ch.compute_hints(STREAM, ORDERS, BITS, workers=3)
    for name in ("hint", "order_index", "seen", "streak", "agree"):
        np.testing.assert_array_equal(getattr(one, name), getattr(two, name), err_msg=name)


def test_betas_are_the_fitted_linear_form():
    """hint_betas (used at evaluation) computes what the search fitted: design rows times the knobs."""
    logp = stand_in_logprobs(STREAM)
    n = logp.shape[0]
    hints = fast_hints(STREAM, ORDERS)
    lph = logp[np.arange(n), np.maximum(hints.hint, 0)]
    beta = ch.hint_betas(hints, lph, KNOBS)
    has = hints.has_hint
    np.testing.assert_allclose(beta[has], ch._design(hints, lph, has) @ KNOBS.vector(), rtol=0, atol=1e-12)
    assert np.all(beta[~has] == 0) and np.ptp(beta[has]) > 1


def test_a_small_table_collides_like_a_direct_mapped_table():
    """With 2**8 slots, contexts share slots: the hint is whatever the slot's last writer wrote."""
    small = ch.compute_hints(STREAM, (3,), 8)
    hasher = ch._PrefixHash(STREAM[:-1])
    slots = hasher.window_keys(3) >> np.uint64(64 - 8)
    table, expect = {}, np.full(STREAM.size - 1, -1)
    for i, slot in enumerate(slots.tolist(), start=2):
        expect[i] = table.get(slot, -1)
        table[slot] = int(STREAM[i + 1])
    np.testing.assert_array_equal(small.hint, expect)


# ----- (a) causality ----------------------------------------------------------------------------------

@pytest.mark.parametrize("p", [6, 1500, 2995])
def test_changing_a_token_leaves_every_earlier_position_unchanged(p):
    """Change tokens[p]. Positions i < p predict from tokens[0..i], which excludes index p, so the tilted
    loss each of them gives every candidate target (its whole tilted distribution) must not move; the
    losses of positions i < p - 1, whose targets are unchanged too, must not move either."""
    changed = STREAM.copy()
    changed[p] = (changed[p] + 11) % V
    before, after = tilted_log_distribution(STREAM, fast_hints), tilted_log_distribution(changed, fast_hints)
    np.testing.assert_allclose(after[:p], before[:p], rtol=0, atol=1e-9)
    assert np.abs(after[p:] - before[p:]).max() > 1e-3  # the change is visible later: the check can see
    loss_before, loss_after = tilted_target_losses(STREAM, fast_hints), tilted_target_losses(changed, fast_hints)
    np.testing.assert_allclose(loss_after[:p - 1], loss_before[:p - 1], rtol=0, atol=1e-9)


@pytest.mark.parametrize("p", [6, 1500, 2995])
def test_the_leaky_variant_fails_the_same_check(p):
    """Reading the table after writing the true target makes position p-1's distribution depend on tokens[p]."""
    changed = STREAM.copy()
    changed[p] = (changed[p] + 11) % V
    before, after = tilted_log_distribution(STREAM, leaky_hints), tilted_log_distribution(changed, leaky_hints)
    assert np.abs(after[:p] - before[:p]).max() > 1e-3


@pytest.mark.parametrize("hints_fn,leaky", [(fast_hints, False), (leaky_hints, True)])
def test_counterfactual_targets_sum_to_one(hints_fn, leaky):
    """Black-box: at position i, rerun the whole pipeline with each possible target t in place of
    tokens[i+1] and take the loss at i. A causal scorer's exp(-loss) over t is one distribution (sums to
    1); the leaky one hands every candidate the boost and sums to more."""
    rng = np.random.default_rng(2)
    positions = [10, 2999] + rng.choice(np.arange(20, 2990), size=4, replace=False).tolist()
    for i in positions:
        losses = []
        for t in range(V):
            stream = STREAM.copy()
            stream[i + 1] = t
            losses.append(tilted_target_losses(stream, hints_fn)[i])
        total = float(np.exp(-np.array(losses)).sum())
        if leaky:
            if total > 1.01:
                return  # caught
        else:
            assert abs(total - 1.0) < 1e-9, (i, total)
    assert not leaky, "the leaky variant was never caught"


# ----- (b) normalisation --------------------------------------------------------------------------------

def test_tilted_distribution_is_normalised_and_matches_the_closed_form():
    logp = stand_in_logprobs(STREAM)
    n = logp.shape[0]
    hints = fast_hints(STREAM, ORDERS)
    lph = logp[np.arange(n), np.maximum(hints.hint, 0)]
    beta = ch.hint_betas(hints, lph, KNOBS)
    closed = ch.tilted_position_losses(-logp[np.arange(n), STREAM[1:]], lph, hints, STREAM[1:], KNOBS)
    rng = np.random.default_rng(3)
    sample = rng.choice(n, size=300, replace=False)
    assert hints.has_hint[sample].sum() > 200 and (~hints.has_hint[sample]).sum() > 0
    for i in sample:
        tilt = np.zeros(V)
        if hints.hint[i] >= 0:
            tilt[hints.hint[i]] = beta[i]
        p = np.exp(logp[i] + tilt)
        p /= p.sum()  # explicit: the whole vocabulary, renormalised by summation
        assert abs(np.exp(logp[i] + tilt).sum() / (1 + np.exp(lph[i]) * np.expm1(beta[i])) - 1) < 1e-9
        assert abs(p.sum() - 1) < 1e-6
        assert abs(-np.log(p[STREAM[i + 1]]) - closed[i]) < 1e-9
    # the closed form, read as a function of the candidate target, sums to one everywhere
    dist = tilted_log_distribution(STREAM, fast_hints)
    np.testing.assert_allclose(np.exp(dist).sum(axis=1), 1.0, rtol=0, atol=1e-6)


@pytest.mark.parametrize("beta", [-30.0, -3.0, 0.0, 1e-8, 2.0, 40.0])
@pytest.mark.parametrize("p_hint", [1e-12, 1e-3, 0.5, 1 - 1e-9])
def test_closed_form_holds_at_the_extremes(beta, p_hint):
    logp = np.log(np.array([p_hint, 1 - p_hint - 1e-13, 1e-13]))
    tilted = logp + np.array([beta, 0, 0])
    expect = -(tilted - np.logaddexp.reduce(tilted))
    for y in range(3):
        got = boosted_losses(-np.array([logp[y]]), np.array([logp[0]]), np.array([y == 0]), np.array([beta]))[0]
        assert np.isfinite(got) and abs(got - expect[y]) < 1e-7 * max(1, abs(expect[y])), (y, got, expect[y])


def test_no_hint_means_the_plain_loss():
    lpy = np.array([-1.0, -2.0])
    out = boosted_losses(-lpy, np.array([np.nan, 0.0]), np.array([False, False]), np.array([0.0, 0.0]))
    np.testing.assert_array_equal(out, -lpy)


# ----- (c) knob serialisation -----------------------------------------------------------------------------

def test_knobs_round_trip_in_a_few_bytes():
    blob = ch.encode_knobs(KNOBS)
    assert len(blob) == 5 + 4 + 2 * 5 * 4 + 2
    assert ch.decode_knobs(blob) == KNOBS  # the values above are exact in float16
    odd = ch.HintKnobs((2, 7), 20, bias=(0.1, 1 / 3), logit_coef=(-0.7, 0.0), seen_coef=(1e-3, -2.5))
    back = ch.decode_knobs(ch.encode_knobs(odd))
    np.testing.assert_allclose(back.vector(), odd.vector(), rtol=1e-3, atol=1e-6)
    assert back.orders == (2, 7) and back.table_bits == 20


def _with_crc(body: bytes) -> bytes:
    import struct
    import zlib
    return body + struct.pack("<H", zlib.crc32(body) & 0xFFFF)


@pytest.mark.parametrize("mangle,field", [
    (lambda b: b"", "shorter"),
    (lambda b: b[:-1], "truncated"),
    (lambda b: b + b"\0", "truncated or padded"),
    (lambda b: b"XX" + b[2:], "magic"),
    (lambda b: b[:-3] + bytes([b[-3] ^ 1]) + b[-2:], "checksum"),
    (lambda b: _with_crc(b[:2] + bytes([9]) + b[3:-2]), "version"),
    (lambda b: _with_crc(b[:3] + bytes([60]) + b[4:-2]), "table_bits"),
    (lambda b: _with_crc(b[:5] + bytes([3, 2]) + b[7:-2]), "orders"),
    (lambda b: _with_crc(b[:5] + bytes([0]) + b[6:-2]), "orders"),
    (lambda b: _with_crc(b[:9] + np.array([np.nan], "<f2").tobytes() + b[11:-2]), "coefficients"),
    (lambda b: _with_crc(b[:9] + np.array([1000.0], "<f2").tobytes() + b[11:-2]), "coefficients"),
    (lambda b: bytes(np.random.default_rng(5).integers(0, 256, 200, dtype=np.uint8)), "magic"),
    (lambda b: "CH not bytes", "expected bytes"),
])
def test_decoder_refuses_garbage_with_one_line(mangle, field):
    with pytest.raises(ValueError) as err:
        ch.decode_knobs(mangle(ch.encode_knobs(KNOBS)))
    message = str(err.value)
    assert field in message and "build_correction_table.py" in message and "\n" not in message, message


def test_knobs_refuse_bad_values_when_made():
    with pytest.raises(ValueError, match="strictly increasing"):
        ch.HintKnobs((3, 2), 20, (0, 0), (0, 0))
    with pytest.raises(ValueError, match="table_bits"):
        ch.HintKnobs((2,), 40, (0,), (0,))
    with pytest.raises(ValueError, match="one per order"):
        ch.HintKnobs((2, 3), 20, (0,), (0, 0))
    with pytest.raises(ValueError, match="knobs are for"):
        ch.hint_betas(fast_hints(STREAM, (1, 2)), np.zeros(STREAM.size - 1), KNOBS)


# ----- (d) the knob search never reads validation tokens --------------------------------------------------

def test_search_module_reads_no_files():
    """By design: search_knobs takes arrays and a callable only, and the module has no file access at all."""
    params = list(inspect.signature(ch.search_knobs).parameters)
    assert params[:3] == ["train_tokens", "target_logprobs", "hint_logprobs_fn"]
    assert not any(word in p for p in params for word in ("path", "file", "val", "data"))
    source = (REPO / "causal_hints.py").read_text()
    for banned in ("open(", "np.load", "memmap", "fromfile", "import os", "pathlib", "import torch",
                   "import train_gpt", "import build_correction_table"):
        assert banned not in source, banned


def test_search_runs_with_the_validation_shard_unreadable(tmp_path):
    """The search runs on training tokens read from a data folder whose validation shard cannot be
    read by anyone (it is a directory where the file should be, and mode 000): an audit hook records
    every file the process opens while the search runs, and there are none."""
    import train_gpt

    data = tmp_path / "data"
    train_gpt.write_data_shard(data / "fineweb_train_000000.bin", repetitive_stream(6001, seed=7))
    val = data / "fineweb_val_000000.bin"
    val.mkdir()
    (val / "tokens").write_bytes(b"\0" * 64)
    os.chmod(val, 0)
    try:
        with pytest.raises(OSError):
            open(val, "rb")  # unreadable, root included
        tokens = np.asarray(train_gpt.load_data_shard(data / "fineweb_train_000000.bin", V)).astype(np.int64)
        held_out = tokens[-4001:]
        logp = stand_in_logprobs(held_out)
        n = held_out.size - 1
        calls = []

        def hint_logprobs_fn(hints):
            calls.append(hints.shape)
            return logp[np.arange(n)[None, :], np.maximum(hints, 0)]

        events = []
        recording = [True]

        def hook(event, args):
            if recording[0] and event in ("open", "os.listdir", "os.scandir", "glob.glob", "shutil.copyfile"):
                events.append((event, args[:1]))

        sys.addaudithook(hook)
        try:
            result = ch.search_knobs(held_out, logp[np.arange(n), held_out[1:]], hint_logprobs_fn,
                                     ladders=((2,), (1, 2, 3), (1, 2, 3, 5)), table_bits=20)
        finally:
            recording[0] = False
        assert events == [], events
        assert len(calls) == 1 and calls[0] == (4, n)  # one gathering pass, one row per order tried
        assert result.tilted_nats < result.base_nats - 0.05 * n  # the tilt pays on this repetitive text
        assert ch.decode_knobs(ch.encode_knobs(result.knobs)) == result.knobs
        assert result.knobs.orders in ((2,), (1, 2, 3), (1, 2, 3, 5))
    finally:
        os.chmod(val, 0o755)


def test_search_result_beats_a_fixed_beta_on_unseen_text():
    """Knobs fitted on one stream from the source do better than naive k=4, beta=3 on another."""
    train, test = repetitive_stream(8001, seed=11), repetitive_stream(8001, seed=12)
    lp_train, lp_test = stand_in_logprobs(train), stand_in_logprobs(test)
    n = train.size - 1
    result = ch.search_knobs(train, lp_train[np.arange(n), train[1:]],
                             lambda h: lp_train[np.arange(n)[None, :], np.maximum(h, 0)], table_bits=20)

    def score(knobs):
        hints = ch.compute_hints(test, knobs.orders, knobs.table_bits)
        lph = lp_test[np.arange(n), np.maximum(hints.hint, 0)]
        return ch.tilted_position_losses(-lp_test[np.arange(n), test[1:]], lph, hints, test[1:], knobs).sum()

    base = -lp_test[np.arange(n), test[1:]].sum()
    assert score(result.knobs) < score(ch.HintKnobs.fixed_beta((4,), 3.0, 20)) < base


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_exports_reserve_holds_what_the_largest_knobs_add_to_the_file(seed):
    """train_gpt's export keeps room for the knobs the builder adds later, which re-compresses the whole
    artifact with one more entry: what that adds to the file, not only the blob, must fit the reserve."""
    import dataclasses

    import train_gpt
    from test_model_and_quant import tiny_config, trained_like_state

    knobs = ch.encode_knobs(ch.HintKnobs.from_vector(
        tuple(range(1, ch.MAX_ORDERS + 1)), 24, np.random.default_rng(seed).normal(0, 2, 5 * ch.MAX_ORDERS)))
    cfg = tiny_config(num_layers=2)
    blob = train_gpt.pack_artifact(trained_like_state(cfg, seed), {"model_config": dataclasses.asdict(cfg)},
                                   zstd_level=22)
    header, body = train_gpt.artifact_parts(blob, "<memory>")
    with_knobs = train_gpt.assemble_artifact(header, body, {"causal_hint_knobs": knobs}, 22)
    assert len(knobs) == 183 and len(with_knobs) - len(blob) <= train_gpt.HINT_KNOBS_RESERVE_BYTES
