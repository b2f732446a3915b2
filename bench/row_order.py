"""
row_order.py: what reordering the rows of each stored group saves, measured on a model's integers.

    python bench/row_order.py FLOAT_STATE            # a state kept by bench/keep_float_state.py (CPU-trained)
    python bench/row_order.py trained_like:1024:3    # trained-like Student-t rows (tests' trained_like_state)

Per group (quantize.weight_group: layers concatenated, as the version 4 artifact stores them) and grid (GRIDS: #1855's
rule and the ladder's int6 row max / 31, int8 for the embedding; rounded to nearest: the ordering acts on the integers, whichever rounding made
them), the group's int8 integers compressed by zstd at ZSTD_LEVEL (default 22) and by xz (-9e), rows as stored and
transposed, in the model's row order and in a nearest-neighbour order of each matrix's rows (greedy: from row 0, the
nearest unvisited row by L1 distance between integer rows).

A permutation costs nothing where the model has a symmetry that absorbs it: the MLP's hidden units (mlp.fc's rows
with mlp.proj's columns, one order per layer, chosen on fc's rows and applied to both: the proj row of the table is
that order applied to proj's columns). Elsewhere it would be stored: ceil(log2(rows)) bits a row, counted in the
`perm_bytes` field. The lines: one `row_order` line per (grid, group, codec) with the plain-order and reordered
bytes in both orientations, the best of each, and the saving net of the permutation.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
for folder in (REPO, REPO / "tests"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import allocation  # noqa: E402
import artifact  # noqa: E402
import quantize  # noqa: E402
import train_gpt  # noqa: E402

LEVEL = int(os.environ.get("ZSTD_LEVEL", "22"))
CODECS = tuple(os.environ.get("CODECS", "zstd,lzma").split(","))
GRIDS = tuple(os.environ.get("GRIDS", "rule_1855,int6_rowmax").split(","))


def nearest_neighbour_order(rows: torch.Tensor) -> torch.Tensor:
    """A greedy nearest-neighbour path through the rows (L1 distance), from row 0."""
    x = rows.float()
    distance = torch.cdist(x, x, p=1)
    distance.fill_diagonal_(float("inf"))
    order, current = [0], 0
    distance[:, 0] = float("inf")
    for _ in range(x.size(0) - 1):
        current = int(distance[current].argmin())
        order.append(current)
        distance[:, current] = float("inf")
    return torch.tensor(order)


def load_state(source: str) -> dict[str, torch.Tensor]:
    if source.startswith("trained_like:"):
        from test_model_and_quant import trained_like_state
        _, vocab, mult = source.split(":")
        cfg = train_gpt.ModelConfig.from_settings(train_gpt.Settings(vocab_size=int(vocab), mlp_mult=int(mult)))
        return trained_like_state(cfg)
    return torch.load(source, weights_only=False)["state"]


def compressed(mats: list[torch.Tensor], transposed: bool, codec: str) -> int:
    raw = b"".join(artifact.stored_bytes(m, transposed) for m in mats)
    return len(artifact.CODECS[codec][0](raw, LEVEL))


def main(source: str) -> None:
    torch.set_num_threads(int(os.environ.get("THREADS", "1")))  # here, not at import: the tests import this module
    state = load_state(source)
    groups = allocation.grouped_names(state)
    print(f"row_order_model source:{source} params:{sum(t.numel() for t in state.values())} zstd_level:{LEVEL} "
          f"codecs:{','.join(CODECS)}", flush=True)
    totals: dict[tuple[str, str], list[int]] = {}
    for grid_name in GRIDS:
        ints = {}
        for g, names in groups.items():
            grid = quantize.Grid(6) if grid_name == "int6_rowmax" else quantize.rule_1855(g)
            if g == "tok_emb" and grid_name == "int6_rowmax":
                grid = quantize.Grid(8)  # the ladder's first integer rung for the embedding (embed_int8)
            for n in names:
                ints[n] = quantize.quantize_rows(state[n].float(), grid.bits, grid.step)[0]
        t0 = time.perf_counter()
        orders = {n: nearest_neighbour_order(ints[n]) for names in groups.values() for n in names
                  if quantize.weight_group(n) != "mlp_proj"}
        for n in [n for n in ints if quantize.weight_group(n) == "mlp_proj"]:
            orders[n] = orders[n.replace(".proj.", ".fc.")]  # the hidden units: fc's order, free
        order_ms = 1000 * (time.perf_counter() - t0)
        for g, names in groups.items():
            plain = [ints[n] for n in names]
            if g == "mlp_proj":  # proj's columns are the hidden units: reorder columns, i.e. rows of the transpose
                ordered = [ints[n][:, orders[n]] for n in names]
            else:
                ordered = [ints[n][orders[n]] for n in names]
            free = g in ("mlp_fc", "mlp_proj")
            perm_bytes = 0 if free else sum(math.ceil(ints[n].size(0) * math.ceil(math.log2(ints[n].size(0))) / 8)
                                            for n in names)
            for codec in CODECS:
                t1 = time.perf_counter()
                sizes = {(o, t): compressed(m, t, codec) for o, m in (("model", plain), ("nn", ordered))
                         for t in (False, True)}
                best_plain, best_nn = min(sizes[("model", False)], sizes[("model", True)]), \
                    min(sizes[("nn", False)], sizes[("nn", True)])
                net = best_plain - best_nn - perm_bytes
                totals.setdefault((grid_name, codec), [0, 0])
                totals[(grid_name, codec)][0] += best_plain
                totals[(grid_name, codec)][1] += best_plain - max(net, 0)
                numel = sum(ints[n].numel() for n in names)
                print(f"row_order grid:{grid_name} group:{g} codec:{codec} params:{numel} "
                      f"model_rows:{sizes[('model', False)]} model_transposed:{sizes[('model', True)]} "
                      f"nn_rows:{sizes[('nn', False)]} nn_transposed:{sizes[('nn', True)]} "
                      f"best_bits_per_param:{8 * best_plain / numel:.4f} perm_bytes:{perm_bytes} free:{int(free)} "
                      f"net_saving:{net} net_saving_pct:{100 * net / best_plain:.3f} "
                      f"ms:{1000 * (time.perf_counter() - t1):.0f}", flush=True)
        print(f"row_order_orders grid:{grid_name} order_ms:{order_ms:.0f}", flush=True)
    for (grid_name, codec), (before, after) in totals.items():
        print(f"row_order_total grid:{grid_name} codec:{codec} best_bytes:{before} with_reordering_where_it_saves:{after} "
              f"saving:{before - after} saving_pct:{100 * (before - after) / before:.3f}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
