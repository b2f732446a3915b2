"""The model, the int6 quantizer, QAT, compilation and Muon, checked in-process on tiny shapes."""

import dataclasses

import pytest
import torch

import train_gpt
from train_gpt import GPT, ModelConfig, Settings


def tiny_config(**overrides) -> ModelConfig:
    s = dataclasses.replace(Settings(), vocab_size=128, num_layers=3, model_dim=320, num_heads=4, num_kv_heads=2,
                            bigram_vocab_size=4096, bigram_dim=32)
    return dataclasses.replace(ModelConfig.from_settings(s), **overrides)


def trained_looking_model(cfg: ModelConfig, seed: int = 0) -> GPT:
    """A model whose zero-initialized projections are filled in, as training would."""
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and not p.abs().sum():
                p.normal_(std=0.02)
    return model


def batch(cfg: ModelConfig, seq_len: int = 64, rows: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, cfg.vocab_size, (rows, seq_len + 1), generator=g)
    return idx[:, :-1], idx[:, 1:]


def artifact_roundtrip(model: GPT) -> GPT:
    meta = {"model_config": dataclasses.asdict(model.cfg)}
    blob = train_gpt.pack_artifact(model.state_dict(), meta, zstd_level=3)
    artifact = train_gpt.unpack_artifact(blob, "<memory>")
    return train_gpt.model_from_artifact(artifact, "<memory>", torch.device("cpu"))


def test_int6_quantizer_uses_row_max_over_31_and_the_int6_range():
    w = torch.randn(16, 300) * torch.linspace(0.01, 3, 16)[:, None]
    q, scale = train_gpt.int6_quantize(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float16
    assert int(q.min()) >= -32 and int(q.max()) <= 31
    torch.testing.assert_close(scale.float(), (w.abs().amax(dim=1) / 31).half().float())
    error = (train_gpt.int6_dequantize(q, scale) - w).abs()
    assert bool((error <= scale.float()[:, None] * 0.5 + 1e-6).all())  # within half a step


def test_fake_quantize_passes_the_gradient_straight_through():
    w = torch.randn(8, 9000, requires_grad=True)
    (train_gpt.int6_fake_quantize(w) * 3).sum().backward()
    torch.testing.assert_close(w.grad, torch.full_like(w, 3.0))


def test_only_large_block_matrices_are_int6_and_get_qat():
    model = GPT(tiny_config())
    train_gpt.set_fake_quant(model, True)
    on = {n for n, m in model.named_modules() if getattr(m, "fake_quant", False)}
    assert {"blocks.0.attn.c_q", "blocks.2.mlp.proj", "bigram.embed"} <= on
    assert "blocks.0.attn.c_k" not in on and "bigram.proj" not in on  # small: kept in fp16
    int6 = {n for n, t in model.state_dict().items() if train_gpt.is_int6_tensor(n, t)}
    assert int6 == {f"{n}.weight" for n in on}
    assert train_gpt.TIED_EMBEDDING_NAME not in int6


def test_qat_forward_equals_the_dequantized_artifact_and_without_qat_it_does_not():
    model = trained_looking_model(tiny_config())
    x, y = batch(model.cfg)
    scored = artifact_roundtrip(model)
    with torch.no_grad():
        artifact_loss = scored(x, y).item()
        train_gpt.set_fake_quant(model, True)
        qat_loss = model(x, y).item()
        train_gpt.set_fake_quant(model, False)
        float_loss = model(x, y).item()
    qat_gap = abs(qat_loss - artifact_loss) / artifact_loss
    float_gap = abs(float_loss - artifact_loss) / artifact_loss
    assert qat_gap < 1e-3
    assert float_gap > 10 * qat_gap


def test_compiled_fullgraph_forward_matches_eager_on_cpu():
    model = trained_looking_model(tiny_config(num_layers=2, model_dim=192, num_heads=2, bigram_vocab_size=512,
                                              bigram_dim=16))
    train_gpt.set_fake_quant(model, True)
    assert model.blocks[0].mlp.fc.fake_quant  # the compiled graph includes the QAT quantizer
    x, y = batch(model.cfg, seq_len=32, rows=2)
    eager = model(x, y)
    compiled = train_gpt.compile_model(model)(x, y)
    assert abs(compiled.item() - eager.item()) < 1e-5


def test_bf16_autocast_path_trains_on_cpu():
    model = trained_looking_model(tiny_config(num_layers=2, model_dim=64, bigram_vocab_size=512, bigram_dim=16))
    x, y = batch(model.cfg, seq_len=32, rows=2)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        loss = model(x, y)
    loss.backward()
    assert torch.isfinite(loss) and model.blocks[0].attn.c_q.weight.grad is not None
    with torch.no_grad():
        assert abs(loss.item() - model(x, y).item()) < 0.05  # bf16 stays close to fp32


def test_default_configuration_fits_the_cap_through_the_real_export(capsys):
    model = GPT(ModelConfig.from_settings(Settings()))
    params = sum(p.numel() for p in model.parameters())
    blob = train_gpt.pack_artifact(model.state_dict(), {"model_config": dataclasses.asdict(model.cfg)}, zstd_level=22)
    code = train_gpt.code_bytes(train_gpt.__file__)
    print(f"default params:{params} artifact_bytes:{len(blob)} code_bytes:{code}")
    assert 26_500_000 < params < 27_500_000
    assert len(blob) + code < train_gpt.ARTIFACT_CAP_BYTES


def test_truncated_or_corrupted_artifact_is_refused_clearly():
    model = GPT(tiny_config(num_layers=1, model_dim=64, bigram_vocab_size=512, bigram_dim=16))
    blob = train_gpt.pack_artifact(model.state_dict(), {"model_config": dataclasses.asdict(model.cfg)}, zstd_level=3)
    with pytest.raises(train_gpt.InputError, match="model.ptz: not a readable"):
        train_gpt.unpack_artifact(blob[: len(blob) // 2], "model.ptz")
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 0x40
    with pytest.raises(train_gpt.InputError, match="model.ptz"):
        train_gpt.unpack_artifact(bytes(flipped), "model.ptz")


@pytest.mark.parametrize("shape", [(64, 64), (48, 128), (384, 96), (512, 1536)])
def test_muon_orthogonalized_update_has_singular_values_near_one(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    sv = torch.linalg.svdvals(train_gpt.orthogonalize(g, steps=5))
    assert float(sv.min()) >= 0.5 and float(sv.max()) <= 1.5


def test_muon_weight_decay_is_decoupled_from_the_gradient():
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(32, 64)), torch.nn.Parameter(torch.randn(32, 64) * 5)
    grad = torch.randn(32, 64)
    a0, b0 = a.detach().clone(), b.detach().clone()
    lr, wd = 0.1, 0.5
    for p in (a, b):
        p.grad = grad.clone()
    train_gpt.Muon([a, b], lr=lr, momentum=0.0, backend_steps=5, weight_decay=wd).step()
    update_a = a.detach() - a0 * (1 - lr * wd)
    update_b = b.detach() - b0 * (1 - lr * wd)
    torch.testing.assert_close(update_a, update_b)  # the step ignores the weights: only the decay sees them
    torch.testing.assert_close(update_a, -lr * train_gpt.orthogonalize(grad, 5))


def test_optimizer_groups_follow_the_records_for_the_default_model():
    """Block matrices and bigram.proj to Muon; every control tensor (resid_mix, scales, gains,
    gates, skip weights) and the embeddings to AdamW."""
    model = train_gpt.GPT(train_gpt.ModelConfig.from_settings(train_gpt.Settings()))
    expected = {"tok_emb.weight": "embeddings", "bigram.embed.weight": "embeddings", "bigram.proj.weight": "matrices",
                "bigram.scale": "controls", "smear.gate": "controls", "skip_weights": "controls"}
    for i in range(11):
        for name in ("attn.c_q", "attn.c_k", "attn.c_v", "attn.proj", "mlp.fc", "mlp.proj"):
            expected[f"blocks.{i}.{name}.weight"] = "matrices"
        for name in ("attn_scale", "mlp_scale", "resid_mix", "attn.q_gain"):
            expected[f"blocks.{i}.{name}"] = "controls"
    mapping = {n: train_gpt.optimizer_group(n, p)[0] for n, p in model.named_parameters()}
    assert mapping == expected
    muon, adam = train_gpt.build_optimizers(model, train_gpt.Settings(), 0, 1, torch.device("cpu"))
    by_id = {id(p): n for n, p in model.named_parameters()}
    assert {by_id[id(p)] for p in muon.param_groups[0]["params"]} == {n for n, g in expected.items() if g == "matrices"}
    adam_lrs = {by_id[id(p)]: g["lr"] for g in adam.param_groups for p in g["params"]}
    assert adam_lrs["blocks.3.resid_mix"] == train_gpt.Settings.scalar_lr
    assert adam_lrs["tok_emb.weight"] == train_gpt.Settings.tied_embed_lr
