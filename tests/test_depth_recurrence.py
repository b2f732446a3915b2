"""Depth recurrence (docs/depth_recurrence.md): a looped model is the unrolled model whose repeated blocks hold
copies of the same weights, forward and backward; the virtual order is #1855's; the recipe reads virtual depth."""

import dataclasses

import pytest
import torch

import train_gpt
from test_recipe import ALL_ON, small_config, trained_looking
from train_gpt import GPT, InputError, ModelConfig, Settings

LOOPED = dict(num_layers=4, num_loops=2, loop_start=1, loop_end=2)  # 0,1,2,1,2,1,2,3: 8 virtual layers


def test_the_order_is_the_records_and_the_plain_stack_when_off():
    cfg = dataclasses.replace(ModelConfig.from_settings(Settings()), num_loops=2, loop_start=3, loop_end=5)
    order = cfg.layer_order()
    assert order[:8] == (0, 1, 2, 3, 4, 5, 3, 4) and order[8:] == (5, 3, 4, 5, 6, 7, 8, 9, 10)  # #1855's halves
    assert cfg.layer_order(looped=False) == tuple(range(11)) == ModelConfig.from_settings(Settings()).layer_order()
    model = GPT(cfg)
    assert model.looping and model.skip_weights.shape[0] == 8  # 8 looped, of which the plain order uses 5
    assert dataclasses.replace(cfg, num_loops=1, loop_start=0, loop_end=10).layer_order() == tuple(range(11)) * 2


def unrolled(looped: GPT, order: tuple[int, ...]) -> GPT:
    """A plain model of len(order) blocks, block j a copy of the looped model's block order[j]."""
    cfg = dataclasses.replace(looped.cfg, num_layers=len(order), num_loops=0, loop_start=0, loop_end=-1)
    model = GPT(cfg)
    state = {n: t for n, t in looped.state_dict().items() if not n.startswith("blocks.")}
    for j, b in enumerate(order):
        state |= {f"blocks.{j}.{n}": t.clone() for n, t in looped.blocks[b].state_dict().items()}
    model.load_state_dict(state)
    return model


def loss_and_grads(model: GPT, idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = model(idx[:, :-1], idx[:, 1:])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("recipe", [{}, ALL_ON], ids=["plain_recipe", "recipe_all_on"])
def test_a_looped_model_is_the_unrolled_model_with_shared_weights(recipe):
    looped = trained_looking(small_config(**LOOPED, **recipe))
    order = looped.cfg.layer_order()
    assert order == (0, 1, 2, 1, 2, 1, 2, 3)
    idx = torch.randint(0, looped.cfg.vocab_size, (2, 25), generator=torch.Generator().manual_seed(5))
    loss, grads = loss_and_grads(looped, idx)
    copy = unrolled(looped, order)
    copy_loss, copy_grads = loss_and_grads(copy, idx)
    assert torch.allclose(loss, copy_loss, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        if name.startswith("blocks."):  # a shared block's gradient: the sum over its copies
            b, rest = name.split(".", 2)[1:]
            grad_of_copies = sum(copy_grads[f"blocks.{j}.{rest}"] for j, p in enumerate(order) if p == int(b))
        else:
            grad_of_copies = copy_grads[name]
        assert torch.allclose(grad, grad_of_copies, rtol=1e-4, atol=1e-6), name
    # the variants that break the rule fail: another order, or copies that do not share the weights
    wrong = (0, 1, 2, 2, 1, 1, 2, 3)
    assert not torch.allclose(loss, loss_and_grads(unrolled(looped, wrong), idx)[0], rtol=1e-4)
    unshared = unrolled(looped, order)
    with torch.no_grad():
        for p in unshared.blocks[3].parameters():  # the second pass over block 1 gets weights of its own
            p.add_(0.1 * torch.randn_like(p))
    assert not torch.allclose(loss, loss_and_grads(unshared, idx)[0], rtol=1e-4)


def test_the_plain_order_of_a_looped_model_is_the_plain_model():
    looped = trained_looking(small_config(**LOOPED, **ALL_ON))
    looped.looping = False
    plain = GPT(small_config(num_layers=4, **ALL_ON))
    state = looped.state_dict()
    plain.load_state_dict(state | {"skip_weights": state["skip_weights"][:2]})  # the plain order's first skips
    idx = torch.randint(0, looped.cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.allclose(looped(idx), plain(idx), atol=1e-5)
        looped.looping = True
        assert not torch.allclose(looped(idx), plain(idx), atol=1e-3)


@pytest.mark.parametrize("overrides,fragment", [
    (dict(num_loops=2), "needs a span"), (dict(num_loops=1, loop_start=3, loop_end=11), "needs a span"),
    (dict(num_loops=1, loop_start=4, loop_end=3), "needs a span"), (dict(loop_start=3, loop_end=5), "loop nothing"),
])
def test_a_loop_without_a_span_or_a_span_without_a_loop_is_refused(overrides, fragment):
    cfg = dataclasses.replace(ModelConfig.from_settings(Settings()), **overrides)
    with pytest.raises(InputError, match=fragment):
        train_gpt.validate_model_config(cfg)


@pytest.mark.parametrize("loop_at,qat_at,expected", [
    (0.35, 0.75, [(False, False), (True, False), (True, True)]),  # #1855's switch before QAT: three phases
    (0.8, 0.75, [(False, False), (False, True), (True, True)]),
    (0.0, 0.75, [(True, False), (True, True)]),  # looped from the start: no plain graph to warm
    (0.5, 0.5, [(False, False), (True, True)]),
])
def test_the_warm_up_visits_every_phase_training_passes_through_in_order(loop_at, qat_at, expected):
    s = dataclasses.replace(Settings(), num_loops=1, loop_start=1, loop_end=2, enable_looping_at=loop_at,
                            qat_start_frac=qat_at)
    assert train_gpt.warmup_phases(s) == expected
    assert [train_gpt.training_phase(s, p) for p in (0.0, 0.999)] == [expected[0], expected[-1]]
    assert train_gpt.warmup_phases(dataclasses.replace(s, num_loops=0)) == [(False, False), (False, True)]  # as before


def test_a_looping_switch_without_a_loop_is_noted_not_dropped():
    notes = train_gpt.unused_setting_notes(train_gpt.Settings(enable_looping_at=0.35))
    assert any(n.startswith("note unused:ENABLE_LOOPING_AT=0.35 # NUM_LOOPS=0") for n in notes), notes
    looped = train_gpt.Settings(enable_looping_at=0.35, num_loops=1, loop_start=1, loop_end=2)
    assert not any("ENABLE_LOOPING_AT" in n for n in train_gpt.unused_setting_notes(looped))
