"""The rate-distortion export (allocation.py, EXPORT_ALLOCATION=rd): the std grid shared by QAT and the export,
GPTQ on it, the version 4 artifact (one stream per group) and its damage, the knapsack search, the export
under a cap, and the frontier's shape under 16,000,000 bytes against #1855's fixed rule."""

import dataclasses

import pytest
import torch

import allocation
import artifact
import eval_final
import quantize
import train_gpt
from test_model_and_quant import batch, tiny_config, trained_like_state
from test_quantize import correlated_inputs, heavy_tailed_weight


def test_a_std_grid_scales_by_the_row_std_and_its_container_follows_from_the_step():
    assert quantize.Grid.of_rule(11.5, 6) == quantize.Grid.of_step(11.5 / 31)  # #1855's MLP rule: int6
    assert quantize.rule_1855("c_q").bits == 6 and quantize.rule_1855("tok_emb").bits == 7
    assert [quantize.Grid.of_step(s).bits for s in (0.1, 0.2, 0.4, 0.8)] == [8, 7, 6, 5]
    w = heavy_tailed_weight(64, 512) * torch.linspace(0.5, 2, 64)[:, None]
    grid = quantize.Grid.of_step(0.3)
    q, scale = quantize.quantize_rows(w, grid.bits, grid.step)
    rms = w.square().mean(dim=1).sqrt()
    assert torch.allclose(scale.float(), (0.3 * rms).half().float())
    top = quantize.grid_top(grid.bits)
    assert int(q.max()) <= top and int(q.min()) >= -top - 1
    inside = w.abs() <= top * scale.float()[:, None]  # within the container: half a step; beyond it: clamped
    error = (quantize.dequantize_rows(q, scale) - w).abs()
    assert bool((error[inside] <= 0.5 * scale.float()[:, None].expand_as(w)[inside] * 1.01).all())
    assert bool(((q.abs() >= top)[~inside]).all())


def test_qat_on_the_rd_grids_computes_what_the_version_4_artifact_stores():
    cfg = tiny_config(num_layers=2)
    model = train_gpt.GPT(cfg)
    state = trained_like_state(cfg)  # the matrices kept in float as the artifact keeps them (fp16)
    model.load_state_dict({n: t.half().float() if t.ndim >= 2 else t for n, t in state.items()})
    state = {n: t.detach().clone() for n, t in model.state_dict().items()}
    grids = quantize.qat_grids(state)
    quantized = quantize.quantize_state(state, {n: grids[n] for n, t in state.items() if quantize.is_quantized_matrix(n, t)})
    blob, _ = artifact.grouped_artifact(state, {"model_config": dataclasses.asdict(cfg)}, quantized, zstd_level=3,
                                        codecs=("zstd",))
    stored = eval_final.model_from_artifact(train_gpt.unpack_artifact(blob, "<memory>"), "<memory>", torch.device("cpu"))
    x, y = batch(cfg)
    with torch.no_grad():
        train_gpt.set_fake_quant(model, True, grids=grids)
        assert model.blocks[0].mlp.fc.fake_quant == 6 and model.blocks[0].mlp.fc.fake_quant_step == pytest.approx(11.5 / 31)
        qat = model(x, y).item()
        train_gpt.set_fake_quant(model, True)  # the ladder's grid (row max / 31): not what this artifact stores
        ladder = model(x, y).item()
    assert abs(qat - stored(x, y).item()) < 1e-4 * abs(qat) < abs(ladder - stored(x, y).item())


def test_gptq_on_a_std_grid_keeps_its_scales_and_lowers_the_output_error():
    x = correlated_inputs(2048, 192)
    w = heavy_tailed_weight(96, 192)
    hessian = x.T @ x / x.size(0)
    grid = quantize.rule_1855("mlp_fc")
    rtn_q, rtn_scale = quantize.quantize_rows(w, grid.bits, grid.step)
    q, scale = quantize.gptq_quantize(w, hessian, grid.bits, step=grid.step)
    assert torch.equal(scale, rtn_scale)
    errors = [quantize.output_error(quantize.dequantize_rows(v, scale) - w, hessian) for v in (q, rtn_q)]
    assert errors[0] < 0.6 * errors[1]


@pytest.fixture(scope="module")
def grouped():
    """(state, quantized, version 4 blob, groups) of a tiny trained-like model on #1855's grids, with an extra."""
    cfg = tiny_config(num_layers=2)
    state = trained_like_state(cfg)
    grids = {n: quantize.rule_1855(g) for g, names in allocation.grouped_names(state).items() for n in names}
    quantized = quantize.quantize_state(state, grids)
    blob, groups = artifact.grouped_artifact(state, {"model_config": dataclasses.asdict(cfg)}, quantized,
                                             {"knobs": b"\x01\x02"}, zstd_level=3)
    return state, quantized, blob, groups


def test_a_version_4_artifact_reads_back_every_group_whatever_its_codec_and_orientation(grouped):
    state, quantized, blob, groups = grouped
    names = {g["name"] for g in groups}
    assert {"tok_emb", "c_q", "attn_proj", "mlp_fc", "mlp_proj", "bigram_embed", "scales", "float", "extras"} <= names
    assert {g["codec"] for g in groups} <= set(artifact.CODECS)
    loaded = train_gpt.unpack_artifact(blob, "<memory>")
    assert loaded.extras == {"knobs": b"\x01\x02"} and loaded.meta["model_config"]
    for n, t in state.items():
        expected = quantized[n].dequantize() if n in quantized else t.to(torch.float16 if t.ndim >= 2 else torch.float32).float()
        assert torch.equal(loaded.state[n], expected), n
    for orientation in ("plain", "transposed"):  # each orientation reads back the same weights
        other, described = artifact.grouped_artifact(state, loaded.meta, quantized, zstd_level=1, codecs=("lzma",),
                                                     orientation=orientation, lzma_max_raw=1 << 30)
        assert {g["codec"] for g in described} == {"lzma"}
        assert all(g["transposed"] == (orientation == "transposed") for g in described if g["name"] == "mlp_fc")
        again = train_gpt.unpack_artifact(other, "<memory>").state
        assert all(torch.equal(again[n], loaded.state[n]) for n in state)
    with_more = train_gpt.replace_extras(blob, {"table": b"xyz"}, "<memory>", 3)  # the builders' path
    assert train_gpt.unpack_artifact(with_more, "<memory>").extras == {"knobs": b"\x01\x02", "table": b"xyz"}


def rewrite_header(blob: bytes, change) -> bytes:
    header, at = artifact.grouped_header(blob, "<memory>")
    change(header)
    text = artifact.zstd_compress(artifact.json.dumps(header).encode(), 3)
    return artifact.ARTIFACT_PREFIX.pack(artifact.ARTIFACT_MAGIC, artifact.GROUPED_VERSION, len(text)) + text + blob[at:]


@pytest.mark.parametrize("damage, expected", [
    ("flipped_byte_in_a_group", "group mlp_fc is damaged"),
    ("unknown_codec", "names compressor 'brotli'"),
    ("truncated", "damaged or truncated"),
    ("trailing_bytes", "bytes its header does not name"),
    ("header", "header is corrupted"),
])
def test_a_damaged_version_4_artifact_is_refused_in_one_line(grouped, tmp_path, damage, expected):
    _, _, blob, groups = grouped
    header, at = artifact.grouped_header(blob, "<memory>")
    start = at + sum(g["nbytes"] for g in groups[: [g["name"] for g in groups].index("mlp_fc")])
    damaged = bytearray(blob)
    if damage == "flipped_byte_in_a_group":
        damaged[start + 100] ^= 0xFF
    elif damage == "unknown_codec":
        damaged = rewrite_header(blob, lambda h: h["groups"][0].update(codec="brotli"))
    elif damage == "truncated":
        damaged = damaged[:-10]
    elif damage == "trailing_bytes":
        damaged += b"\0"
    else:
        damaged[artifact.ARTIFACT_PREFIX.size + 5] ^= 0xFF
    path = tmp_path / "damaged.ptz"
    path.write_bytes(bytes(damaged))
    with pytest.raises(train_gpt.InputError) as refused:
        train_gpt.read_artifact(path)
    message = str(refused.value)
    assert "\n" not in message and str(path) in message and expected in message and "re-export" in message


def synthetic_options(groups: int = 4, steps: int = 7, seed: int = 0) -> dict[str, list[allocation.Option]]:
    """Convex rate-distortion curves of different weights: error ~ w 4^-bits, bytes ~ n bits."""
    g = torch.Generator().manual_seed(seed)
    options = {}
    for k in range(groups):
        weight, size = float(torch.rand(1, generator=g)) * 10 + 0.1, float(torch.randint(1, 10, (1,), generator=g))
        options[f"g{k}"] = [allocation.Option(quantize.Grid(8, 0.1 * i), size * 1000 * (8 - 0.5 * i),
                                              weight * 4.0 ** (-(8 - 0.5 * i))) for i in range(steps)]
    return options


def test_the_search_fits_and_beats_every_fixed_combination_that_fits_its_budget():
    import itertools
    options = synthetic_options()
    combos = list(itertools.product(*(range(len(o)) for o in options.values())))
    def cost(combo):
        return (sum(o[i].nbytes for o, i in zip(options.values(), combo)),
                sum(o[i].error for o, i in zip(options.values(), combo)))
    for combo in combos[:: max(1, len(combos) // 60)]:
        budget, error = cost(combo)
        choice = allocation.allocate(options, budget, unit=1.0)
        got_bytes, got_error = cost([choice[g] for g in options])
        assert got_bytes <= budget and got_error <= error * (1 + 1e-9), (combo, choice)
    # a search that ignores the errors (the coarsest step everywhere) fits but loses: the test can fail
    coarse = [len(o) - 1 for o in options.values()]
    budget, _ = cost([0, 0, len(options["g2"]) - 1, len(options["g3"]) - 1])
    assert cost(coarse)[1] > cost([allocation.allocate(options, budget)[g] for g in options])[1]


def test_an_rd_export_fits_a_cap_below_the_int6_rung_logs_every_group_and_reads_back():
    cfg = tiny_config(num_layers=2)
    state = trained_like_state(cfg)
    meta = {"model_config": dataclasses.asdict(cfg)}
    int6 = len(train_gpt.pack_artifact(state, meta, zstd_level=3))
    lines = []
    blob, grids = allocation.export_rd(state, meta, 5000, int6 * 3 // 4, 3, lines.append, codecs=("zstd",), sample=1.0,
                                       grids={g: allocation.candidates(g)[::2] for g in ("tok_emb", "c_q", "attn_proj",
                                              "mlp_fc", "mlp_proj", "bigram_embed")})
    assert len(blob) + 5000 <= int6 * 3 // 4
    groups = [line for line in lines if line.startswith("export_group ")]
    assert {line.split()[1] for line in groups} == {f"group:{g}" for g in grids}
    assert all("bits_per_param:" in line and "output_error:" in line and "container_bits:" in line for line in groups)
    assert "fits:1" in lines[-1] and "search:knapsack_dp" in lines[-1]
    assert not any(line.startswith("export_rd_check") for line in lines)  # no loss: nothing to measure finalists by
    loaded = train_gpt.unpack_artifact(blob, "<memory>")
    assert loaded.meta["export_rung"] == "rd"
    assert eval_final.model_from_artifact(loaded, "<memory>", torch.device("cpu"))


def test_an_rd_export_with_gptq_rounds_the_chosen_grids_with_less_output_error_than_predicted():
    """The options are measured rounded to nearest; GPTQ then rounds only the chosen grids, on the Hessians."""
    cfg = tiny_config(num_layers=1)
    state = trained_like_state(cfg)
    hessians = {n: (lambda x: x.T @ x / x.size(0))(correlated_inputs(1024, t.size(1), seed=i))
                for i, (n, t) in enumerate(state.items()) if quantize.is_quantized_matrix(n, t) and "bigram.embed" not in n}
    lines = []
    allocation.export_rd(state, {"model_config": dataclasses.asdict(cfg)}, 0, 10**9, 3, lines.append, "gptq", hessians,
                         codecs=("zstd",), sample=1.0, grids={g: [quantize.rule_1855(g)] for g in allocation.grouped_names(state)})
    fields = {line.split()[1]: dict(f.split(":", 1) for f in line.split()[1:]) for line in lines if "export_group" in line}
    for group in ("group:c_q", "group:mlp_fc", "group:mlp_proj"):
        assert float(fields[group]["output_error"]) < 0.8 * float(fields[group]["predicted_error"]), group


def quadratic_loss(state, curvature, slope):
    """A loss with a first-order term (an unconverged model: slope, a gradient tensor per weight) and a known
    curvature per weight: with H = I each group's lambda is exactly its curvature."""
    def loss(replaced, per_sequence=False):
        value = sum(float((slope[n] * (t - state[n])).double().sum()) + curvature[n] *
                    float((t - state[n]).double().square().sum()) for n, t in replaced.items())
        return torch.tensor([value], dtype=torch.float64) if per_sequence else value  # one sequence: no noise
    return loss


def with_sequence_noise(loss, spread, sequences=64):
    """The same mean loss spread over `sequences` sequences, each off the mean by spread x z_i of it (z: fixed,
    mean 0, std 1): two finalists' paired difference has mean Delta and standard error |Delta| x spread / 8."""
    z = torch.randn(sequences, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    z = (z - z.mean()) / z.std()
    def noisy(replaced, per_sequence=False):
        value = loss(replaced)
        return value * (1 + spread * z) if per_sequence else value
    return noisy


def test_the_sensitivities_are_the_loss_curvature_per_unit_of_error_with_the_first_order_term_cancelled():
    cfg = tiny_config(num_layers=1)
    state = trained_like_state(cfg)
    groups = allocation.grouped_names(state)
    curvature = {n: (0.0 if g == "c_k" else -1.0 if g == "c_v" else 10.0 ** i)
                 for i, (g, names) in enumerate(groups.items()) for n in names}
    error = {n: q.dequantize() - state[n] for g, names in groups.items() for n, q in quantize.quantize_state(
        {n: state[n] for n in names}, {n: allocation.SENSITIVITY_GRID(g) for n in names}).items()}
    slope = {n: 3 * curvature[n] * e for n, e in error.items()}  # the gradient along the error
    lambdas = allocation.sensitivities(state, groups, {}, quadratic_loss(state, curvature, slope))
    floor = min(v for g, v in lambdas.items() if curvature[groups[g][0]] > 0)
    for g, names in groups.items():
        expected = curvature[names[0]] if curvature[names[0]] > 0 else floor  # flat or negative: the floor
        assert lambdas[g] == pytest.approx(expected, rel=1e-6), g
    # a one-sided difference (L(W+E) - L(W)) / error would read the slope too: 4x the curvature here
    names = groups["mlp_fc"]
    one_sided = quadratic_loss(state, curvature, slope)({n: state[n] + error[n] for n in names}) / \
        allocation.group_error(state, names, {n: state[n] + error[n] for n in names}, {})
    assert one_sided == pytest.approx(4 * curvature[names[0]], rel=1e-6)


def test_sensitivities_move_bytes_to_the_group_the_loss_needs():
    """Same weights, same cap: a group whose errors cost the loss 1000 x more gets a finer grid than when every
    lambda is 1, and the export logs each group's lambda and its predicted loss."""
    cfg = tiny_config(num_layers=1)
    state = trained_like_state(cfg)
    meta = {"model_config": dataclasses.asdict(cfg)}
    groups = allocation.grouped_names(state)
    grids = {g: allocation.candidates(g)[::3] for g in groups}
    cap = len(train_gpt.pack_artifact(state, meta, zstd_level=3)) * 3 // 4
    curvature = {n: 1000.0 if g == "mlp_proj" else 1.0 for g, names in groups.items() for n in names}
    chosen = {}
    for label, loss in (("plain", None), ("weighted", quadratic_loss(state, curvature, {n: 0.0 for n in state}))):
        lines = []
        _, chosen[label] = allocation.export_rd(state, meta, 0, cap, 3, lines.append, codecs=("zstd",), sample=1.0,
                                                grids=grids, loss=loss)
        assert all("sensitivity:" in line and "predicted_loss:" in line for line in lines if "export_group" in line)
    assert "sensitivities:measured" in lines[-1] and "sensitivity_ms:" in lines[-1]
    assert chosen["weighted"]["mlp_proj"].step < chosen["plain"]["mlp_proj"].step or \
        chosen["weighted"]["mlp_proj"].bits > chosen["plain"]["mlp_proj"].bits


def check_fields(lines):
    line = next(line for line in lines if line.startswith("export_rd_check "))
    return dict(f.split(":", 1) for f in line.split()[1:])


def test_the_check_keeps_the_ladders_grids_where_the_measured_loss_prefers_them():
    """A loss that the ladder's int6 grids zero (the distance to their stored values): its sensitivities are all 1, so
    the search picks the least squared error (std grids), which this loss rates worse; the check measures both
    packs and keeps the ladder's, which fits the cap and reads back as the ladder's int6 weights."""
    cfg = tiny_config(num_layers=1)
    state = trained_like_state(cfg)
    meta = {"model_config": dataclasses.asdict(cfg)}
    groups = allocation.grouped_names(state)
    int6 = dict(allocation.ladder_finalists(state, groups))["int6"]
    assert int6["tok_emb"] == allocation.FLOAT_GRID and int6["mlp_fc"] == quantize.Grid(6)
    ladder = quantize.quantize_state(state, {n: int6[g] for g, names in groups.items() for n in names if int6[g].bits})
    target = {n: ladder[n].dequantize() if n in ladder else state[n].half().float() for names in groups.values() for n in names}
    def loss(replaced, per_sequence=False):
        value = sum(float((t.float() - target[n]).double().square().sum()) for n, t in replaced.items())
        return torch.tensor([value], dtype=torch.float64) if per_sequence else value
    v4, _ = artifact.grouped_artifact(state, meta, ladder, zstd_level=3, codecs=("zstd",))
    cap = len(v4) * 21 // 20
    lines = []
    blob, chosen = allocation.export_rd(state, meta, 0, cap, 3, lines.append, codecs=("zstd",), sample=1.0,
                                        grids={g: allocation.candidates(g)[::3] + [int6[g]] for g in groups}, loss=loss)
    check = check_fields(lines)
    assert check["chose"] == "ladder" and check["ladder_rung"] == "int6" and float(check["ladder_loss"]) == 0.0
    assert float(check["rd_loss"]) > 0 and chosen == int6  # the search's own pick stored other values
    assert len(blob) <= cap and f"model_bytes:{len(blob)} " in lines[-1] and "fits:1" in lines[-1]
    assert {line.split()[2] for line in lines if line.startswith("export_group")} == \
        {f"grid:{grid.label()}" for grid in int6.values()}
    loaded = train_gpt.unpack_artifact(blob, "<memory>")
    assert all(torch.equal(loaded.state[n], target[n]) for n in target)
    assert eval_final.model_from_artifact(loaded, "<memory>", torch.device("cpu"))
    # under a training clock the check would read training tokens after it: skipped, said, the search's pick stands
    calls, clocked = [], []
    def counted(replaced, per_sequence=False):
        calls.append(len(replaced))
        return loss(replaced, per_sequence)
    _, searched = allocation.export_rd(state, meta, 0, cap, 3, clocked.append, codecs=("zstd",), sample=1.0,
                                       grids={g: allocation.candidates(g)[::3] + [int6[g]] for g in groups}, loss=counted,
                                       final_check=False)
    assert "export_rd_check skipped:training_clock" in [" ".join(line.split()[:2]) for line in clocked]
    assert searched != int6 and len(calls) == 1 + 2 * len(groups)  # L(W) and the sensitivities' pairs only


def test_the_check_keeps_the_finalist_of_least_measured_loss_and_the_search_where_it_is_right():
    """The loss the search predicts (squared error, sensitivities 1), every candidate: its pick stands against the
    ladder's rung and #1855's rule, each finalist's measured loss logged, the one kept the least."""
    cfg = tiny_config(num_layers=1)
    state = trained_like_state(cfg)
    meta = {"model_config": dataclasses.asdict(cfg)}
    groups = allocation.grouped_names(state)
    cap = len(train_gpt.pack_artifact(state, meta, zstd_level=3))
    lines = []
    blob, chosen = allocation.export_rd(state, meta, 0, cap, 3, lines.append, codecs=("zstd",), sample=1.0,
                                        loss=quadratic_loss(state, {n: 1.0 for n in state}, {n: 0.0 for n in state}))
    check = check_fields(lines)
    measured = {kind: float(check[f"{kind}_loss"]) for kind in ("rd", "ladder", "rule_1855")
                if check[f"{kind}_loss"] != "none"}
    assert {"rd", "ladder", "rule_1855"} <= measured.keys() and check["chose"] == "rd"
    assert measured["rd"] == min(measured.values()) and len(blob) <= cap
    assert allocation.stored_loss(blob, groups, quadratic_loss(state, {n: 1.0 for n in state}, {n: 0.0 for n in state})) \
        == pytest.approx(measured["rd"], rel=1e-5)


def test_the_check_keeps_the_ladders_grids_unless_another_finalist_wins_beyond_the_noise(monkeypatch):
    """The search is right on the mean (the squared-error loss it predicts), by Delta over the ladder's rung. Spread
    over 64 sequences with a paired standard error of Delta/8 it wins by 8 standard errors and stands; with a standard
    error of 2 Delta it wins by half of one, inside CHECK_MARGIN_SE, and the ladder's grids stand. Without the margin (0) the same
    noisy case keeps the search's pick: the margin is what keeps the ladder."""
    cfg = tiny_config(num_layers=1)
    state = trained_like_state(cfg)
    meta = {"model_config": dataclasses.asdict(cfg)}
    groups = allocation.grouped_names(state)
    cap = len(train_gpt.pack_artifact(state, meta, zstd_level=3))
    exact = quadratic_loss(state, {n: 1.0 for n in state}, {n: 0.0 for n in state})
    ladder = dict(allocation.ladder_finalists(state, groups))
    kept = {}
    for label, spread, margin in (("quiet", 1.0, 2.0), ("noisy", 16.0, 2.0), ("noisy_no_margin", 16.0, 0.0)):
        monkeypatch.setattr(allocation, "CHECK_MARGIN_SE", margin)
        lines = []
        blob, chosen = allocation.export_rd(state, meta, 0, cap, 3, lines.append, codecs=("zstd",), sample=1.0,
                                            loss=with_sequence_noise(exact, spread))
        check = check_fields(lines)
        assert check["incumbent"] == "ladder" and len(blob) <= cap
        gain, error = float(check["rd_gain"]), float(check["rd_gain_se"])
        assert gain == pytest.approx(float(check["ladder_loss"]) - float(check["rd_loss"]), rel=1e-4, abs=1e-6)
        assert gain > 0 and error == pytest.approx(gain * spread / 8, rel=1e-3)
        kept[label] = check["chose"]
        if check["chose"] == "ladder":
            assert chosen == ladder[check["ladder_rung"]]  # the ladder's rung, stored per group
    assert kept == {"quiet": "rd", "noisy": "ladder", "noisy_no_margin": "rd"}


def test_the_standing_finalist_the_ladder_unless_beaten_beyond_the_margin_then_the_lowest(monkeypatch):
    z = torch.tensor([1.0, -1.0, 1.0, -1.0])  # a paired difference of d + z/10 has standard error 0.05
    ladder = torch.full((4,), 3.0)
    monkeypatch.setattr(allocation, "CHECK_MARGIN_SE", 2.0)
    kept, fields = allocation.standing({"rd": ladder - 0.05 + z / 10, "ladder": ladder})
    assert kept == "ladder" and "incumbent:ladder" in fields  # 0.05 ahead: one standard error, inside the margin
    assert allocation.standing({"rd": ladder - 0.2 + z / 10, "ladder": ladder})[0] == "rd"  # four: beyond it
    # both beyond the margin: the lower mean stands, whichever comes first
    beaten = {"rd": ladder - 0.2 + z / 10, "ladder": ladder, "rule_1855": ladder - 0.3 + z / 10}
    assert allocation.standing(beaten)[0] == "rule_1855"
    assert allocation.standing({"rule_1855": beaten["rule_1855"], "ladder": ladder, "rd": beaten["rd"]})[0] == "rule_1855"
    # no rung fits: the search's pick is the incumbent, and #1855's rule must beat it beyond the margin
    kept, fields = allocation.standing({"rd": ladder, "rule_1855": ladder - 0.05 + z / 10})
    assert kept == "rd" and "incumbent:rd" in fields and any(f.startswith("rule_1855_gain:0.05") for f in fields)
    monkeypatch.setattr(allocation, "CHECK_MARGIN_SE", 0.0)
    assert allocation.standing({"rd": ladder.clone(), "ladder": ladder})[0] == "ladder"  # a tie: the incumbent
    assert allocation.standing({"rd": ladder - 0.05 + z / 10, "ladder": ladder})[0] == "rd"  # any gain, at margin 0
    assert allocation.standing({"rd": ladder + 0.05 + z / 10, "ladder": ladder})[0] == "ladder"  # a loss


def test_paired_gain_is_the_mean_difference_and_its_standard_error():
    incumbent = torch.tensor([3.0, 2.0, 4.0, 3.0])
    gain, error = allocation.paired_gain(incumbent - torch.tensor([1.0, 0.0, 2.0, 1.0]), incumbent)
    assert gain == pytest.approx(1.0) and error == pytest.approx(float(torch.tensor([1.0, 0.0, 2.0, 1.0]).std()) / 2)
    assert allocation.paired_gain(torch.tensor([1.0]), torch.tensor([1.5])) == (0.5, 0.0)


def test_replaced_loss_measures_the_model_with_weights_replaced_and_puts_them_back():
    cfg = tiny_config(num_layers=1)
    model = train_gpt.GPT(cfg)
    model.load_state_dict(trained_like_state(cfg))
    x, _ = batch(cfg)
    loss = allocation.replaced_loss(model, [x], False)
    kept = {n: t.clone() for n, t in model.state_dict().items()}
    name = "blocks.0.mlp.fc.weight"
    with torch.no_grad():
        assert loss({}) == pytest.approx(float(model(x[:, :-1], x[:, 1:])))
    assert loss({name: torch.zeros_like(kept[name])}) != pytest.approx(loss({}))
    per_sequence = loss({name: torch.zeros_like(kept[name])}, per_sequence=True)
    assert per_sequence.shape == (x.size(0),)  # each sequence's mean: the check's paired noise
    assert float(per_sequence.mean()) == pytest.approx(loss({name: torch.zeros_like(kept[name])}), rel=1e-5)
    assert all(torch.equal(kept[n], t) for n, t in model.state_dict().items())


def test_export_allocation_rd_refuses_settings_it_would_ignore():
    train_gpt.validate_settings(train_gpt.Settings(export_allocation="rd"))
    for bad in (dict(export_allocation="rd", lqer_tensors=2), dict(export_allocation="best")):
        with pytest.raises(train_gpt.InputError) as refused:
            train_gpt.validate_settings(train_gpt.Settings(**{**dict(lqer_tensors=0), **bad}))
        assert "EXPORT_ALLOCATION" in str(refused.value) and "\n" not in str(refused.value)


def test_the_frontier_shape_fits_under_the_cap_with_no_more_error_than_1855s_rule_at_its_bytes():
    """RECIPE=frontier's model (docs/frontier_recipe.md): 11 layers, d512, 8/4 heads, MLP 4x, vocabulary 8192,
    default bigram, layers 3-5 looped, two lanes from layer 8, trained-like weights (Student-t(4) rows): #1855's
    fixed grids packed as version 4 give B bytes and output error E (H = I: no calibration here); the
    rate-distortion export (the recipe's EXPORT_ALLOCATION) under a cap of B (and the legal evaluation's code) is
    under 16,000,000 bytes with no more error than E, and names the recipe. zstd level 3 and a sampled measure:
    the suite's time (docs/export.md: level 22)."""
    s = train_gpt.Settings.from_env({"RECIPE": "frontier"})
    cfg = train_gpt.ModelConfig.from_settings(s)
    assert (cfg.num_layers, cfg.model_dim, cfg.num_heads, cfg.num_kv_heads, cfg.mlp_mult, cfg.vocab_size) == (
        11, 512, 8, 4, 4, 8192) and (cfg.num_loops, cfg.parallel_residual_start, s.export_allocation) == (2, 8, "rd")
    state = trained_like_state(cfg)
    meta = {"model_config": dataclasses.asdict(cfg), "recipe": s.recipe}
    counted = train_gpt.counted_code(s.export_for_eval, s.ship_code)
    code = counted.code_bytes + counted.reserve_bytes
    fixed, lines = [], []
    groups = allocation.grouped_names(state)
    blob_1855, _ = allocation.export_rd(state, meta, code, 10**9, 3, fixed.append, codecs=("zstd",), sample=0.1,
                                        grids={g: [quantize.rule_1855(g)] for g in groups})
    bytes_1855 = len(blob_1855) + code
    error_1855 = float(fixed[-1].split("output_error:")[1].split()[0])
    blob, _ = allocation.export_rd(state, meta, code, min(bytes_1855, train_gpt.ARTIFACT_CAP_BYTES), 3, lines.append,
                                   codecs=("zstd",), sample=0.1)
    print("\n".join(fixed + lines))
    error = float(lines[-1].split("output_error:")[1].split()[0])
    assert len(blob) + code <= min(bytes_1855, 16_000_000)
    assert error <= error_1855
    loaded = train_gpt.unpack_artifact(blob, "<memory>")
    assert loaded.state["tok_emb.weight"].shape == (8192, 512) and loaded.meta["recipe"] == "frontier"


def test_the_rd_file_is_the_same_whatever_the_thread_pool(monkeypatch):
    """Candidates are measured and groups packed in a pool: the choice and every byte must not depend on its size."""
    cfg = tiny_config(num_layers=2)
    state = trained_like_state(cfg)
    meta = {"model_config": dataclasses.asdict(cfg)}
    cap = len(train_gpt.pack_artifact(state, meta, zstd_level=3)) * 3 // 4
    grids = {g: allocation.candidates(g)[::3] for g in ("tok_emb", "c_q", "mlp_fc", "mlp_proj")}
    blobs = []
    for workers in (1, 4):
        monkeypatch.setattr(artifact, "pool_workers", lambda: workers)
        monkeypatch.setattr(allocation, "pool_workers", lambda: workers)
        blobs.append(allocation.export_rd(state, meta, 0, cap, 3, [].append, codecs=("zstd", "lzma"), sample=0.5,
                                          grids=grids)[0])
    assert blobs[0] == blobs[1]
    monkeypatch.undo()
    assert 1 <= artifact.pool_workers() <= artifact.POOL_MAX_WORKERS  # this machine's cores, capped
