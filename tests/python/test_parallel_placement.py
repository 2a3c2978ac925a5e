"""Expert placement by load (turbomoe.parallel.placement)."""

from __future__ import annotations

import pytest
import torch

from turbomoe.parallel.placement import plan_placement, rank_loads


@pytest.mark.parametrize(("experts", "ranks"), [(8, 1), (8, 2), (8, 8), (128, 4), (128, 8)])
def test_placement_is_a_permutation_with_equal_blocks(experts: int, ranks: int) -> None:
    rows = torch.randint(0, 50, (experts,), generator=torch.Generator().manual_seed(experts))
    slot = plan_placement(rows, ranks)
    assert sorted(slot.tolist()) == list(range(experts))
    owners = torch.bincount(slot // (experts // ranks), minlength=ranks)
    assert owners.tolist() == [experts // ranks] * ranks
    # Placing moves rows between ranks but loses none.
    assert float(rank_loads(rows, ranks, slot).sum()) == float(rows.sum())


def test_placement_spreads_hot_experts() -> None:
    # Experts 0-3 hot (contiguous blocks put them all on rank 0), the rest cold.
    rows = torch.tensor([100, 90, 80, 70, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0])
    blocks = rank_loads(rows, 4)
    assert blocks.tolist() == [340.0, 4.0, 0.0, 0.0]
    placed = rank_loads(rows, 4, plan_placement(rows, 4))
    # One hot expert each; the 1-row experts go to the least-loaded rank with room: rank of 70
    # takes three (then it is full), the rank of 80 the fourth; the empty ones fill the rest.
    assert sorted(placed.tolist()) == [73.0, 81.0, 90.0, 100.0]
    slot = plan_placement(rows, 4)
    assert len({int(s) // 4 for s in slot[:4]}) == 4


def test_placement_is_deterministic_and_identity_for_equal_loads() -> None:
    rows = torch.full((8,), 5)
    # Equal loads: experts in index order fill the least-loaded rank first, rank by rank.
    slot = plan_placement(rows, 2)
    assert torch.equal(slot, plan_placement(rows.clone(), 2))
    assert rank_loads(rows, 2, slot).tolist() == [20.0, 20.0]


def test_placement_balances_model_like_routing() -> None:
    # Like the bench model's routing: a shared per-expert bias, most experts empty.
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(128, generator=gen) * 3.0 + torch.randn(4096, 128, generator=gen)
    rows = torch.bincount(logits.topk(8, dim=-1).indices.reshape(-1), minlength=128)
    for ranks in (4, 8):
        mean = float(rows.sum()) / ranks
        blocks = float(rank_loads(rows, ranks).max()) / mean
        placed = float(rank_loads(rows, ranks, plan_placement(rows, ranks)).max()) / mean
        assert placed < blocks
        # Within the largest expert's share of the mean (LPT's bound with equal capacity).
        assert placed <= 1.0 + float(rows.max()) / mean


@pytest.mark.parametrize(
    ("rows", "ranks", "message"),
    [
        (torch.ones(2, 4), 2, "must be \\[E\\]"),
        (torch.ones(6), 4, "cannot be split evenly"),
        (torch.tensor([1.0, -1.0]), 2, "non-negative"),
        (torch.tensor([1.0, float("nan")]), 2, "finite"),
    ],
)
def test_placement_rejects_bad_input(rows: torch.Tensor, ranks: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plan_placement(rows, ranks)
