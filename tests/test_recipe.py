"""The frontier's recipe changes (train_gpt.py's model section): XSA, the BOS-masked look-back, partial RoPE,
the layer-norm scale, the attention output gate, value residuals, leaky ReLU^2, the EMA, and an artifact
that rebuilds whichever of them it was trained with."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import eval_final
import train_gpt
from train_gpt import BOS_ID, GPT, ModelConfig, Settings

ALL_ON = dict(mlp_leaky_slope=0.5, xsa_last_layers=3, rope_dims=8, layer_norm_scale=True, attn_output_gate=True,
              value_residual_alpha=0.9)


def small_config(**overrides) -> ModelConfig:
    base = dataclasses.replace(ModelConfig.from_settings(Settings()), vocab_size=64, num_layers=3, model_dim=64,
                               num_heads=4, num_kv_heads=2, bigram_vocab_size=128, bigram_dim=16)
    return dataclasses.replace(base, **overrides)


def trained_looking(cfg: ModelConfig, seed: int = 0) -> GPT:
    """Random weights everywhere (a fresh model's zero projections and gates would hide what is tested)."""
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.ndim == 2 else 1.0) + (0 if p.ndim == 2 else 0.5))
    return model


def attention_outputs(model: GPT, idx: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(each block's attention output before its projection (B, H, T, D), the values it attended to)."""
    seen = []
    for block in model.blocks:
        attn = block.attn
        def hook(module, args, output, attn=attn):
            seen.append([args[0].view(*args[0].shape[:2], attn.num_heads, attn.head_dim).transpose(1, 2)])
        block.attn.proj.register_forward_hook(hook)
        block.attn.register_forward_hook(lambda module, args, output: seen[-1].append(output[1]))
    with torch.no_grad():
        model(idx)
    return [tuple(pair) for pair in seen]


def test_exclusive_self_attention_output_is_orthogonal_to_the_tokens_own_value():
    cfg = small_config(xsa_last_layers=2, value_residual_alpha=0.9, attn_output_gate=True)
    model = trained_looking(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    outputs = attention_outputs(model, idx)
    group = cfg.num_heads // cfg.num_kv_heads
    for layer, (y, v) in enumerate(outputs):
        own = F.normalize(v, dim=-1).repeat_interleave(group, dim=1)  # query head h reads KV head h // group
        along_own = (y * own).sum(-1).abs()  # (B, H, T); a token's first position attends only to itself
        if layer == 0:  # not exclusive: attention to itself leaves a large component along its own value
            assert (along_own / y.norm(dim=-1)).mean() > 0.1
        else:
            assert along_own.max() < 1e-5 * y.norm(dim=-1).max(), layer
    # a head's output is orthogonal to its own KV head's value, not to another head's
    y, v = outputs[-1]
    other = F.normalize(v, dim=-1).flip(1).repeat_interleave(group, dim=1)
    assert ((y * other).sum(-1) / y.norm(dim=-1)).abs().mean() > 0.05


def test_exclusion_removes_only_the_own_value_component():
    y, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8)
    out = train_gpt.exclude_own_value(y, v)
    own = F.normalize(v, dim=-1).repeat_interleave(2, dim=1)
    removed = y - out
    assert torch.allclose(removed, (y * own).sum(-1, keepdim=True) * own, atol=1e-6)
    assert torch.allclose((out * own).sum(-1), torch.zeros(2, 4, 5), atol=1e-5)


def test_the_look_back_at_a_bos_reads_nothing_from_the_previous_document():
    """SmearGate and BigramHash look one token back; at a document's BOS there is nothing to look at: the
    embedding path's output at and after the BOS is the same whatever the previous document holds."""
    cfg = small_config()
    model = trained_looking(cfg)
    smeared = []
    model.smear.register_forward_hook(lambda module, args, output: smeared.append(output))
    gen = torch.Generator().manual_seed(2)
    doc = torch.randint(2, cfg.vocab_size, (9,), generator=gen)
    sequences = [torch.cat((torch.tensor([BOS_ID]), torch.randint(2, cfg.vocab_size, (6,), generator=gen),
                            torch.tensor([BOS_ID]), doc)) for _ in range(3)]
    with torch.no_grad():
        model(torch.stack(sequences))
    out, bos = smeared[-1], 7
    assert not torch.allclose(out[0, :bos], out[1, :bos])  # the previous documents differ
    for i in (1, 2):
        assert torch.equal(out[0, bos:], out[i, bos:])
    assert int(model.bigram.buckets(torch.stack(sequences))[0, bos]) == 0  # as a window's first position
    # the same document after a BOS at the window's start reads exactly what it reads mid-window
    with torch.no_grad():
        model(torch.cat((torch.tensor([BOS_ID]), doc))[None])
    assert torch.allclose(smeared[-1][0], out[0, bos:], atol=1e-6)


def test_partial_rope_rotates_only_its_dims_and_layer_norm_scale_follows_depth():
    rotary = train_gpt.Rotary(8, 10000.0)
    x = torch.randn(1, 2, 6, 32)
    y = rotary(x)
    assert torch.equal(y[..., 8:], x[..., 8:]) and not torch.allclose(y[..., :8], x[..., :8])
    assert torch.allclose(y[..., :8].norm(dim=-1), x[..., :8].norm(dim=-1), atol=1e-5)  # a rotation
    model = GPT(small_config(layer_norm_scale=True, rope_dims=8))
    assert [slot.norm_scale for slot in model.slots] == pytest.approx([1.0, 2**-0.5, 3**-0.5])
    assert all(b.attn.rotary.dims == 8 for b in model.blocks)
    with pytest.raises(train_gpt.InputError, match="ROPE_DIMS"):
        GPT(small_config(rope_dims=7))


def test_longer_evaluation_windows_rescale_the_rotated_width():
    """eval_final's NTK rescale of RoPE's base uses the width RoPE rotates (ROPE_DIMS), not the head's."""
    assert eval_final.ntk_rope_base(small_config(rope_dims=8), 512, 256) == pytest.approx(10000.0 * 2 ** (8 / 6))
    assert eval_final.ntk_rope_base(small_config(rope_dims=0), 512, 256) == pytest.approx(10000.0 * 2 ** (16 / 14))


def test_value_residual_mixes_the_first_blocks_values_and_alpha_one_is_off():
    cfg = small_config(value_residual_alpha=0.75)
    model = trained_looking(cfg)
    idx = torch.randint(0, cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(3))
    values = [v for _, v in attention_outputs(model, idx)]
    x = []
    model.blocks[1].attn.register_forward_pre_hook(lambda module, args: x.append(args[0]))
    with torch.no_grad():
        model(idx)
        attn = model.blocks[1].attn
        own = attn.c_v(x[-1]).view(1, 12, cfg.num_kv_heads, attn.head_dim).transpose(1, 2)
    assert torch.allclose(values[1], 0.75 * own + 0.25 * values[0], atol=1e-5)
    off = trained_looking(small_config(value_residual_alpha=1.0))
    assert all(b.attn.first_value_share == 0 for b in off.blocks)


def test_attention_output_gate_starts_nearly_open_and_leaky_mlp_passes_negatives():
    model = GPT(small_config(attn_output_gate=True))
    gate = torch.sigmoid(model.blocks[0].attn.gate_bias)
    assert torch.allclose(gate, torch.full_like(gate, 0.8808), atol=1e-4)
    assert train_gpt.optimizer_group("blocks.0.attn.gate_weight", model.blocks[0].attn.gate_weight)[0] == "controls"
    mlp = train_gpt.MLP(small_config(mlp_leaky_slope=0.5))
    with torch.no_grad():
        mlp.fc.weight.copy_(-torch.eye(mlp.fc.weight.size(0), mlp.fc.weight.size(1)))
        mlp.proj.weight.copy_(torch.eye(mlp.proj.weight.size(0), mlp.proj.weight.size(1)))
        out = mlp(torch.ones(1, mlp.fc.weight.size(1)))
    assert torch.allclose(out, torch.full_like(out, 0.25))  # leaky_relu(-1, 0.5)^2; relu^2 would give 0


def test_the_moving_average_follows_its_decay():
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.zero_()
    ema = train_gpt.MovingAverage(model, 0.9)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)
    ema.update(model)
    assert torch.allclose(ema.state["weight"], torch.full((2, 3), 1 - 0.9**2))


def test_the_artifact_rebuilds_the_recipe_it_was_trained_with():
    cfg = small_config(**ALL_ON)
    model = trained_looking(cfg)
    blob = train_gpt.pack_artifact(model.state_dict(), {"model_config": dataclasses.asdict(cfg)}, zstd_level=3)
    artifact = train_gpt.unpack_artifact(blob, "<memory>")
    assert artifact.model_config == cfg  # every architecture setting, from the artifact alone
    rebuilt = eval_final.model_from_artifact(artifact, "<memory>", torch.device("cpu"))
    reference = GPT(cfg)
    reference.load_state_dict(artifact.state)
    idx = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(rebuilt(idx), reference(idx))
    # an artifact written before the recipe settings existed rebuilds the model it was trained as
    old = {k: v for k, v in dataclasses.asdict(small_config()).items() if k not in ALL_ON}
    rebuilt_old = train_gpt.Artifact({}, {"model_config": old}, {}).model_config
    assert rebuilt_old == dataclasses.replace(small_config(), mlp_leaky_slope=0.0, xsa_last_layers=0, rope_dims=0,
                                              layer_norm_scale=False, attn_output_gate=False, value_residual_alpha=1.0)
