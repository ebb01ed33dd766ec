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
