"""Capacity, batch-prioritized slot assignment, dispatch and combine."""

from __future__ import annotations

import pytest
import torch

from damex.moe import MoEFFN, capacity_per_group, combine, dispatch, group_index, plan_dispatch


def test_capacity_closed_form() -> None:
    sizes = torch.tensor([900, 1100, 3])
    cap = capacity_per_group(sizes, num_experts=8, top_k=1, capacity_factor=1.25)
    # floor(1.25 * 900 / 8) = floor(140.625); floor(1.25 * 1100 / 8) = floor(171.875); tiny -> 1
    assert cap.tolist() == [140, 171, 1]
    cap2 = capacity_per_group(torch.tensor([100]), num_experts=4, top_k=2, capacity_factor=1.0)
    assert cap2.tolist() == [50]
    assert capacity_per_group(sizes, num_experts=8, top_k=1, capacity_factor=0.0) is None
    neg = capacity_per_group(sizes, num_experts=8, top_k=1, capacity_factor=-1.25)
    assert torch.equal(neg, cap)


def test_group_index_remaps_arbitrary_image_ids() -> None:
    group, n = group_index(torch.tensor([5, 5, 2, 9, 2]), 5, "image", torch.device("cpu"))
    assert n == 3 and group.tolist() == [1, 1, 0, 2, 0]
    group, n = group_index(torch.tensor([5, 5, 2]), 3, "batch", torch.device("cpu"))
    assert n == 1 and group.tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="capacity_group"):
        group_index(None, 3, "dataset", torch.device("cpu"))


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("group_mode", ["image", "batch"])
def test_dropped_count_matches_closed_form(top_k: int, group_mode: str) -> None:
    torch.manual_seed(0)
    num_experts, cf = 4, 1.0
    layer = MoEFFN(
        d_model=8,
        hidden_dim=16,
        num_experts=num_experts,
        top_k=top_k,
        capacity_factor=cf,
        capacity_group=group_mode,
    )
    token_image = torch.tensor([0] * 30 + [1] * 13 + [2] * 21)
    x = torch.randn(len(token_image), 8) * 3
    _, info = layer(x, token_image)
    groups = token_image if group_mode == "image" else torch.zeros_like(token_image)
    expected_dropped = 0
    for g in groups.unique():
        sel = groups == g
        cap = max(1, int(cf * top_k * int(sel.sum()) // num_experts))
        load = torch.bincount(info.expert[sel].reshape(-1), minlength=num_experts)
        expected_dropped += int((load - cap).clamp_min(0).sum())
    assert expected_dropped > 0  # the case must actually exercise the limit
    assert int((~info.kept).sum()) == expected_dropped


def test_batch_prioritized_routing_keeps_highest_gates() -> None:
    # 6 tokens all on expert 0 (of 2), one group; capacity floor(1 * 6 / 2) = 3.
    expert = torch.zeros(6, 1, dtype=torch.long)
    gate = torch.tensor([[0.6], [0.9], [0.55], [0.95], [0.7], [0.8]])
    group = torch.zeros(6, dtype=torch.long)
    cap = capacity_per_group(torch.tensor([6]), num_experts=2, top_k=1, capacity_factor=1.0)
    plan = plan_dispatch(expert, gate, group, 1, 2, cap)
    assert plan.kept[:, 0].tolist() == [False, True, False, True, False, True]
    assert plan.slot[:, 0].tolist() == [4, 1, 5, 0, 3, 2]
    assert plan.token.tolist() == [3, 1, 5]
    assert plan.counts == [3, 0]


def test_bpr_in_layer_keeps_top_scoring_tokens_per_bucket() -> None:
    torch.manual_seed(1)
    layer = MoEFFN(d_model=8, hidden_dim=8, num_experts=3, capacity_factor=0.5).eval()
    token_image = torch.arange(60) // 20
    _, info = layer(torch.randn(60, 8) * 4, token_image)
    for img in range(3):
        for e in range(3):
            sel = (token_image == img) & (info.expert[:, 0] == e)
            kept_g = info.gate[sel & info.kept[:, 0], 0]
            drop_g = info.gate[sel & ~info.kept[:, 0], 0]
            assert len(kept_g) <= max(1, int(0.5 * 20 / 3))
            if len(drop_g) and len(kept_g):
                assert kept_g.min() >= drop_g.max()


def test_first_choices_have_priority_over_second_choices() -> None:
    # Expert 0 receives token 0's second choice (gate 0.45) and token 1's first (gate 0.4).
    expert = torch.tensor([[1, 0], [0, 1]])
    gate = torch.tensor([[0.5, 0.45], [0.4, 0.3]])
    plan = plan_dispatch(expert, gate, torch.zeros(2, dtype=torch.long), 1, 2, torch.tensor([1]))
    assert plan.kept.tolist() == [[True, False], [True, False]]


def test_dispatch_combine_roundtrip_and_ordering() -> None:
    torch.manual_seed(2)
    num_tokens, k, num_experts = 12, 2, 4
    scores = torch.rand(num_tokens, num_experts).softmax(-1)
    gate, expert = scores.topk(k, dim=-1)
    plan = plan_dispatch(expert, gate, torch.zeros(num_tokens, dtype=torch.long), 1, 4, None)
    assert plan.kept.all() and plan.num_kept == num_tokens * k
    assert torch.all(plan.expert[1:] >= plan.expert[:-1])
    assert plan.counts == torch.bincount(expert.reshape(-1), minlength=4).tolist()
    x = torch.randn(num_tokens, 5)
    routed = dispatch(x, plan)
    assert torch.equal(routed, x[plan.token])
    # identity experts: combine gives sum_j gate_j * x
    y = combine(routed, plan, gate, num_tokens)
    torch.testing.assert_close(y, x * gate.sum(-1, keepdim=True))


def test_negative_capacity_factor_equals_positive() -> None:
    torch.manual_seed(3)
    a = MoEFFN(d_model=8, hidden_dim=8, num_experts=4, capacity_factor=1.25).eval()
    b = MoEFFN(d_model=8, hidden_dim=8, num_experts=4, capacity_factor=-1.25).eval()
    b.load_state_dict(a.state_dict())
    x, ti = torch.randn(40, 8) * 3, torch.arange(40) // 10
    (ya, ia), (yb, ib) = a(x, ti), b(x, ti)
    assert (~ia.kept).any()
    assert torch.equal(ia.kept, ib.kept)
    torch.testing.assert_close(ya, yb, rtol=0, atol=0)
