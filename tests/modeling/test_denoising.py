"""Contrastive denoising: layout, attention-mask semantics, noise bounds, empty images."""

from __future__ import annotations

import torch
from torch import nn

from damex.modeling.denoising import (
    build_self_attn_mask,
    noise_boxes,
    noise_labels,
    prepare_cdn,
)
from damex.modeling.outputs import TokenKind
from damex.structures import Target, box_cxcywh_to_xyxy

K = 7


def _targets() -> list[Target]:
    return [
        Target(torch.tensor([[0.3, 0.4, 0.2, 0.2], [0.6, 0.6, 0.3, 0.4]]), torch.tensor([1, 6])),
        Target(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)),
        Target(torch.tensor([[0.5, 0.5, 0.4, 0.2]]), torch.tensor([3])),
    ]


def _role(i: int, num_dn: int, pad: int, q: int) -> tuple[str, int]:
    if i < num_dn:
        return "dn", i // (2 * pad)
    if i < num_dn + q:
        return "match", -1
    return "o2m", -1


def test_mask_semantics_exact():
    groups, pad, q, q2 = 3, 2, 4, 3
    mask = build_self_attn_mask(num_groups=groups, pad_size=pad, num_queries=q, num_one_to_many=q2)
    num_dn = 2 * groups * pad
    n = num_dn + q + q2
    assert mask.shape == (n, n) and mask.dtype == torch.bool
    for i in range(n):
        ri, gi = _role(i, num_dn, pad, q)
        for j in range(n):
            rj, gj = _role(j, num_dn, pad, q)
            if ri == "match":
                allowed = rj == "match"  # matching never sees GT-derived or one-to-many queries
            elif ri == "o2m":
                allowed = rj == "o2m"
            else:  # a DN group sees its own positives + negatives and the matching queries
                allowed = (rj == "dn" and gi == gj) or rj == "match"
            assert bool(mask[i, j]) == (not allowed), (i, j)


def test_layout_without_noise_and_empty_image():
    torch.manual_seed(0)
    embed = nn.Embedding(K + 1, 8)
    dn = prepare_cdn(_targets(), 5, 0.0, 0.0, K, embed, True, num_queries=4)
    assert dn is not None
    assert dn.meta.num_groups == 2  # 5 // max_gt (2)
    assert dn.meta.pad_size == 2
    assert dn.meta.num_gt.tolist() == [2, 0, 1]
    assert dn.content.shape == (3, 8, 8) and dn.anchors.shape == (3, 8, 4)
    assert dn.attn_mask.shape == (12, 12)
    boxes = dn.anchors.sigmoid()
    for b, tgt in enumerate(_targets()):
        for g in range(2):
            for half in range(2):  # positive then negative
                base = (2 * g + half) * 2
                for i in range(2):
                    slot = base + i
                    if i < tgt.labels.numel():
                        assert dn.token_kind[b, slot] == TokenKind.DN
                        torch.testing.assert_close(boxes[b, slot], tgt.boxes[i], atol=1e-5, rtol=0)
                        torch.testing.assert_close(dn.content[b, slot], embed.weight[tgt.labels[i]])
                    else:
                        assert dn.token_kind[b, slot] == TokenKind.DN_PAD
                        assert dn.content[b, slot].abs().sum() == 0
    assert (dn.token_kind[1] == TokenKind.DN_PAD).all()  # the image without GT is all padding


def test_groups_at_least_one_and_none_cases():
    embed = nn.Embedding(K + 1, 4)
    many = [Target(torch.rand(9, 4) * 0.5 + 0.25, torch.zeros(9, dtype=torch.long))]
    dn = prepare_cdn(many, 5, 0.5, 1.0, K, embed, True, num_queries=3)
    assert dn.meta.num_groups == 1 and dn.num_queries == 18
    empty = [Target(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))] * 2
    assert prepare_cdn(empty, 100, 0.5, 1.0, K, embed, True, num_queries=3) is None
    assert prepare_cdn(_targets(), 100, 0.5, 1.0, K, embed, False, num_queries=3) is None
    assert prepare_cdn(_targets(), 0, 0.5, 1.0, K, embed, True, num_queries=3) is None


def test_box_noise_bounds():
    g = torch.Generator().manual_seed(0)
    n = 4000
    boxes = torch.cat([torch.rand(n, 2) * 0.4 + 0.3, torch.rand(n, 2) * 0.2 + 0.05], dim=1)
    negative = torch.arange(n) % 2 == 1
    scale = 1.0
    noised = noise_boxes(boxes, negative, scale, g, clip=False)
    shift = (box_cxcywh_to_xyxy(noised) - box_cxcywh_to_xyxy(boxes)).abs()  # [N, 4]
    half = boxes[:, 2:].repeat(1, 2) / 2
    ratio = shift / half
    assert (ratio[~negative] < 1.0 + 1e-5).all()  # positives: each corner < half size
    assert (ratio[negative] >= 1.0 - 1e-5).all() and (ratio[negative] < 2.0 + 1e-5).all()
    assert ratio[~negative].max() > 0.95 and ratio[negative].min() < 1.05  # covers the range
    # with clipping, positives' centers stay inside their GT boxes
    clipped = noise_boxes(boxes, negative, scale, g)
    gt = box_cxcywh_to_xyxy(boxes)
    c = clipped[~negative, :2]
    inside = (c >= gt[~negative, :2]) & (c <= gt[~negative, 2:])
    assert inside.all()
    assert (box_cxcywh_to_xyxy(clipped) >= 0).all() and (box_cxcywh_to_xyxy(clipped) <= 1).all()
    assert (clipped[~negative, 2:] > 0).all()


def test_label_noise_rate_and_range():
    g = torch.Generator().manual_seed(1)
    labels = torch.zeros(20000, dtype=torch.long)
    out = noise_labels(labels, 0.5, K, g)
    assert out.min() >= 0 and out.max() < K
    changed = (out != labels).float().mean().item()
    expected = 0.5 * 0.5 * (1 - 1 / K)  # flip prob, minus redraws of the same class
    assert abs(changed - expected) < 0.015
    assert set(out[out != 0].tolist()) == set(range(1, K))  # uniform over all classes


def test_deterministic_with_generator():
    embed = nn.Embedding(K + 1, 4)
    a = prepare_cdn(
        _targets(),
        10,
        0.5,
        1.0,
        K,
        embed,
        True,
        num_queries=3,
        generator=torch.Generator().manual_seed(3),
    )
    b = prepare_cdn(
        _targets(),
        10,
        0.5,
        1.0,
        K,
        embed,
        True,
        num_queries=3,
        generator=torch.Generator().manual_seed(3),
    )
    torch.testing.assert_close(a.anchors, b.anchors)
    torch.testing.assert_close(a.content, b.content)
