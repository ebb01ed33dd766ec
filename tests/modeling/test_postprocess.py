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
