"""GPTQ and LQER (quantize.py) and the artifact that carries them: error against round-to-nearest on inputs
with a structure, corrections of rising rank, older and damaged artifacts, calibration on training shards only."""

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

import eval_final
import quantize
import token_data
import train_gpt
from conftest import REPO, log_value, run_script, tiny_env
from test_model_and_quant import tiny_config, trained_like_state

DATA = REPO / "tests" / "data"  # files made once by code that is gone, read by today's code


def correlated_inputs(rows: int, width: int, seed: int = 0) -> torch.Tensor:
    """Inputs that live mostly in a few directions, with channels of very different energy, as a layer's
    inputs do (after a norm, a ReLU^2): where GPTQ's feedback has correlations to use."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(rows, width // 8, generator=g) @ torch.randn(width // 8, width, generator=g)
    x = latent + 0.2 * torch.randn(rows, width, generator=g)
    return x * torch.exp(torch.randn(width, generator=g))


def heavy_tailed_weight(rows: int, cols: int, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.distributions.StudentT(torch.tensor(4.0)).sample((rows, cols)) * 0.02


def layer_inputs(model: train_gpt.GPT, module: torch.nn.Module, idx: torch.Tensor) -> torch.Tensor:
    """What `module` (a linear layer of model) receives on the tokens idx, (tokens, in_features)."""
    seen = []
    handle = module.register_forward_pre_hook(lambda m, inputs: seen.append(inputs[0].detach().reshape(
        -1, inputs[0].size(-1))))
    with torch.no_grad():
        model(idx)
    handle.remove()
    return torch.cat(seen)


@pytest.mark.parametrize("bits", [6, 5, 4])
def test_gptq_lowers_the_output_error_on_its_calibration_inputs_on_the_same_grid(bits):
    x = correlated_inputs(2048, 192)
    w = heavy_tailed_weight(96, 192)
    hessian = x.T @ x / x.size(0)
    rtn_q, rtn_scale = quantize.quantize_rows(w, bits)
    q, scale = quantize.gptq_quantize(w, hessian, bits)
    assert torch.equal(scale, rtn_scale) and q.dtype == torch.int8  # the artifact's grid, its scales unchanged
    assert int(q.min()) >= -(2 ** (bits - 1)) and int(q.max()) <= 2 ** (bits - 1) - 1
    def output_error(values):
        return float((x @ (quantize.dequantize_rows(values, scale) - w).T).square().mean())
    assert output_error(q) < 0.5 * output_error(rtn_q)
    # and the weights themselves moved off their nearest grid point: the feedback is what did it
    assert (q != rtn_q).float().mean() > 0.05


def test_gptq_on_a_real_layer_lowers_the_output_error_on_text_it_did_not_see(tiny_data):
    """The MLP output projection of a model, fed real text: inputs after ReLU^2, sparse and correlated."""
    cfg = tiny_config(num_layers=1, vocab_size=tiny_data["vocab_size"], model_dim=128)
    model = train_gpt.GPT(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.copy_(heavy_tailed_weight(*p.shape, seed=len(name)) * (5 if "tok_emb" in name else 1))
    shard = train_gpt.load_data_shard(sorted(Path(tiny_data["data_path"]).glob("fineweb_train_*"))[0],
                                      cfg.vocab_size)
    tokens = torch.from_numpy(shard[: 2 * 16 * 64].astype("int64")).view(2, 16, 64)
    layer = model.blocks[0].mlp.proj
    seen, unseen = (layer_inputs(model, layer, t) for t in tokens)
    w = layer.weight.detach()
    for bits in (5, 4):
        rtn = quantize.dequantize_rows(*quantize.quantize_rows(w, bits))
        gptq = quantize.dequantize_rows(*quantize.gptq_quantize(w, seen.T @ seen / seen.size(0), bits))
        for x in (seen, unseen):
            assert float((x @ (gptq - w).T).square().mean()) < 0.8 * float((x @ (rtn - w).T).square().mean())


@pytest.mark.parametrize("factor_bits", [8, 16])
def test_lqer_of_rank_r_leaves_less_output_error_than_rank_r_minus_1(factor_bits):
    x = correlated_inputs(1024, 128, seed=3)
    hessian = x.T @ x / x.size(0)
    w = heavy_tailed_weight(160, 128, seed=4)
    error = w - quantize.dequantize_rows(*quantize.quantize_rows(w, 4))
    left = [quantize.output_error(error, hessian)]
    for rank in range(1, 7):
        correction = quantize.fit_correction(error, hessian, rank, factor_bits)
        assert correction.rank == rank and correction.delta().shape == w.shape
        left.append(quantize.output_error(error - correction.delta(), hessian))
    assert all(b < a for a, b in zip(left, left[1:])), left
    assert left[-1] < 0.9 * left[0]


def test_lqer_chooses_the_tensors_where_it_removes_the_most_error_per_byte():
    x = correlated_inputs(512, 64, seed=5)
    hessian = x.T @ x / x.size(0)
    weights = {"plain": heavy_tailed_weight(64, 64, seed=6)}
    weights["low_rank_error"] = weights["plain"].clone()
    weights["low_rank_error"][:, :4] *= 40  # a few large columns: rows' scales grow, so does a low-rank error
    errors = {n: w - quantize.dequantize_rows(*quantize.quantize_rows(w, 4)) for n, w in weights.items()}
    rated = {n: quantize.rate_correction(errors[n], hessian, weights[n], rank=2, bits=8) for n in weights}
    assert list(quantize.choose_corrections(rated, count=1)) == ["low_rank_error"]
    assert len(quantize.choose_corrections(rated, count=3)) == 2


def gptq_lqer_artifact(cfg, state, calibration, lqer_tensors=3, factor_bits=8):
    lines = []
    blob, _ = train_gpt.export_artifact(state, {"model_config": dataclasses.asdict(cfg)}, 0, 10**9, 3, 0,
                                        lines.append, "gptq", calibration, 2, lqer_tensors, factor_bits)
    return blob, lines


@pytest.fixture(scope="module")
def calibrated(tiny_data):
    """(config, model, calibration) of a tiny trained-like model, calibrated on the training shards."""
    return calibrated_tiny_model(tiny_data)


def calibrated_tiny_model(tiny_data, data_path=None):
    cfg = tiny_config(num_layers=2, vocab_size=tiny_data["vocab_size"])
    model = train_gpt.GPT(cfg)
    model.load_state_dict(trained_like_state(cfg))
    s = dataclasses.replace(train_gpt.Settings(), data_path=data_path or tiny_data["data_path"],
                            vocab_size=tiny_data["vocab_size"], train_seq_len=64, gptq_calibration_tokens=512,
                            eval_batch_seqs=4, export_quantizer="gptq")
    return cfg, model, train_gpt.calibrate(model, s, torch.device("cpu"), autocast=False)


def test_a_gptq_lqer_artifact_reads_back_corrected_and_is_logged(calibrated):
    cfg, model, calibration = calibrated
    state = {n: t.detach() for n, t in model.state_dict().items()}
    blob, lines = gptq_lqer_artifact(cfg, state, calibration)
    figures = dict(f.split(":", 1) for f in lines[0].split()[1:])
    assert figures["quantizer"] == "gptq" and int(figures["calibration_tokens"]) == 512
    assert int(figures["lqer_tensors"]) == 3 and int(figures["correction_bytes"]) > 0
    header, _ = train_gpt.artifact_parts(blob, "<memory>")
    corrected = {e["name"] for e in header["tensors"] if e["role"] == "lqer_a"}
    assert len(corrected) == 3
    loaded = train_gpt.unpack_artifact(blob, "<memory>").state
    plain = train_gpt.unpack_artifact(train_gpt.pack_artifact(state, {"model_config": dataclasses.asdict(cfg)},
                                                              zstd_level=3), "<memory>").state
    for name in corrected:  # the reader adds the correction: less output error than the integers alone
        h = calibration.hessians[name]
        assert quantize.output_error(loaded[name] - state[name], h) < quantize.output_error(plain[name] - state[name], h)
    assert eval_final.model_from_artifact(train_gpt.unpack_artifact(blob, "<memory>"), "<memory>", torch.device("cpu"))


def test_a_version_2_artifact_written_by_the_record_trainer_still_loads():
    """tests/data/artifact_v2_record_trainer.ptz: a tiny trained-like model packed by the record folder's
    train_gpt.py of 2026-12-02 09:55 (artifact version 2, commit 4b8849d; the folder now carries a version 3
    writer), with what that trainer's own reader made of it (.expected.pt). Today's reader gives the same
    weights, and the model it rebuilds is the one trained then (no setting of issue 23 switched on)."""
    blob = (DATA / "artifact_v2_record_trainer.ptz").read_bytes()
    assert train_gpt.artifact_parts(blob, "v2.ptz")[0]["meta"]["model_config"].get("mlp_leaky_slope") is None
    loaded = train_gpt.unpack_artifact(blob, "v2.ptz")
    expected = torch.load(DATA / "artifact_v2_record_trainer.expected.pt")
    assert loaded.state.keys() == expected.keys()
    assert all(torch.equal(loaded.state[n], expected[n]) for n in expected)
    cfg = loaded.model_config
    assert cfg.mlp_leaky_slope == 0 and cfg.xsa_last_layers == 0
    train_gpt.GPT(cfg).load_state_dict(loaded.state, strict=True)


def tamper(blob: bytes, name: str, role: str, change) -> bytes:
    """The artifact with the `role` entry of tensor `name` replaced by change(tensor), header and body kept in step."""
    header, body = train_gpt.artifact_parts(blob, "<memory>")
    parts, entries, offset = [], [], 0
    for e in header["tensors"]:
        data = bytes(body[e["offset"] : e["offset"] + e["nbytes"]])
        if e["name"] == name and e["role"] == role:
            t = change(torch.frombuffer(bytearray(data), dtype=getattr(torch, e["dtype"])).reshape(e["shape"]).clone())
            data, e = t.numpy().tobytes(), dict(e, shape=list(t.shape), dtype=str(t.dtype).removeprefix("torch."))
        entries.append(dict(e, offset=offset, nbytes=len(data)))
        parts.append(data)
        offset += len(data)
    return train_gpt.assemble_artifact(dict(header, tensors=entries), b"".join(parts), {}, 3)


@pytest.fixture(scope="module")
def one_correction_artifacts(calibrated):
    """{factor bits: an artifact with one LQER correction}, built once for the damage cases."""
    cfg, model, calibration = calibrated
    state = {n: t.detach() for n, t in model.state_dict().items()}
    return {bits: gptq_lqer_artifact(cfg, state, calibration, lqer_tensors=1, factor_bits=bits)[0] for bits in (8, 16)}


@pytest.mark.parametrize("damage, role, expected", [
    ("wrong_shape", "lqer_b", "do not make a low-rank correction"),
    ("non_finite", "lqer_a_scales", "not finite"),
    ("non_finite_fp16", "lqer_b", "not finite"),
    ("bytes_short_of_shape", "lqer_a", "do not hold"),
])
def test_a_damaged_correction_is_refused_in_one_line(one_correction_artifacts, tmp_path, damage, role, expected):
    blob = one_correction_artifacts[16 if "fp16" in damage else 8]
    header, _ = train_gpt.artifact_parts(blob, "<memory>")
    name = next(e["name"] for e in header["tensors"] if e["role"] == "lqer_a")
    changes = {"wrong_shape": lambda t: t[:, :-1], "non_finite": lambda t: t.fill_(float("nan")),
               "non_finite_fp16": lambda t: t.fill_(float("inf")), "bytes_short_of_shape": lambda t: t}
    damaged = tamper(blob, name, role, changes[damage])
    if damage == "bytes_short_of_shape":  # a header that promises more than the body holds for the entry
        raw_header, body = train_gpt.artifact_parts(damaged, "<memory>")
        for e in raw_header["tensors"]:
            if e["name"] == name and e["role"] == role:
                e["shape"] = [e["shape"][0] + 1, e["shape"][1]]
        damaged = train_gpt.assemble_artifact(raw_header, bytes(body), {}, 3)
    path = tmp_path / "damaged.ptz"
    path.write_bytes(damaged)
    with pytest.raises(train_gpt.InputError) as refused:
        train_gpt.read_artifact(path)
    message = str(refused.value)
    assert "\n" not in message and str(path) in message and expected in message and "re-export" in message


def test_the_export_calibrates_on_training_shards_and_opens_no_validation_file(tiny_data, tmp_path, monkeypatch):
    only_train = tmp_path / "train_only"
    only_train.mkdir()
    for shard in sorted(Path(tiny_data["data_path"]).glob("fineweb_train_*.bin")):
        shutil.copy(shard, only_train / shard.name)
    opened = []
    real_load = token_data.load_data_shard  # the training stream (token_data.TokenStream) opens shards through it
    monkeypatch.setattr(token_data, "load_data_shard", lambda path, vocab: opened.append(path.name) or real_load(path, vocab))
    cfg, model, calibration = calibrated_tiny_model(tiny_data, data_path=str(only_train))  # no validation shard exists
    assert calibration.tokens == 512 and opened and all(n.startswith("fineweb_train_") for n in opened)
    assert set(calibration.hessians) >= {n for n, t in model.state_dict().items()  # the tied output layer too
                                         if train_gpt.is_quantized_matrix(n, t) and "bigram.embed" not in n
                                         } | {train_gpt.TIED_EMBEDDING_NAME}
    blob, _ = gptq_lqer_artifact(cfg, {n: t.detach() for n, t in model.state_dict().items()}, calibration)
    assert train_gpt.unpack_artifact(blob, "<memory>").state


def test_quantizer_settings_are_checked_before_anything_runs():
    for name, value, expected in (("export_quantizer", "awq", "EXPORT_QUANTIZER=awq is not one of rtn, gptq"),
                                  ("lqer_factor_bits", 7, "LQER_FACTOR_BITS=7 is not one of"),
                                  ("lqer_rank", -1, "LQER_RANK=-1 is out of range")):
        with pytest.raises(train_gpt.InputError, match=expected):
            train_gpt.validate_settings(dataclasses.replace(train_gpt.Settings(), **{name: value}))


def test_the_wall_clock_cap_keeps_the_export_reserve_only_where_the_export_calibrates():
    s = dataclasses.replace(train_gpt.Settings(), max_wallclock_seconds=600.0, gptq_reserve_seconds=12.0,
                            export_quantizer="rtn", lqer_tensors=0, export_allocation="ladder")
    assert train_gpt.export_reserved(s).max_wallclock_seconds == 600.0  # round to nearest: nothing to reserve
    for quantizer, lqer, allocation in (("gptq", 0, "ladder"), ("rtn", 3, "ladder"), ("rtn", 0, "rd")):
        reserved = train_gpt.export_reserved(dataclasses.replace(s, export_quantizer=quantizer, lqer_tensors=lqer,
                                                                 export_allocation=allocation))
        assert reserved.max_wallclock_seconds == 588.0
    assert train_gpt.export_reserved(dataclasses.replace(s, max_wallclock_seconds=0.0, export_quantizer="gptq")
                                     ).max_wallclock_seconds == 0.0  # no cap: none to shorten


def test_a_training_run_exports_with_gptq_and_lqer_and_logs_them(tiny_data, tmp_path):
    # MLP matrices big enough to be integers (256 x 768); the cap reserved for the export, as the log says
    env = tiny_env(tiny_data, tmp_path, MODEL_DIM=256, AUTOCAST_BF16=0, EXPORT_QUANTIZER="gptq",
                   GPTQ_CALIBRATION_TOKENS=256, LQER_TENSORS=1, LQER_RANK=2, MAX_WALLCLOCK_SECONDS=50,
                   GPTQ_RESERVE_SECONDS=20, EVAL_STRIDE=0, EXPORT_ALLOCATION="ladder")  # LQER: the ladder's
    run = run_script(["train_gpt.py"], env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert log_value(run.stdout, "settings", "max_wallclock_seconds") == 30.0
    assert log_value(run.stdout, "export_rung", "calibration_tokens", quantizer="gptq") == 256
    assert log_value(run.stdout, "export_rung", "lqer_tensors") == 1
    assert log_value(run.stdout, "export_rung", "correction_bytes") > 0
    assert log_value(run.stdout, "export_rung", "output_rel_rms_error") > 0
    logged = log_value(run.stdout, "final_int8_zlib_roundtrip_exact", "val_bpb")
    artifact = train_gpt.read_artifact(tmp_path / train_gpt.ARTIFACT_NAME)
    model = eval_final.model_from_artifact(artifact, "artifact", torch.device("cpu"))
    tokens = train_gpt.load_validation_tokens(tiny_data["data_path"], tiny_data["vocab_size"], 64, 4097)
    sp = train_gpt.load_tokenizer(tiny_data["tokenizer_path"], tiny_data["vocab_size"])
    fresh = train_gpt.evaluate(model, tokens, train_gpt.build_byte_tables(sp), 64, 0, 8, torch.device("cpu"), False)
    assert abs(fresh.val_bpb - logged) < 1e-6  # the reader applies the correction the trainer scored


def test_a_failing_calibration_still_writes_the_trained_weights(tiny_data, tmp_path, monkeypatch, capsys):
    """Whatever goes wrong in GPTQ after training (here: calibration raises, as an unforeseen CUDA error
    would), the trained weights reach the disk, rounded to nearest, and the log says so in one line."""
    def broken(*args, **kwargs):
        raise RuntimeError("injected: calibration failed")

    monkeypatch.setattr(train_gpt, "calibrate", broken)
    env = tiny_env(tiny_data, tmp_path, EXPORT_QUANTIZER="gptq", ITERATIONS=3)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    result = train_gpt.train(train_gpt.Settings.from_env())
    out = capsys.readouterr().out
    assert "warning export_quantizer:gptq failed:RuntimeError" in out and "quantizer:rtn" in out
    assert (tmp_path / train_gpt.ARTIFACT_NAME).is_file() and result["val_bpb"] > 0
