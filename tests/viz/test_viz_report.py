"""The self-contained HTML routing report: embedded images, tables, routing_stats.json."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest
import torch

from damex.evaluation.coco_eval import DatasetMetrics, EvalResults
from damex.evaluation.routing import LayerRouting, summarize_layers
from damex.structures import Detections
from damex.viz.boxes import save_png
from damex.viz.report import write_routing_report
from damex.viz.routing import (
    draw_expert_overlay,
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


def test_report_embeds_images_and_tables(tmp_path) -> None:
    s = _summary()
    figs = save_routing_figures(s, tmp_path / "figs")
    img = np.full((3, 50, 60), 255, dtype=np.uint8)
    det = Detections(
        torch.tensor([[5.0, 5.0, 40.0, 40.0]]), torch.ones(1), torch.tensor([0]), torch.tensor([0])
    )
    overlay = save_png(draw_expert_overlay(img, det, [1], num_experts=3), tmp_path / "ov.png")
    m = DatasetMetrics(*([0.5] * 12), num_images=3, num_detections=7, num_foreign=3)
    res = EvalResults(datasets={"coco": m, "voc07": m}, skipped={"voc12": "same test set as voc07"})
    html_path = write_routing_report(
        tmp_path / "report",
        s,
        figs["heatmaps"] + figs["accuracy"],
        {"coco": [overlay]},
        eval_results=res,
    )
    text = html_path.read_text()
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(uris) == 4  # 2 heatmaps + accuracy chart + 1 overlay
    assert base64.b64decode(uris[-1]) == overlay.read_bytes()
    assert "<table>" in text and "decoder.5" in text and "<td>voc07</td>" in text
    assert '<td class="mapped">80.0</td>' in text  # coco -> E0 share in layer decoder.3
    assert "<td>mean</td><td>50.00</td>" in text  # the COCO table's mean row
    assert "same test set as voc07" in text
    assert "<img" in text and 'src="/' not in text and "file://" not in text  # self-contained
    stats = json.loads((tmp_path / "report" / "routing_stats.json").read_text())
    assert stats["layers"][0]["counts"] == s["layers"][0]["counts"]
    with pytest.raises(ValueError, match="not a PNG"):
        bad = tmp_path / "bad.png"
        bad.write_text("x")
        write_routing_report(tmp_path / "r2", s, [bad], [])
