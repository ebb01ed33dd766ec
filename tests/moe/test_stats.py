"""RoutingStats: counting, merging, serialization."""

from __future__ import annotations

import json

import pytest
import torch

from damex.moe import MoEFFN, RoutingInfo, RoutingStats


def _infos(
    seed: int, num_images: int, layers: list[MoEFFN]
) -> tuple[list[RoutingInfo], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    token_image = torch.arange(num_images).repeat_interleave(7)
    x = torch.randn(len(token_image), 8, generator=g) * 3
    infos = [layer(x, token_image)[1] for layer in layers]
    return infos, torch.randint(0, 3, (num_images,), generator=g)


def _layers() -> list[MoEFFN]:
    torch.manual_seed(0)
    return [
        MoEFFN(d_model=8, hidden_dim=8, num_experts=4, top_k=2, capacity_factor=0.5)
        for _ in range(2)
    ]


def _concat(a: list[RoutingInfo], b: list[RoutingInfo], shift: int) -> list[RoutingInfo]:
    out = []
    for x, y in zip(a, b):
        out.append(
            RoutingInfo(
                logits=torch.cat([x.logits, y.logits]),
                noisy_logits=None,
                expert=torch.cat([x.expert, y.expert]),
                gate=torch.cat([x.gate, y.gate]),
                kept=torch.cat([x.kept, y.kept]),
                token_image=torch.cat([x.token_image, y.token_image + shift]),
            )
        )
    return out


def test_counts_closed_form() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 3.0]])
    info = RoutingInfo(
        logits=logits,
        noisy_logits=None,
        expert=torch.tensor([[0], [1], [1]]),
        gate=torch.ones(3, 1),
        kept=torch.tensor([[True], [False], [True]]),
        token_image=torch.tensor([0, 1, 1]),
    )
    stats = RoutingStats(1, 2, 2, expert_map=[0, 0])
    stats.update([info], image_dataset=torch.tensor([0, 1]))
    assert stats.tokens.tolist() == [[1, 2]]
    assert stats.top1.tolist() == [[[1, 0], [0, 2]]]
    assert stats.dropped.tolist() == [[[0, 0], [0, 1]]]
    assert stats.correct.tolist() == [[1, 0]]
    assert stats.accuracy().tolist() == pytest.approx([1 / 3])
    assert stats.drop_rate().tolist() == [[0.0, 0.5]]
    entropy = lambda z: float(-(torch.softmax(z, 0) * torch.log_softmax(z, 0)).sum())  # noqa: E731
    assert stats.mean_entropy()[0, 1].item() == pytest.approx(
        (entropy(logits[1]) + entropy(logits[2])) / 2
    )
    # masks and dataset -1 skip tokens
    stats2 = RoutingStats(1, 2, 2)
    stats2.update([info], torch.tensor([-1, 1]), [torch.tensor([True, True, False])])
    assert stats2.tokens.tolist() == [[0, 1]] and stats2.accuracy() is None


def test_merge_equals_concatenation_and_roundtrip() -> None:
    layers = _layers()
    infos_a, ds_a = _infos(1, 3, layers)
    infos_b, ds_b = _infos(2, 2, layers)
    emap = [0, 3, 1]
    s_a, s_b, s_ab, s_seq = (RoutingStats(2, 3, 4, emap) for _ in range(4))
    s_a.update(infos_a, ds_a)
    s_b.update(infos_b, ds_b)
    s_ab.update(_concat(infos_a, infos_b, 3), torch.cat([ds_a, ds_b]))
    s_seq.update(infos_a, ds_a)
    s_seq.update(infos_b, ds_b)
    merged = s_a.merge_(s_b)
    for other in (s_ab, s_seq):
        for name in ("tokens", "top1", "assigned", "dropped", "correct"):
            assert torch.equal(getattr(merged, name), getattr(other, name)), name
        torch.testing.assert_close(merged.entropy_sum, other.entropy_sum)
    assert merged.dropped.sum() > 0 and merged.tokens.sum() == 2 * 5 * 7
    restored = RoutingStats.from_dict(json.loads(json.dumps(merged.to_dict())))
    assert torch.equal(restored.top1, merged.top1)
    assert torch.equal(restored.entropy_sum, merged.entropy_sum)
    assert restored.expert_map.tolist() == emap
    json.dumps(merged.summary())
    with pytest.raises(ValueError, match="expert maps"):
        merged.merge_(RoutingStats(2, 3, 4))
    with pytest.raises(ValueError, match="missing key"):
        RoutingStats.from_dict({"num_layers": 1})


# ------------------------------------------------------------------ order-free routing metrics


def test_best_assignment_scores_a_permuted_diagonal_100_and_uniform_1_over_e() -> None:
    import numpy as np

    from damex.moe.stats import best_assignment

    perm = [2, 0, 3, 1]
    diag = np.zeros((4, 4))
    diag[np.arange(4), perm] = [50, 10, 7, 300]  # dataset sizes differ: each counts once
    acc, assign = best_assignment(diag)
    assert acc == pytest.approx(1.0) and assign == perm
    acc, _ = best_assignment(np.full((4, 4), 9.0))
    assert acc == pytest.approx(1 / 4)
    # a dataset without tokens is left out, not scored 0
    acc, assign = best_assignment(np.vstack([diag, np.zeros((1, 4))]))
    assert acc == pytest.approx(1.0) and assign[-1] is None


def test_best_assignment_many_to_one_caps_experts_so_collapse_is_not_perfect() -> None:
    import numpy as np

    from damex.moe.stats import best_assignment

    # 4 datasets on 2 experts: cap ceil(4/2) = 2 datasets per expert
    paired = np.array([[10, 0], [0, 5], [8, 0], [1, 3]], dtype=float)
    acc, assign = best_assignment(paired)
    assert assign == [0, 1, 0, 1]
    assert acc == pytest.approx((1 + 1 + 1 + 0.75) / 4)
    collapsed = np.array([[10, 0], [5, 0], [8, 0], [4, 0]], dtype=float)
    acc, _ = best_assignment(collapsed)
    assert acc == pytest.approx(0.5)  # two datasets must take the empty expert
    # hand check of a case where greedy argmax per dataset would break the cap
    skew = np.array([[9, 1], [8, 2], [7, 3]], dtype=float)  # cap 2: one must go to expert 1
    acc, assign = best_assignment(skew)
    assert assign == [0, 0, 1] and acc == pytest.approx((0.9 + 0.8 + 0.3) / 3)


def test_nmi_is_one_for_a_permuted_diagonal_and_zero_when_independent() -> None:
    import numpy as np

    from damex.moe.stats import dataset_expert_nmi

    diag = np.eye(3)[[1, 2, 0]] * [[4], [40], [400]]
    assert dataset_expert_nmi(diag) == pytest.approx(1.0)
    assert dataset_expert_nmi(np.full((3, 3), 5.0)) == pytest.approx(0.0, abs=1e-12)
    same_rows = np.array([[1, 3, 6], [2, 6, 12], [10, 30, 60]], dtype=float)
    assert dataset_expert_nmi(same_rows) == pytest.approx(0.0, abs=1e-12)
    collapsed = np.array([[5, 0], [9, 0]], dtype=float)
    assert dataset_expert_nmi(collapsed) == pytest.approx(0.0, abs=1e-12)
    # partial: 2 datasets, each 3/4 on its own expert: I = log2 - H(3/4) (equal weights)
    half = np.array([[3, 1], [1, 3]], dtype=float)
    h = -(0.75 * np.log(0.75) + 0.25 * np.log(0.25))
    assert dataset_expert_nmi(half) == pytest.approx((np.log(2) - h) / np.log(2))


def test_routing_entropy_and_active_experts() -> None:
    import numpy as np

    from damex.moe.stats import active_experts, order_free_routing, routing_entropy

    c = np.array([[10, 0, 0, 0], [5, 5, 5, 5], [0, 0, 0, 0]], dtype=float)
    ent = routing_entropy(c)
    assert ent[0] == pytest.approx(0.0) and ent[1] == pytest.approx(np.log(4)) and ent[2] is None
    assert active_experts(c) == 4
    c2 = np.array([[1000, 5, 0], [990, 0, 0]], dtype=float)  # expert 1 gets 0.25 % < 1 %
    assert active_experts(c2) == 1
    m = order_free_routing(c)
    assert m.mean_routing_entropy == pytest.approx(np.log(4) / 2)
    assert m.expert_load == pytest.approx([15 / 30, 5 / 30, 5 / 30, 5 / 30])
    json.dumps(m.to_dict())


def test_routing_stats_order_free_matches_top1_counts() -> None:
    from damex.moe.stats import order_free_routing

    layers = _layers()
    stats = RoutingStats(2, 3, 4)
    infos, ds = _infos(0, 6, layers)
    stats.update(infos, ds)
    free = stats.order_free()
    assert len(free) == 2
    assert free[1] == order_free_routing(stats.top1[1].numpy())
    assert "order_free" in stats.summary()
