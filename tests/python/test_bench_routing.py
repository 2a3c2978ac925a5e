"""The bench's routing record (turbomoe.bench.routing): counts from the experts calls, per-layer
figures, expert-parallel rank loads."""

from __future__ import annotations

import pytest
import torch

from turbomoe.bench.models import build_model, tiny_config
from turbomoe.bench.routing import describe, routing_summary, summarise
from turbomoe.parallel.routing_counts import RoutingRecorder
from turbomoe.parallel.shard import find_experts, global_experts


def test_summarise_per_layer_figures() -> None:
    table = torch.tensor(
        [
            [4.0, 4.0, 4.0, 4.0],  # even
            [13.0, 0.0, 0.0, 3.0],  # one hot expert, two empty
        ],
        dtype=torch.float64,
    )
    out = summarise(table, ep_sizes=(1, 2, 3, 4))
    assert out["layers"] == 2 and out["experts"] == 4
    assert out["largest_over_mean"] == [1.0, 13.0 / 4.0]  # 3.25 exactly
    assert out["empty_experts"] == [0, 2]
    # 1 rank says nothing and 3 does not divide 4 experts: only EP 2 and EP 4.
    assert set(out["ep_busiest_over_mean"]) == {"2", "4"}
    # EP 2 of the second layer: ranks hold 13 + 0 and 0 + 3 rows of 16, the mean is 8.
    assert out["ep_busiest_over_mean"]["2"] == [1.0, 13.0 / 8.0]  # 1.625 exactly
    assert out["ep_busiest_over_mean"]["4"] == out["largest_over_mean"]
    # Placed by load over 2 ranks: 13 alone against 3 + 0 + 0 still leaves 13 of a mean of 8;
    # over 4 ranks every expert has its own rank, so placement cannot change anything.
    assert out["ep_placed_busiest_over_mean"]["2"] == [1.0, 13.0 / 8.0]
    assert out["ep_placed_busiest_over_mean"]["4"] == out["ep_busiest_over_mean"]["4"]
    line = describe(out)
    assert "empty" in line and "EP 2 busiest rank" in line and "placed by load" in line


def test_summarise_placement_helps_where_blocks_are_uneven() -> None:
    table = torch.tensor([[9.0, 7.0, 1.0, 1.0]], dtype=torch.float64)  # blocks: 16 | 2
    out = summarise(table, ep_sizes=(2,))
    # Figures are rounded to 3 decimals.
    assert out["ep_busiest_over_mean"]["2"] == [pytest.approx(16.0 / 9.0, abs=1e-3)]
    assert out["ep_placed_busiest_over_mean"]["2"] == [pytest.approx(10.0 / 9.0, abs=1e-3)]


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_recorder_counts_every_routed_row_while_active(family: str) -> None:
    config = tiny_config(family, layers=2)
    model = build_model(
        config,
        device=torch.device("cpu"),
        dtype=torch.float32,
        seed=0,
        experts_implementation="grouped_mm",
    )
    recorder = RoutingRecorder(model)
    experts = global_experts(find_experts(model)[0][1])
    top_k = config.num_experts_per_tok
    ids = torch.randint(0, config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(ids)  # inactive: nothing is counted
        assert recorder.counts() is None
        recorder.active = True
        model(ids)
        recorder.active = False
        model(ids)
    table = recorder.counts()
    assert table is not None and table.shape == (2, experts)
    # Every token sends top_k rows to distinct experts, once per layer.
    assert table.sum(1).tolist() == [ids.numel() * top_k] * 2
    assert (table <= ids.numel()).all()
    recorder.close()
    recorder.active = True
    with torch.no_grad():
        model(ids)
    assert torch.equal(recorder.counts(), table)  # the hooks are gone


def test_recorder_without_experts_records_nothing() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    recorder = RoutingRecorder(model)
    recorder.active = True
    model(torch.randn(2, 4))
    assert recorder.counts() is None and routing_summary(recorder) is None


class _Experts(torch.nn.Module):
    def __init__(self, experts: int) -> None:
        super().__init__()
        self.gate_up_proj = torch.nn.Parameter(torch.zeros(experts, 2, 3))
        self.down_proj = torch.nn.Parameter(torch.zeros(experts, 3, 1))

    def forward(
        self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        return hidden


class _Model(torch.nn.Module):
    def __init__(self, experts: int) -> None:
        super().__init__()
        self.experts = _Experts(experts)


def test_recorder_skips_dropped_slots_and_takes_keyword_calls() -> None:
    model = _Model(experts=4)
    recorder = RoutingRecorder(model)
    recorder.active = True
    hidden = torch.zeros(3, 3)
    index = torch.tensor([[0, 3], [3, 4], [4, 1]])  # 4: a dropped slot's sentinel id
    model.experts(hidden, index, torch.ones(3, 2))
    model.experts(hidden, top_k_index=index, top_k_weights=torch.ones(3, 2))
    table = recorder.counts()
    assert table is not None
    assert table.tolist() == [[2.0, 2.0, 0.0, 4.0]]  # two calls of one layer, sentinels dropped
