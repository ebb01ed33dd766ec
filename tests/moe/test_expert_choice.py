"""Expert-choice routing: every expert takes exactly C tokens; a token gets 0..E experts."""

from __future__ import annotations

import torch

from damex.moe.dispatch import combine, dispatch
from damex.moe.expert_choice import expert_choice_capacity, plan_expert_choice


def test_every_expert_takes_exactly_c_tokens_per_group() -> None:
    g = torch.Generator().manual_seed(0)
    T, E = 30, 4
    scores = torch.softmax(torch.randn(T, E, generator=g) * 3, dim=-1)  # [T, E]
    group = torch.tensor([0] * 12 + [1] * 18)
    capacity = expert_choice_capacity(torch.tensor([12, 18]), num_experts=E, top_k=1,
                                      capacity_factor=0.0)  # fmt: skip
    assert capacity.tolist() == [3, 4]  # floor(12/4), floor(18/4)
    expert, gate, plan = plan_expert_choice(scores, group, 2, capacity)
    for gi, c in enumerate(capacity.tolist()):
        in_group = group == gi
        for e in range(E):
            taken = (plan.kept & (expert == e))[in_group].sum()
            assert int(taken) == c, (gi, e)
            # ... and they are the group's c highest-scoring tokens for that expert
            top = torch.topk(scores[in_group, e], c).indices
            chosen = torch.nonzero((plan.kept & (expert == e))[in_group].any(1)).flatten()
            assert sorted(chosen.tolist()) == sorted(top.tolist())
    assert plan.counts == [7] * E and plan.num_kept == 7 * E
    # each token's experts are ordered by its own descending score, gates are those scores
    assert torch.all(gate[:, :-1] >= gate[:, 1:])
    torch.testing.assert_close(gate, scores.gather(1, expert))


def test_a_token_may_get_zero_or_all_experts() -> None:
    T, E = 8, 4
    logits = torch.zeros(T, E)
    logits[0] = 5.0  # token 0 scores highest for every expert -> taken by all 4
    logits[1] = -5.0  # token 1 scores lowest everywhere -> taken by none
    logits[2:, :] = torch.randn(T - 2, E, generator=torch.Generator().manual_seed(1))
    scores = torch.softmax(logits, -1)
    scores[0] = 1.0  # above every softmax score of the others: the ranking is what matters
    capacity = expert_choice_capacity(torch.tensor([T]), num_experts=E, top_k=1,
                                      capacity_factor=1.0)  # fmt: skip
    assert capacity.tolist() == [2]
    _, _, plan = plan_expert_choice(scores, torch.zeros(T, dtype=torch.long), 1, capacity)
    per_token = plan.kept.sum(1)
    assert int(per_token[0]) == E and int(per_token[1]) == 0
    assert int(per_token.sum()) == E * 2


def test_combine_weights_are_the_scores_and_gradients_reach_them() -> None:
    g = torch.Generator().manual_seed(2)
    T, E, d = 10, 3, 5
    x = torch.randn(T, d, generator=g)
    logits = torch.randn(T, E, generator=g, requires_grad=True)
    scores = torch.softmax(logits, -1)
    capacity = expert_choice_capacity(torch.tensor([T]), num_experts=E, top_k=2,
                                      capacity_factor=1.0)  # fmt: skip
    assert capacity.tolist() == [6]  # c = 2 experts per token on average: floor(2 * 10 / 3)
    expert, gate, plan = plan_expert_choice(scores, torch.zeros(T, dtype=torch.long), 1, capacity)
    w = torch.randn(E, d, d, generator=g)
    routed = dispatch(x, plan)  # [N, d]
    out = torch.cat([routed[plan.expert == e] @ w[e] for e in range(E)])  # plan is expert-sorted
    y = combine(out, plan, gate, T)
    ref = torch.zeros(T, d)
    for t in range(T):
        for j in range(E):
            if plan.kept[t, j]:
                e = int(expert[t, j])
                ref[t] += scores[t, e] * (x[t] @ w[e])
    torch.testing.assert_close(y, ref)
    y.sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_capacity_never_exceeds_the_group() -> None:
    cap = expert_choice_capacity(torch.tensor([3, 1]), num_experts=2, top_k=2,
                                 capacity_factor=2.0)  # fmt: skip
    assert cap.tolist() == [3, 1]  # floor(4 * 3 / 2) = 6 -> 3 tokens exist; tiny group -> 1


def test_moe_layer_with_expert_choice_routing() -> None:
    from damex.moe import MoEFFN, RoutingStats

    torch.manual_seed(0)
    layer = MoEFFN(d_model=8, hidden_dim=16, num_experts=4, capacity_factor=0.0,
                   gate_noise=0.0, routing="expert_choice")  # fmt: skip
    x = torch.randn(12, 8)
    token_image = torch.tensor([0] * 6 + [1] * 6)
    y, info = layer(x, token_image)
    assert info.expert.shape == (12, 4) and info.kept.shape == (12, 4)
    for image in (0, 1):
        for e in range(4):  # C = floor(6 / 4) = 1 token per expert and image
            assert int((info.kept & (info.expert == e))[token_image == image].sum()) == 1
    # y = sum over the experts that took a token of score * expert(x)
    scores = torch.softmax(info.logits, -1)
    ref = torch.zeros_like(y)
    for t in range(12):
        for j in range(4):
            if info.kept[t, j]:
                e = int(info.expert[t, j])
                ref[t] += scores[t, e] * layer.experts[e](x[t : t + 1])[0]
    torch.testing.assert_close(y, ref)
    y.sum().backward()
    assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0
    stats = RoutingStats(1, 2, 4)
    stats.update([info], torch.tensor([0, 1]))
    assert int(stats.tokens.sum()) == 12
