"""PostProcess: hand-made top-K, batched equals per-image, clamping, label restriction."""

from __future__ import annotations

import pytest
import torch

from damex.config import Config, EvalConfig
from damex.modeling.outputs import Prediction
from damex.modeling.postprocess import PostProcess, build_postprocess


def test_hand_made_case():
    logits = torch.full((1, 3, 2), -10.0)
    logits[0, 1, 0] = 2.0  # best: query 1 class 0
    logits[0, 2, 1] = 1.0  # second: query 2 class 1
    boxes = torch.tensor(
        [[[0.5, 0.5, 0.2, 0.2], [0.25, 0.5, 0.5, 0.2], [0.9, 0.9, 0.4, 0.4]]]
    )  # query 2 sticks out of the image: clamped
    dets = PostProcess(num_select=2)(Prediction(logits, boxes), torch.tensor([[100, 200]]))
    (d,) = dets
    assert d.labels.tolist() == [0, 1] and d.query_index.tolist() == [1, 2]
    torch.testing.assert_close(d.scores, torch.sigmoid(torch.tensor([2.0, 1.0])))
    # (h, w) = (100, 200): query 1 -> x 0..100, y 40..60; query 2 -> x 140..220 -> 200, y 70..110
    torch.testing.assert_close(
        d.boxes, torch.tensor([[0.0, 40.0, 100.0, 60.0], [140.0, 70.0, 200.0, 100.0]])
    )


def test_batched_equals_per_image_and_k_capped():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 4)
    boxes = torch.rand(3, 5, 4)
    sizes = torch.tensor([[100, 150], [64, 64], [480, 640]])
    post = PostProcess(num_select=7)
    batched = post(Prediction(logits, boxes), sizes)
    for b in range(3):
        (single,) = post(Prediction(logits[b : b + 1], boxes[b : b + 1]), sizes[b : b + 1])
        for name in ("boxes", "scores", "labels", "query_index"):
            torch.testing.assert_close(getattr(single, name), getattr(batched[b], name))
        assert len(batched[b]) == 7
        assert (batched[b].scores[:-1] >= batched[b].scores[1:]).all()
        h, w = sizes[b].tolist()
        bx = batched[b].boxes
        assert (bx >= 0).all() and (bx[:, [0, 2]] <= w).all() and (bx[:, [1, 3]] <= h).all()
    big = PostProcess(num_select=300)(Prediction(logits, boxes), sizes)
    assert len(big[0]) == 5 * 4  # capped at Q * K


def test_restriction_excludes_other_labels():
    torch.manual_seed(1)
    logits = torch.randn(2, 6, 5)
    logits[:, :, 4] = 10.0  # class 4 dominates but is outside both slices
    boxes = torch.rand(2, 6, 4)
    sizes = torch.tensor([[50, 50], [50, 50]])
    slices = [torch.tensor([0, 1]), torch.tensor([False, False, True, False, False])]
    post = PostProcess(num_select=100, restrict_to_dataset_labels=True)
    dets = post(Prediction(logits, boxes), sizes, slices)
    assert set(dets[0].labels.tolist()) == {0, 1} and len(dets[0]) == 12
    assert set(dets[1].labels.tolist()) == {2} and len(dets[1]) == 6
    unrestricted = PostProcess(num_select=6)(Prediction(logits, boxes), sizes)
    assert set(unrestricted[0].labels.tolist()) == {4}
    with pytest.raises(ValueError, match="dataset_slices"):
        post(Prediction(logits, boxes), sizes)


def test_build_postprocess_reads_eval_config():
    cfg = Config(eval=EvalConfig(num_select=11, restrict_to_dataset_labels=True))
    post = build_postprocess(cfg)
    assert post.num_select == 11 and post.restrict_to_dataset_labels


def _routing(experts: list[list[int]], kinds: list[list[int]] | None, num_experts: int):
    """One RoutingInfo from per-image top-1 experts (and token kinds)."""
    from damex.moe.types import RoutingInfo

    image = torch.tensor([b for b, row in enumerate(experts) for _ in row])
    expert = torch.tensor([e for row in experts for e in row])[:, None]
    t = expert.shape[0]
    kind = None if kinds is None else torch.tensor([k for row in kinds for k in row])
    return RoutingInfo(
        logits=torch.zeros(t, num_experts),
        noisy_logits=None,
        expert=expert,
        gate=torch.ones(t, 1),
        kept=torch.ones(t, 1, dtype=torch.bool),
        token_image=image,
        token_kind=kind,
    )


def test_router_label_mask_votes_over_layers_and_matching_queries_only() -> None:
    from damex.modeling.outputs import TokenKind
    from damex.modeling.postprocess import router_label_mask

    # 3 datasets -> labels {0,1}, {2,3}, {4}; datasets 1 and 2 share expert 1; expert 3 unmapped
    dataset_labels = torch.tensor(
        [[1, 1, 0, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 1]], dtype=torch.bool
    )
    expert_of_dataset = torch.tensor([0, 1, 1])
    m, dn = int(TokenKind.MATCHING), int(TokenKind.DN)
    layer0 = _routing(
        # image 0: 2 matching votes for expert 0, 1 for expert 1; its 3 DN tokens vote for 1
        # image 1: matching votes 1 for expert 0, 1 for expert 1
        # image 2: every vote goes to the unmapped expert 3
        [[0, 0, 1, 1, 1, 1], [0, 1], [3, 3]],
        [[m, m, m, dn, dn, dn], [m, m], [m, m]],
        num_experts=4,
    )
    layer1 = _routing([[1], [1], [3]], [[m], [m], [m]], num_experts=4)  # a second layer's votes
    mask = router_label_mask([layer0, layer1], expert_of_dataset, dataset_labels, batch_size=3)
    # image 0: expert 0 has 2 votes, expert 1 has 2 (1 + layer 1's; the DN votes do not count):
    # a tie keeps every dataset of both experts
    assert mask[0].tolist() == [True] * 5
    # image 1: expert 1 wins 2 to 1 -> datasets 1 and 2 (they share it), not dataset 0
    assert mask[1].tolist() == [False, False, True, True, True]
    # image 2: no vote for a mapped expert -> nothing is masked
    assert mask[2].tolist() == [True] * 5
    # without the second layer image 0's matching votes decide: expert 0 (2 to 1)
    mask0 = router_label_mask([layer0], expert_of_dataset, dataset_labels, batch_size=3)
    assert mask0[0].tolist() == [True, True, False, False, False]
    # untagged tokens all vote: image 0's DN tokens now make expert 1 win 4 to 2
    untagged = _routing([[0, 0, 1, 1, 1, 1], [0, 1], [3, 3]], None, num_experts=4)
    mask_u = router_label_mask([untagged], expert_of_dataset, dataset_labels, batch_size=3)
    assert mask_u[0].tolist() == [False, False, True, True, True]
    with pytest.raises(ValueError, match="expert for every dataset"):
        router_label_mask([layer0], torch.tensor([0, -1, 1]), dataset_labels, batch_size=3)


def test_postprocess_with_a_router_mask_keeps_only_the_voted_labels() -> None:
    from damex.modeling.postprocess import router_label_mask

    torch.manual_seed(0)
    logits = torch.randn(2, 6, 5)
    boxes = torch.rand(2, 6, 4) * 0.5 + 0.25
    dataset_labels = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 1, 1]], dtype=torch.bool)
    layer = _routing([[1] * 6, [0] * 6], None, num_experts=2)
    mask = router_label_mask([layer], torch.tensor([0, 1]), dataset_labels, batch_size=2)
    pp = PostProcess(num_select=8, restrict_to_dataset_labels=True)
    dets = pp(
        Prediction(logits=logits, boxes=boxes), torch.tensor([[64, 64], [64, 64]]), list(mask)
    )
    assert set(dets[0].labels.tolist()) <= {3, 4} and set(dets[1].labels.tolist()) <= {0, 1, 2}
    # the kept pairs are the top-8 among the allowed ones (the freed slots go to them)
    allowed = logits[0, :, 3:].sigmoid().flatten().topk(8).values
    torch.testing.assert_close(dets[0].scores, allowed)
