"""bench/row_order.py's claims (docs/export_sizes.md): its nearest-neighbour order is a permutation that keeps near
rows together, and the MLP's hidden units are a symmetry of the model, so reordering them needs no stored
permutation (mlp.fc's rows and mlp.proj's columns together; either alone changes the outputs)."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from conftest import tiny_gpt  # noqa: E402
from row_order import nearest_neighbour_order  # noqa: E402


def test_the_nearest_neighbour_order_is_a_permutation_that_walks_near_rows_in_turn():
    g = torch.Generator().manual_seed(0)
    centres = torch.randint(-30, 30, (4, 16), generator=g)
    rows = torch.cat([c + torch.randint(-1, 2, (5, 16), generator=g) for c in centres])  # 4 clusters of 5 rows
    shuffled = rows[torch.randperm(rows.size(0), generator=g)]
    order = nearest_neighbour_order(shuffled)
    assert sorted(order.tolist()) == list(range(rows.size(0)))
    walked = shuffled[order].float()
    steps = (walked[1:] - walked[:-1]).abs().sum(1)
    assert int((steps > 20).sum()) == 3  # one jump between each pair of clusters; the model order has many more
    given = (shuffled[1:] - shuffled[:-1]).abs().sum(1).float()
    assert int((given > 20).sum()) > 3


def test_the_mlp_hidden_units_are_a_symmetry_fc_rows_with_proj_columns_and_neither_alone():
    model = tiny_gpt(64, seed=3)
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(tokens)
        state = {n: t.clone() for n, t in model.state_dict().items()}
        g = torch.Generator().manual_seed(2)
        for i, block in enumerate(model.blocks):
            perm = torch.randperm(block.mlp.fc.weight.size(0), generator=g)
            block.mlp.fc.weight.copy_(state[f"blocks.{i}.mlp.fc.weight"][perm])
            block.mlp.proj.weight.copy_(state[f"blocks.{i}.mlp.proj.weight"][:, perm])
        both = model(tokens)
        model.load_state_dict(state)
        model.blocks[0].mlp.fc.weight.copy_(state["blocks.0.mlp.fc.weight"][perm])  # rows alone: not a symmetry
        fc_only = model(tokens)
    assert torch.allclose(both, reference, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(fc_only, reference, atol=1e-3, rtol=1e-3)
