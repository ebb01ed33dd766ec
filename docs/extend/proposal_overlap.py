"""How close a model's queries come to syn_medical's lesions (README, "Adding a dataset to a
trained model: `damex extend`"): per test lesion, the best IoU among the 100 two-stage proposals
(the encoder's top-100 locations) and among the 100 final boxes, and per image how many of the
top-100 (query, class) scores are the new "lesion" class.

    python docs/extend/proposal_overlap.py OUT.json RUN/best.pth [RUN2/best.pth ...]

Run from the repository root (the built-in benchmark under data/synthetic).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torchvision.ops import box_convert, box_iou

import damex
from damex.predictor import load_image

ROOT = Path("data/synthetic/syn_medical")


def _best_iou(gt: torch.Tensor, boxes: torch.Tensor) -> list[float]:
    """Per ``gt`` box (xyxy), the best IoU with ``boxes`` (cxcywh, pixels)."""
    return box_iou(gt, box_convert(boxes, "cxcywh", "xyxy")).max(1).values.tolist()


def overlap(checkpoint: str) -> dict[str, float | int | None]:
    gt = json.loads((ROOT / "annotations" / "test.json").read_text(encoding="utf-8"))
    boxes: dict[int, list[list[float]]] = {}
    for a in gt["annotations"]:
        boxes.setdefault(a["image_id"], []).append(a["bbox"])
    p = damex.Predictor.from_checkpoint(checkpoint)
    lesion = p.label_space.num_classes - 1 if "syn_medical" in p.label_space.dataset_names else -1
    prop: list[float] = []
    final: list[float] = []
    in_top: list[int] = []
    for im in gt["images"]:
        if im["id"] not in boxes:
            continue
        img = load_image(ROOT / "images" / im["file_name"])
        h, w = img.shape[1:]
        with torch.no_grad():
            out = p.model(p._batch([img]))
        g = torch.tensor(boxes[im["id"]], dtype=torch.float)
        g[:, 2:] += g[:, :2]  # xywh -> xyxy
        scale = torch.tensor([w, h, w, h], dtype=torch.float)

        prop += _best_iou(g, out.interm.boxes[0] * scale)
        final += _best_iou(g, out.pred.boxes[0] * scale)
        if lesion >= 0:
            s = out.pred.logits[0].sigmoid()  # [Q, K]
            in_top.append(int((s.flatten().topk(100).indices % s.shape[1] == lesion).sum()))
    return {
        "lesions": len(prop),
        "proposals_best_iou_mean": sum(prop) / len(prop),
        "proposals_best_iou_ge_0.5": sum(x >= 0.5 for x in prop) / len(prop),
        "final_best_iou_mean": sum(final) / len(final),
        "final_best_iou_ge_0.5": sum(x >= 0.5 for x in final) / len(final),
        "lesion_share_of_top100": sum(in_top) / len(in_top) / 100 if in_top else None,
    }


if __name__ == "__main__":
    result = {ck: overlap(ck) for ck in sys.argv[2:]}
    Path(sys.argv[1]).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=1))
