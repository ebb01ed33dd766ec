"""VOC AP50 (UODB's protocol) against hand-computed precision/recall curves."""

from __future__ import annotations

import numpy as np
import pytest

from damex.evaluation.coco_eval import evaluate_dataset
from damex.evaluation.voc_eval import voc_ap, voc_eval


def _gt(annotations: list[dict], categories=((1, "car"), (2, "person"), (3, "dog"))) -> dict:
    images = sorted({a["image_id"] for a in annotations} | {1, 2})
    return {
        "images": [{"id": i, "width": 100, "height": 100, "file_name": f"{i}.png"} for i in images],
        "categories": [{"id": c, "name": n} for c, n in categories],
        "annotations": [{"id": k + 1, "iscrowd": 0, **a} for k, a in enumerate(annotations)],
    }


def _det(image_id: int, cat: int, box: list[float], score: float) -> dict:
    return {"image_id": image_id, "category_id": cat, "bbox": box, "score": score}


# image 1: two cars and one ignore region (a difficult car); image 2: one car
GT = _gt(
    [
        {"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10]},
        {"image_id": 1, "category_id": 1, "bbox": [50, 50, 10, 10]},
        {"image_id": 1, "category_id": 1, "bbox": [20, 20, 10, 10], "difficult": 1},
        {"image_id": 2, "category_id": 1, "bbox": [30, 30, 20, 20]},
        {"image_id": 2, "category_id": 2, "bbox": [0, 0, 5, 5], "iscrowd": 1},  # only ignore
    ]
)
DETS = [
    _det(1, 1, [0, 0, 10, 10], 0.9),  # TP (car a)
    _det(1, 1, [0, 0, 10, 10], 0.8),  # duplicate of car a: FP
    _det(1, 1, [20, 20, 10, 10], 0.7),  # on the difficult car: ignored
    _det(2, 1, [80, 80, 5, 5], 0.6),  # background: FP
    _det(2, 1, [30, 30, 20, 20], 0.5),  # TP (image 2 car)
    _det(1, 1, [51, 51, 10, 10], 0.4),  # TP (car b, IoU 81/119)
    _det(2, 2, [0, 0, 5, 5], 0.95),  # person on the crowd region: ignored (no positives anyway)
]
# counted sequence TP FP FP TP TP over 3 positives:
#   recall    1/3 1/3 1/3 2/3 1      precision 1 1/2 1/3 1/2 3/5
# envelope: 1 at recall 1/3, 3/5 at 2/3 and 1 -> area = 1/3 * 1 + 2/3 * 3/5 = 0.7333...
# 11-point: t = 0, .1, .2, .3 -> 1; t = .4 .. 1.0 (7 points) -> 3/5  => (4 + 4.2) / 11
AREA = 1 / 3 + 2 / 3 * 3 / 5
ELEVEN = (4 * 1.0 + 7 * 0.6) / 11


def test_voc_ap_hand_computed_with_duplicates_and_ignore_regions() -> None:
    res = voc_eval(GT, DETS)
    assert res.per_category["car"] == pytest.approx(AREA)
    assert res.num_positives == {"car": 3, "person": 0, "dog": 0}
    assert res.per_category["person"] == -1.0 and res.per_category["dog"] == -1.0  # no positives
    assert res.ap == pytest.approx(AREA)  # mean over categories with positives only
    res07 = voc_eval(GT, DETS, metric="11point")
    assert res07.per_category["car"] == pytest.approx(ELEVEN)


def test_ignore_flag_changes_the_curve_as_computed_by_hand() -> None:
    # the difficult car as an ordinary positive: its detection becomes a TP and npos = 4
    plain = _gt([{**a, "difficult": 0} for a in GT["annotations"]])
    res = voc_eval(plain, DETS)
    # counted: TP FP TP FP TP TP -> recall 1/4 1/4 2/4 2/4 3/4 1; precision 1 1/2 2/3 1/2 3/5 2/3
    # envelope: r=1/4 -> 1, r=1/2 -> 2/3, r=3/4 -> 2/3, r=1 -> 2/3
    assert res.per_category["car"] == pytest.approx(0.25 * 1 + 0.75 * 2 / 3)


def test_strict_iou_threshold_and_missing_categories() -> None:
    gt = _gt(
        [
            {"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10]},
            {"image_id": 1, "category_id": 3, "bbox": [0, 0, 10, 10]},
        ]
    )
    # IoU exactly 0.5 (a 10x10 box shifted to overlap 2/3 ... here: 10x5 inside 10x10)
    half = [_det(1, 1, [0, 0, 10, 5], 0.9)]
    res = voc_eval(gt, half)
    assert res.per_category["car"] == 0.0  # 0.5 is not > 0.5: a false positive
    assert res.per_category["dog"] == 0.0  # positives but no detection: AP 0
    assert res.ap == 0.0
    assert voc_eval(gt, half, iou_threshold=0.4).per_category["car"] == pytest.approx(1.0)
    # a category not in the GT is ignored; an image not evaluated is an error
    assert voc_eval(gt, [_det(1, 9, [0, 0, 10, 10], 0.9)]).ap == 0.0
    with pytest.raises(ValueError, match="image_id 7"):
        voc_eval(gt, [_det(7, 1, [0, 0, 10, 10], 0.9)])


def test_voc_ap_interpolations_on_a_raw_curve() -> None:
    rec = np.array([0.2, 0.4, 0.4, 0.8])
    prec = np.array([1.0, 0.5, 0.4, 0.6])
    # envelope: 1 on (0, .2], .6 on (.2, .8], 0 after -> 0.2 + 0.6 * 0.6
    assert voc_ap(rec, prec) == pytest.approx(0.2 + 0.36)
    # 11-point: t=0,.1,.2 -> 1; t=.3..0.8 (6 points) -> .6; t=.9, 1 -> 0
    assert voc_ap(rec, prec, "11point") == pytest.approx((3 + 3.6) / 11)
    with pytest.raises(ValueError, match="metric"):
        voc_ap(rec, prec, "coco")  # type: ignore[arg-type]


def test_evaluate_dataset_reports_voc_ap50_beside_coco() -> None:
    m = evaluate_dataset(GT, DETS, backend="pycocotools")
    assert m.voc_ap50 == pytest.approx(AREA) and m.voc_metric == "area"
    assert m.voc_ap50_per_category["car"] == pytest.approx(AREA)
    m07 = evaluate_dataset(GT, DETS, backend="pycocotools", voc_metric="11point")
    assert m07.voc_ap50 == pytest.approx(ELEVEN)
    # perfect detections: VOC AP 1, like COCO's AP50
    perfect = [
        _det(a["image_id"], a["category_id"], a["bbox"], 1.0)
        for a in GT["annotations"]
        if not (a.get("difficult") or a.get("iscrowd"))
    ]
    assert evaluate_dataset(GT, perfect, backend="pycocotools").voc_ap50 == pytest.approx(1.0)
