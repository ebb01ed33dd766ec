"""UODB's protocol: PASCAL VOC average precision at IoU 0.5, per category, per dataset.

UODB (Wang et al., "Towards Universal Object Detection by Domain Attention", CVPR 2019) reports
for every dataset the VOC mean AP at IoU 0.5 and the average over datasets; this module computes
that metric beside COCO's, from the same COCO-JSON ground truth and detections.

Per category (Everingham et al., "The PASCAL Visual Object Classes (VOC) Challenge", IJCV 2010,
and the VOC devkit's ``VOCevaldet``):

1. all detections of the category, over all images, are sorted by descending score (ties keep
   their input order);
2. each detection is matched to the ground-truth box of its image and category with the largest
   IoU; it is a true positive if that IoU is ``> iou_threshold`` (strictly, as in the devkit) and
   the box is not yet matched, a false positive if the box was matched already (a duplicate) or
   the IoU is too small;
3. a detection whose best box is an ignore region (COCO ``iscrowd=1``, or an ``ignore`` /
   ``difficult`` flag: UODB's difficult objects) counts neither as true nor as false positive,
   and ignore regions are not positives (not in the recall's denominator);
4. ``recall = cumTP / #positives``, ``precision = cumTP / (cumTP + cumFP)``;
5. AP: ``"area"`` (default; VOC2010+ and UODB): the area under the precision-recall curve after
   making precision monotonically decreasing (all-point interpolation); ``"11point"`` (VOC2007):
   the mean over recall thresholds 0, 0.1, ..., 1 of the maximum precision at recall >= t.

A category without positives has no AP (``-1``, left out of the mean, as COCO's undefined
values); a category with positives but no detection has AP 0. Boxes are COCO ``[x, y, w, h]``
in continuous pixel coordinates: the IoU has no "+1 pixel" term (the devkit's integer-pixel
convention does not apply to COCO-JSON boxes).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from damex.config import VOCMetric

__all__ = ["VOCMetric", "VOCResult", "voc_ap", "voc_eval", "is_ignore"]


@dataclass(frozen=True)
class VOCResult:
    """VOC AP of one dataset.

    Attributes:
        ap: mean of the categories' APs (categories with positives only); -1 if none has any.
        per_category: category name -> AP (-1: no positive of that category).
        metric: ``"area"`` or ``"11point"``.
        iou_threshold: the IoU a true positive must exceed.
        num_positives: category name -> non-ignored ground-truth boxes.
    """

    ap: float
    per_category: dict[str, float] = field(default_factory=dict)
    metric: str = "area"
    iou_threshold: float = 0.5
    num_positives: dict[str, int] = field(default_factory=dict)


def voc_ap(recall: np.ndarray, precision: np.ndarray, metric: VOCMetric = "area") -> float:
    """AP from a precision-recall curve (detections sorted by descending score).

    Args:
        recall: ``[N]`` non-decreasing recall after each detection.
        precision: ``[N]`` precision after each detection.
        metric: ``"area"`` (all-point interpolation) or ``"11point"`` (VOC2007).
    """
    rec = np.asarray(recall, dtype=np.float64)
    prec = np.asarray(precision, dtype=np.float64)
    if rec.shape != prec.shape or rec.ndim != 1:
        raise ValueError(
            f"recall and precision must be equal 1-d arrays, got {rec.shape}, {prec.shape}"
        )
    if metric == "11point":
        points = []
        for t in np.linspace(0.0, 1.0, 11):
            above = prec[rec >= t - 1e-12]
            points.append(float(above.max()) if above.size else 0.0)
        return float(np.mean(points))
    if metric != "area":
        raise ValueError(f"metric must be 'area' or '11point', got {metric!r}")
    mrec = np.concatenate([[0.0], rec, [1.0]])
    mpre = np.concatenate([[0.0], prec, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # precision envelope (non-increasing)
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def is_ignore(annotation: Mapping[str, Any]) -> bool:
    """Whether a COCO annotation is an ignore region (crowd, ``ignore`` or ``difficult``)."""
    return any(bool(annotation.get(k, 0)) for k in ("iscrowd", "ignore", "difficult"))


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one ``[4]`` xywh box with ``[M, 4]`` xywh boxes (continuous coordinates)."""
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[0] + box[2], boxes[:, 0] + boxes[:, 2])
    y2 = np.minimum(box[1] + box[3], boxes[:, 1] + boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    union = box[2] * box[3] + boxes[:, 2] * boxes[:, 3] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _evaluated_images(gt: Mapping[str, Any], image_ids: Sequence[int] | None) -> set[int]:
    """The ids of the evaluated images: ``image_ids`` (checked against ``gt``) or all."""
    images = {int(im["id"]) for im in gt["images"]}
    if image_ids is not None:
        wanted = {int(i) for i in image_ids}
        missing = wanted - images
        if missing:
            raise ValueError(f"image ids {sorted(missing)[:10]} are not images of the GT")
        images = wanted
    return images


@dataclass
class _GroundTruth:
    """The evaluated GT boxes, grouped by ``(image, category)``.

    Attributes:
        boxes: ``(image, category)`` -> ``[M]`` xywh boxes.
        ignore: ``(image, category)`` -> ``[M]`` ignore flags.
        npos: category -> non-ignored boxes (the recall's denominator).
    """

    boxes: dict[tuple[int, int], list[list[float]]]
    ignore: dict[tuple[int, int], list[bool]]
    npos: dict[int, int]

    @classmethod
    def from_coco(
        cls, gt: Mapping[str, Any], images: set[int], names: Mapping[int, str]
    ) -> _GroundTruth:
        truth = cls(boxes=defaultdict(list), ignore=defaultdict(list), npos=dict.fromkeys(names, 0))
        for a in gt["annotations"]:
            img, cat = int(a["image_id"]), int(a["category_id"])
            if img not in images or cat not in names:
                continue
            truth.boxes[img, cat].append([float(v) for v in a["bbox"]])
            flag = is_ignore(a)
            truth.ignore[img, cat].append(flag)
            truth.npos[cat] += not flag
        return truth


def _detections_by_category(
    detections: Sequence[Mapping[str, Any]], images: set[int], names: Mapping[int, str]
) -> dict[int, list[tuple[float, int, int, np.ndarray]]]:
    """category -> ``(score, input index, image, [4] xywh box)`` of its detections."""
    dets_by_cat: dict[int, list[tuple[float, int, int, np.ndarray]]] = defaultdict(list)
    for i, d in enumerate(detections):
        img = int(d["image_id"])
        if img not in images:
            raise ValueError(f"detection {i}: image_id {img} is not an evaluated image")
        cat = int(d["category_id"])
        if cat in names:
            dets_by_cat[cat].append((float(d["score"]), i, img, np.asarray(d["bbox"], float)))
    return dets_by_cat


def _category_ap(
    truth: _GroundTruth,
    cat: int,
    detections: list[tuple[float, int, int, np.ndarray]],
    *,
    iou_threshold: float,
    metric: VOCMetric,
) -> float:
    """AP of one category with positives (steps 1-5 of the module docstring)."""
    boxes, ignore = truth.boxes, truth.ignore
    dets = sorted(detections, key=lambda t: (-t[0], t[1]))
    tp = np.zeros(len(dets))
    fp = np.zeros(len(dets))
    used = {key: np.zeros(len(v), dtype=bool) for key, v in boxes.items() if key[1] == cat}
    for k, (_, _, img, box) in enumerate(dets):
        key = (img, cat)
        if key not in used:
            fp[k] = 1
            continue
        ious = _iou(box, np.asarray(boxes[key]))  # [M]
        j = int(np.argmax(ious))
        if ious[j] > iou_threshold:
            if ignore[key][j]:
                continue  # an ignore region: neither true nor false positive
            if used[key][j]:
                fp[k] = 1  # a duplicate detection of a matched box
            else:
                tp[k] = 1
                used[key][j] = True
        else:
            fp[k] = 1
    ctp, cfp = np.cumsum(tp), np.cumsum(fp)
    counted = (tp + fp) > 0  # ignored detections do not move the curve
    recall = ctp[counted] / truth.npos[cat]
    precision = ctp[counted] / np.maximum(ctp[counted] + cfp[counted], np.finfo(float).eps)
    return voc_ap(recall, precision, metric) if recall.size else 0.0


def voc_eval(
    gt: Mapping[str, Any],
    detections: Sequence[Mapping[str, Any]],
    *,
    iou_threshold: float = 0.5,
    metric: VOCMetric = "area",
    image_ids: Sequence[int] | None = None,
) -> VOCResult:
    """VOC AP of one dataset (see the module docstring for the protocol).

    Args:
        gt: a COCO GT dict (``images``, ``annotations`` with ``bbox`` xywh, ``categories``).
        detections: ``{"image_id", "category_id" (native), "bbox" [x, y, w, h], "score"}``;
            categories absent from ``gt`` are ignored (as COCOeval does).
        iou_threshold: a true positive's IoU must exceed it.
        metric: ``"area"`` (all-point, default) or ``"11point"`` (VOC2007).
        image_ids: evaluate only these images (default: every image of ``gt``).

    Raises:
        ValueError: a detection on an image that is not evaluated, or a bad argument.
    """
    if metric not in ("area", "11point"):
        raise ValueError(f"metric must be 'area' or '11point', got {metric!r}")
    if not 0.0 <= iou_threshold < 1.0:
        raise ValueError(f"iou_threshold must be in [0, 1), got {iou_threshold}")
    images = _evaluated_images(gt, image_ids)
    names = {int(c["id"]): str(c.get("name", c["id"])) for c in gt["categories"]}
    truth = _GroundTruth.from_coco(gt, images, names)
    dets_by_cat = _detections_by_category(detections, images, names)
    per_category: dict[str, float] = {}
    for cat, name in names.items():
        if truth.npos[cat] == 0:
            per_category[name] = -1.0
            continue
        per_category[name] = _category_ap(
            truth, cat, dets_by_cat.get(cat, []), iou_threshold=iou_threshold, metric=metric
        )
    defined = [v for v in per_category.values() if v >= 0]
    return VOCResult(
        ap=float(np.mean(defined)) if defined else -1.0,
        per_category=per_category,
        metric=metric,
        iou_threshold=iou_threshold,
        num_positives={names[c]: n for c, n in truth.npos.items()},
    )
