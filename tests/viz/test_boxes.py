"""Box drawing: outlines where the boxes are, score threshold, palette."""

from __future__ import annotations

import numpy as np
import torch

from damex.structures import Detections
from damex.viz.boxes import (
    draw_boxes,
    draw_detections,
    palette,
    place_labels,
    select_for_display,
    upscale_for_display,
)


def test_palette_is_distinct() -> None:
    cols = palette(25)
    assert len(set(cols)) == 25 and all(0 <= v <= 255 for c in cols for v in c)


def test_draw_boxes_colours_the_outline_only_where_boxes_are() -> None:
    img = np.full((3, 60, 80), 255, dtype=np.uint8)  # [3, H, W] like Sample.image
    out = draw_boxes(img, torch.tensor([[10.0, 20.0, 50.0, 40.0]]), colors=[(255, 0, 0)], width=2)
    assert out.shape == (60, 80, 3) and out.dtype == np.uint8
    red = (out == (255, 0, 0)).all(-1)  # [H, W]
    assert red[20:40, 10].all() and red[20, 10:50].all()  # left and top edges
    assert not red[30, 30] and not red[5, 70]  # interior and outside untouched
    assert (img == 255).all()  # input not modified


def test_draw_detections_thresholds_scores() -> None:
    img = np.zeros((40, 40, 3), dtype=np.uint8)
    det = Detections(
        torch.tensor([[2.0, 2.0, 20.0, 20.0], [22.0, 22.0, 38.0, 38.0]]),
        torch.tensor([0.9, 0.1]),
        torch.tensor([1, 0]),
    )
    out = draw_detections(img, det, ["a", "b"], score_threshold=0.5)
    assert out[2:20, 2].any() and not out[30, 22].any()  # only the confident box is drawn


def test_select_for_display_dedups_thresholds_per_image_and_caps() -> None:
    boxes = torch.tensor(
        [
            [10.0, 10.0, 50.0, 50.0],  # query 0, best class
            [10.0, 10.0, 50.0, 50.0],  # query 0 again, another class: one box per query
            [11.0, 11.0, 51.0, 51.0],  # query 1, same object: removed by NMS
            [60.0, 60.0, 90.0, 90.0],  # query 2, elsewhere
            [100.0, 10.0, 120.0, 30.0],  # query 3, below 0.3 x best
        ]
    )
    det = Detections(
        boxes,
        torch.tensor([0.8, 0.7, 0.6, 0.5, 0.2]),
        torch.tensor([1, 2, 1, 0, 0]),
        torch.tensor([0, 0, 1, 2, 3]),
    )
    assert select_for_display(det, top_n=20, min_score=0.05).tolist() == [0, 3]
    assert select_for_display(det, top_n=1).tolist() == [0]
    # the threshold follows the image: a weak image still shows its best boxes
    weak = Detections(boxes, det.scores * 0.1, det.labels, det.query_index)
    assert select_for_display(weak, min_score=0.01).tolist() == [0, 3]


def test_labels_of_overlapping_boxes_do_not_cover_each_other() -> None:
    boxes = [[40.0, 40.0, 120.0, 120.0], [42.0, 42.0, 122.0, 122.0], [44.0, 44.0, 124.0, 124.0]]
    sizes = [(60.0, 14.0)] * 3
    corners = place_labels(boxes, sizes, (200, 200))
    rects = [(x, y, x + w, y + h) for (x, y), (w, h) in zip(corners, sizes)]
    for i in range(3):
        assert 0 <= rects[i][0] and rects[i][2] <= 200 and 0 <= rects[i][1] and rects[i][3] <= 200
        for j in range(i):
            a, b = rects[i], rects[j]
            assert min(a[2], b[2]) <= max(a[0], b[0]) or min(a[3], b[3]) <= max(a[1], b[1])
    out = draw_boxes(np.zeros((200, 200, 3), np.uint8), boxes, texts=["a", "b", "c"])
    assert out.shape == (200, 200, 3)


def test_small_images_are_enlarged_with_their_boxes() -> None:
    img = np.zeros((100, 160, 3), dtype=np.uint8)
    big, boxes = upscale_for_display(img, torch.tensor([[10.0, 20.0, 30.0, 40.0]]), min_side=512)
    assert big.shape[:2] == (512, 819)
    torch.testing.assert_close(
        boxes, torch.tensor([[51.2, 102.4, 153.6, 204.8]]), atol=0.05, rtol=0
    )
    same, _ = upscale_for_display(np.zeros((600, 800, 3), np.uint8), boxes)
    assert same.shape[:2] == (600, 800)
