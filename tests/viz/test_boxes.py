"""Box drawing: outlines where the boxes are, score threshold, palette."""

from __future__ import annotations

import numpy as np
import torch

from damex.structures import Detections
from damex.viz.boxes import draw_boxes, draw_detections, palette


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
