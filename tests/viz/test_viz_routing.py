"""Routing heatmaps (map outlined, values annotated) and expert-coloured overlays."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from damex.evaluation.routing import LayerRouting, summarize_layers
from damex.structures import Detections
from damex.viz.routing import (
    draw_expert_overlay,
    expert_colors,
    plot_routing_heatmap,
    save_routing_figures,
)

NAMES = ["coco", "voc07", "kitti"]
EMAP = {"coco": 0, "voc07": 2, "kitti": 1}


def _summary() -> dict:
    layers = [
        LayerRouting("decoder.3", np.array([[8, 1, 1], [0, 2, 8], [1, 7, 2]]), np.zeros(3)),
        LayerRouting("decoder.5", np.array([[9, 1, 0], [1, 1, 8], [0, 9, 1]])),
    ]
    return summarize_layers(layers, dataset_names=NAMES, expert_map=EMAP)


def test_heatmap_png_is_written_and_readable(tmp_path) -> None:
    s = _summary()
    paths = save_routing_figures(s, tmp_path)
    assert len(paths["heatmaps"]) == 2 and len(paths["accuracy"]) == 1
    for p in paths["heatmaps"] + paths["accuracy"]:
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 150
    # the configured map is outlined: one red rectangle per mapped dataset
    fig = plot_routing_heatmap(s["layers"][0]["share"], dataset_names=NAMES, expert_map=EMAP)
    rects = [p for p in fig.axes[0].patches if p.get_edgecolor()[:3] == (1.0, 0.0, 0.0)]
    assert sorted((int(r.get_x() + 0.5), int(r.get_y() + 0.5)) for r in rects) == [
        (0, 0),
        (1, 2),
        (2, 1),
    ]  # (expert, dataset)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert "0.80" in texts and len(texts) == 9


def test_expert_overlay_colours_boxes_by_query_expert() -> None:
    img = np.full((3, 100, 120), 255, dtype=np.uint8)
    det = Detections(
        boxes=torch.tensor([[10.0, 30.0, 50.0, 90.0], [60.0, 30.0, 110.0, 90.0]]),
        scores=torch.tensor([0.9, 0.8]),
        labels=torch.tensor([0, 1]),
        query_index=torch.tensor([4, 1]),
    )
    query_expert = np.array([0, 3, 0, 0, 2])  # [Q]: box 0 -> query 4 -> E2, box 1 -> E3
    out = draw_expert_overlay(
        img, det, query_expert, num_experts=4, class_names=["x", "y"], legend=True
    )
    assert out.shape[1] == 120 and out.shape[0] > 100  # legend strip appended below
    cols = expert_colors(4)
    # left edges (below the label) carry the colour of the query's expert
    assert tuple(out[70, 10]) == cols[2] and tuple(out[70, 60]) == cols[3]
    assert tuple(out[60, 30]) == (255, 255, 255)  # inside the box: untouched
    with pytest.raises(ValueError, match="query_index"):
        draw_expert_overlay(img, det, query_expert[:3], num_experts=4)


def test_query_experts_follows_token_tags_not_layout() -> None:
    from damex.modeling.outputs import TokenKind
    from damex.moe.types import RoutingInfo
    from damex.viz.routing import query_experts

    # tokens of 2 images interleaved, with a DN token; image 1 queries listed in reverse order
    token_image = torch.tensor([1, 0, 1, 0, 1, 1])
    token_kind = torch.tensor([0, 0, 0, 0, int(TokenKind.DN), 0])
    token_query = torch.tensor([2, 0, 1, 1, -1, 0])
    expert = torch.tensor([[3], [1], [2], [0], [1], [0]])  # [T, k]
    info = RoutingInfo(
        logits=torch.zeros(6, 4),
        noisy_logits=None,
        expert=expert,
        gate=torch.ones(6, 1),
        kept=torch.ones(6, 1, dtype=torch.bool),
        token_image=token_image,
        token_kind=token_kind,
        token_query=token_query,
    )
    assert query_experts(info, image_index=1, num_queries=3).tolist() == [0, 2, 3]
    assert query_experts(info, image_index=0, num_queries=3).tolist() == [1, 0, -1]
