"""Hungarian matcher: hand-made optimum, brute-force optimality, cost formula, empty GT,
one-to-many repetition, DN known pairs."""

from __future__ import annotations

import itertools
import math

import torch
import torchvision

from damex.modeling.box_ops import generalized_box_iou
from damex.modeling.matcher import HungarianMatcher, dn_positive_indices, dn_slot_mask
from damex.modeling.outputs import DNMeta
from damex.structures import Target


def _target(boxes: list[list[float]], labels: list[int]) -> Target:
    return Target(
        boxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        labels=torch.tensor(labels, dtype=torch.long),
    )


def test_box_ops_closed_forms_and_degenerate_boxes():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [4.0, 0.0, 5.0, 1.0]])
    # GIoU = IoU - (hull - union) / hull; hull of a and b[1] is 5x2=10, union 5
    torch.testing.assert_close(generalized_box_iou(a, b), torch.tensor([[1 / 7 - 2 / 9, -0.5]]))
    point = torch.tensor([[1.0, 1.0, 1.0, 1.0]])  # zero-area box against itself
    assert torch.isfinite(generalized_box_iou(point, point)).all()


def test_hand_made_assignment():
    matcher = HungarianMatcher(cost_class=0.0, cost_bbox=1.0, cost_giou=0.0)
    gt = _target([[0.2, 0.2, 0.1, 0.1], [0.8, 0.8, 0.2, 0.2]], [0, 1])
    boxes = torch.tensor(
        [[[0.79, 0.8, 0.2, 0.2], [0.5, 0.5, 0.3, 0.3], [0.21, 0.2, 0.1, 0.1]]]
    )  # query 0 ~ GT1, query 2 ~ GT0, query 1 far from both
    ((q, g),) = matcher(torch.zeros(1, 3, 2), boxes, [gt])
    assert q.tolist() == [0, 2] and g.tolist() == [1, 0]
    assert q.dtype == torch.long and q.device.type == "cpu"


def test_assignment_is_optimal_against_brute_force():
    torch.manual_seed(0)
    matcher = HungarianMatcher()
    q_num, n_gt, k = 5, 3, 4
    logits = torch.randn(1, q_num, k)
    boxes = torch.rand(1, q_num, 4) * 0.5 + 0.1
    gt = Target(torch.rand(n_gt, 4) * 0.5 + 0.1, torch.tensor([0, 3, 1]))
    ((q, g),) = matcher(logits, boxes, [gt])
    cost = matcher.cost_matrix(logits[0], boxes[0], gt.labels, gt.boxes).double()
    got = float(cost[q, g].sum())
    best = min(
        float(sum(cost[perm[j], j] for j in range(n_gt)))
        for perm in itertools.permutations(range(q_num), n_gt)
    )
    assert math.isclose(got, best, rel_tol=1e-9, abs_tol=1e-9)
    assert sorted(g.tolist()) == [0, 1, 2]


def test_cost_matrix_formula():
    matcher = HungarianMatcher(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0)
    logits = torch.tensor([[0.5, -1.0], [2.0, 0.0]])
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.2, 0.4]])
    gt_boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    cost = matcher.cost_matrix(logits, boxes, torch.tensor([1]), gt_boxes)
    expected = []
    for qi in range(2):
        p = torch.sigmoid(logits[qi, 1])
        pos = 0.25 * (1 - p) ** 2 * -torch.log(p + 1e-8)
        neg = 0.75 * p**2 * -torch.log(1 - p + 1e-8)
        l1 = (boxes[qi] - gt_boxes[0]).abs().sum()
        x = boxes[qi]
        xyxy = torch.stack([x[0] - x[2] / 2, x[1] - x[3] / 2, x[0] + x[2] / 2, x[1] + x[3] / 2])
        gt_xyxy = torch.tensor([[0.4, 0.4, 0.6, 0.6]])
        giou = torchvision.ops.generalized_box_iou(xyxy[None], gt_xyxy)[0, 0]
        expected.append(2.0 * (pos - neg) + 5.0 * l1 - 2.0 * giou)
    torch.testing.assert_close(cost[:, 0], torch.stack(expected))


def test_batched_equals_per_image_and_empty_gt():
    torch.manual_seed(1)
    matcher = HungarianMatcher()
    logits = torch.randn(3, 6, 4)
    boxes = torch.rand(3, 6, 4) * 0.5 + 0.2
    targets = [
        Target(torch.rand(2, 4) * 0.5 + 0.2, torch.tensor([1, 2])),
        Target(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)),
        Target(torch.rand(4, 4) * 0.5 + 0.2, torch.tensor([0, 0, 3, 1])),
    ]
    batched = matcher(logits, boxes, targets)
    assert batched[1][0].numel() == 0 and batched[1][1].numel() == 0
    for b in range(3):
        ((q, g),) = matcher(logits[b : b + 1], boxes[b : b + 1], [targets[b]])
        assert torch.equal(q, batched[b][0]) and torch.equal(g, batched[b][1])
    assert len(batched[2][0]) == 4


def test_fewer_queries_than_gt_and_nonfinite_logits():
    matcher = HungarianMatcher()
    gt = Target(torch.rand(5, 4) * 0.4 + 0.3, torch.arange(5) % 2)
    ((q, g),) = matcher(torch.randn(1, 3, 2), torch.rand(1, 3, 4) * 0.4 + 0.3, [gt])
    assert len(q) == 3 and len(set(g.tolist())) == 3
    logits = torch.full((1, 3, 2), float("nan"))
    ((q, g),) = matcher(logits, torch.rand(1, 3, 4) * 0.4 + 0.3, [gt])  # must not raise
    assert len(q) == 3


def test_one_to_many_repeat():
    torch.manual_seed(2)
    matcher = HungarianMatcher()
    gt = Target(torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2]]), torch.tensor([0, 1]))
    ((q, g),) = matcher(torch.randn(1, 8, 2), torch.rand(1, 8, 4) * 0.4 + 0.3, [gt], repeat=3)
    assert len(q) == 6 and len(set(q.tolist())) == 6
    assert sorted(g.tolist()) == [0, 0, 0, 1, 1, 1]


def test_dn_known_pairs_and_slot_mask():
    meta = DNMeta(num_groups=2, pad_size=3, num_gt=torch.tensor([2, 0, 3]))
    idx = dn_positive_indices(meta)
    assert idx[0][0].tolist() == [0, 1, 6, 7] and idx[0][1].tolist() == [0, 1, 0, 1]
    assert idx[1][0].numel() == 0
    assert idx[2][0].tolist() == [0, 1, 2, 6, 7, 8] and idx[2][1].tolist() == [0, 1, 2] * 2
    mask = dn_slot_mask(meta)
    assert mask.shape == (3, 12)
    # image 0: positives 0,1 and negatives 3,4 in each group
    assert torch.nonzero(mask[0]).flatten().tolist() == [0, 1, 3, 4, 6, 7, 9, 10]
    assert not mask[1].any() and mask[2].all()
