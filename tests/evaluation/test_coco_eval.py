"""Per-dataset COCO evaluation: backends agree with pycocotools, closed cases, label mapping."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import re

import numpy as np
import pytest
import torch

from damex.data.label_space import LabelSpace
from damex.evaluation.coco_eval import (
    STAT_NAMES,
    EvalResults,
    MultiDatasetEvaluator,
    _run_cocoeval,
    _stats_from_arrays,
    _summary_stats,
    detections_to_coco,
    evaluate_dataset,
    load_coco_gt,
)
from damex.structures import Detections


def _make_gt(seed: int = 0, cats=((3, "a"), (7, "b"), (9, "c")), num_images: int = 6) -> dict:
    """A GT with small/medium/large boxes; the last category has no annotation."""
    rng = np.random.default_rng(seed)
    images = [
        {"id": 10 + i, "width": 200, "height": 150, "file_name": f"{i}.jpg"}
        for i in range(num_images)
    ]
    anns = []
    used = [c for c, _ in cats[:-1]]
    for im in images:
        for _ in range(int(rng.integers(1, 5))):
            w, h = rng.uniform(4, 120), rng.uniform(4, 100)
            x, y = rng.uniform(0, 200 - w), rng.uniform(0, 150 - h)
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": im["id"],
                    "category_id": int(rng.choice(used)),
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    return {
        "images": images,
        "categories": [{"id": c, "name": n} for c, n in cats],
        "annotations": anns,
    }


def _noisy_dets(gt: dict, seed: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)
    cat_ids = [c["id"] for c in gt["categories"]]
    dets = []
    for a in gt["annotations"]:
        for _ in range(3):
            b = np.asarray(a["bbox"]) + rng.normal(0, 5, 4)
            b[2:] = np.maximum(b[2:], 1.0)
            cat = a["category_id"] if rng.uniform() < 0.7 else int(rng.choice(cat_ids))
            dets.append(
                {
                    "image_id": a["image_id"],
                    "category_id": cat,
                    "bbox": b.tolist(),
                    "score": float(rng.uniform()),
                }
            )
    return dets


def _reference_pycocotools(gt: dict, dets: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Plain pycocotools, the reference: stats [12] and precision [T, R, K, A, M]."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(copy.deepcopy(dets))
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.asarray(ev.stats), ev.eval["precision"]


@pytest.mark.parametrize("backend", ["faster", "pycocotools"])
def test_evaluate_dataset_matches_pycocotools_reference(backend: str) -> None:
    gt, dets = _make_gt(), None
    dets = _noisy_dets(gt)
    ref_stats, ref_prec = _reference_pycocotools(gt, dets)
    m = evaluate_dataset(gt, dets, backend=backend)
    assert len(m.stats) == len(STAT_NAMES) == 12
    np.testing.assert_allclose(m.stats, ref_stats, rtol=0, atol=1e-12)
    assert 0.05 < m.ap < 0.95  # a non-trivial case
    # per-category AP from the reference precision array (area all, maxDets 100)
    for k, name in enumerate(["a", "b", "c"]):
        p = ref_prec[:, :, k, 0, -1]
        expected = p[p > -1].mean() if (p > -1).any() else -1.0
        assert m.per_category_ap[name] == pytest.approx(expected, abs=1e-12)
        p50 = ref_prec[0, :, k, 0, -1]
        expected50 = p50[p50 > -1].mean() if (p50 > -1).any() else -1.0
        assert m.per_category_ap50[name] == pytest.approx(expected50, abs=1e-12)
    assert m.per_category_ap["c"] == -1.0  # no GT of category c: COCO's sentinel
    assert m.num_images == 6 and m.num_detections == len(dets)


@pytest.mark.parametrize("backend", ["faster", "pycocotools"])
def test_summarize_stats_equal_the_array_formula(backend: str) -> None:
    """maxDets (1, 10, 100) reads COCOeval.summarize(); it equals the formula kept for others."""
    gt = _make_gt()
    for dets in (_noisy_dets(gt), []):
        ev = _run_cocoeval(load_coco_gt(gt), dets, backend, 100)
        formula = _stats_from_arrays(ev)
        assert _summary_stats(ev) == formula  # exact
        if dets:
            np.testing.assert_array_equal(formula, _reference_pycocotools(gt, dets)[0])
        else:
            assert set(formula) <= {0.0, -1.0}


def test_backends_agree_and_gt_file_equals_dict(tmp_path) -> None:
    gt = _make_gt(seed=3)
    dets = _noisy_dets(gt, seed=4)
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    fast = evaluate_dataset(path, dets, backend="faster")
    ref = evaluate_dataset(gt, dets, backend="pycocotools")
    np.testing.assert_allclose(fast.stats, ref.stats, rtol=0, atol=1e-12)
    assert fast.per_category_ap == pytest.approx(ref.per_category_ap, abs=1e-12)
    # max_dets=10 keeps the 10 best detections per image and category: AR100 becomes AR10
    ten = evaluate_dataset(gt, dets, max_dets=10, backend="faster")
    ten_ref = evaluate_dataset(gt, dets, max_dets=10, backend="pycocotools")
    assert ten.ar100 == pytest.approx(fast.ar10, abs=1e-12)
    np.testing.assert_allclose(ten.stats, ten_ref.stats, rtol=0, atol=1e-12)
    assert ten.ap > 0


@pytest.mark.parametrize("backend", ["faster", "pycocotools"])
def test_perfect_predictions_give_ap_one(backend: str) -> None:
    gt = _make_gt(seed=5)
    for a in gt["annotations"]:  # no missing keys either: load_coco_gt fills them
        del a["area"], a["iscrowd"]
    dets = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1}
        for a in gt["annotations"]
    ]
    m = evaluate_dataset(gt, dets, backend=backend)
    for name, v in zip(STAT_NAMES, m.stats):
        if name in ("AR1",):  # images with 2+ objects of a category cannot reach AR1 = 1
            continue
        assert v in (1.0, -1.0) or v == pytest.approx(1.0), name
    assert m.ap == pytest.approx(1.0) and m.ap50 == pytest.approx(1.0)
    assert m.per_category_ap["a"] == pytest.approx(1.0)


@pytest.mark.parametrize("backend", ["faster", "pycocotools"])
def test_empty_detections_give_zero(backend: str) -> None:
    gt = _make_gt(seed=6)
    m = evaluate_dataset(gt, [], backend=backend)
    defined = [v for v in m.stats if v != -1.0]
    assert len(defined) >= 8 and all(v == 0.0 for v in defined)
    assert m.ap == 0.0 and m.ap50 == 0.0 and m.num_detections == 0
    assert all(v in (0.0, -1.0) for v in m.per_category_ap.values())


def test_bad_detection_image_id_is_rejected() -> None:
    gt = _make_gt()
    with pytest.raises(ValueError, match="image_id 999"):
        evaluate_dataset(
            gt, [{"image_id": 999, "category_id": 3, "bbox": [0, 0, 1, 1], "score": 1}]
        )


# ---------------------------------------------------------------------------------------------
# unified <-> native
# ---------------------------------------------------------------------------------------------


def _label_space() -> LabelSpace:
    return LabelSpace.build(
        [
            ("coco", [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}], 4),  # slot=id-1
            ("voc07", [{"id": 5, "name": "cat"}, {"id": 8, "name": "dog"}], None),
            ("voc12", [{"id": 5, "name": "cat"}, {"id": 8, "name": "dog"}], None),
            ("kitti", [{"id": 2, "name": "car"}], None),
        ]
    )


def _dets_from_gt(gt: dict, ls: LabelSpace, dataset_id: int, extra_labels=()) -> list:
    """GT boxes as perfect Detections with unified labels (+ extra foreign ones per image)."""
    out = []
    for im in gt["images"]:
        anns = [a for a in gt["annotations"] if a["image_id"] == im["id"]]
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float64).reshape(-1, 4)
        boxes = torch.cat((xywh[:, :2], xywh[:, :2] + xywh[:, 2:]), 1)
        labels = [ls.to_unified(dataset_id, a["category_id"]) for a in anns]
        for lab in extra_labels:
            boxes = torch.cat((boxes, torch.tensor([[1.0, 2.0, 30.0, 40.0]], dtype=boxes.dtype)))
            labels.append(lab)
        n = len(labels)
        out.append(
            Detections(
                boxes=boxes,
                scores=torch.linspace(1.0, 0.5, n, dtype=torch.float64),
                labels=torch.tensor(labels, dtype=torch.long),
                query_index=torch.arange(n),
            )
        )
    return out


def test_detections_to_coco_round_trip_native_ids() -> None:
    ls = _label_space()
    gt = _make_gt(seed=7, cats=((5, "cat"), (8, "dog"), (9, "unused")))
    gt["annotations"] = [a for a in gt["annotations"] if a["category_id"] in (5, 8)]
    voc07 = ls.dataset_index("voc07")
    foreign = [ls.to_unified(0, 1), ls.to_unified(3, 2)]  # coco person, kitti car
    dets = _dets_from_gt(gt, ls, voc07, extra_labels=foreign)
    ids = [im["id"] for im in gt["images"]]
    records = detections_to_coco(dets, ids, voc07, ls)
    assert len(records) == len(gt["annotations"])  # the 2 foreign per image are dropped
    got = sorted((r["image_id"], r["category_id"], *np.round(r["bbox"], 9)) for r in records)
    exp = sorted(
        (a["image_id"], a["category_id"], *np.round(a["bbox"], 9)) for a in gt["annotations"]
    )
    assert got == exp
    # voc12 shares voc07's block: its unified labels map to the same native ids
    assert detections_to_coco(dets, ids, ls.dataset_index("voc12"), ls) == records
    # COCO with slot = id - 1: unified 2 is native 3
    coco_dets = [Detections(torch.zeros(1, 4), torch.ones(1), torch.tensor([2]))]
    assert detections_to_coco(coco_dets, [1], 0, ls)[0]["category_id"] == 3
    m = evaluate_dataset(gt, records)
    assert m.ap == pytest.approx(1.0)


def test_label_out_of_range_is_rejected() -> None:
    ls = _label_space()
    bad = [Detections(torch.zeros(1, 4), torch.ones(1), torch.tensor([ls.num_classes]))]
    with pytest.raises(ValueError, match="labels must be in"):
        detections_to_coco(bad, [1], 0, ls)


# ---------------------------------------------------------------------------------------------
# evaluator
# ---------------------------------------------------------------------------------------------


def _evaluator_case(tmp_path):
    ls = _label_space()
    gt_voc = _make_gt(seed=8, cats=((5, "cat"), (8, "dog"), (9, "x")), num_images=4)
    gt_voc["categories"] = gt_voc["categories"][:2]
    gt_kitti = _make_gt(seed=9, cats=((2, "car"), (99, "x")), num_images=3)
    gt_kitti["categories"] = gt_kitti["categories"][:1]
    voc_path = tmp_path / "voc07_test.json"
    voc_path.write_text(json.dumps(gt_voc))
    gts = {"voc07": str(voc_path), "voc12": os.fspath(voc_path), "kitti": gt_kitti}
    return ls, gt_voc, gt_kitti, gts


def test_evaluator_means_tables_and_files(tmp_path) -> None:
    ls, gt_voc, gt_kitti, gts = _evaluator_case(tmp_path)
    ev = MultiDatasetEvaluator(gt=gts, label_space=ls, backend="faster")
    assert ev.skipped == {"voc12": "same test set as voc07"}
    assert ev.datasets_to_evaluate == ["voc07", "kitti"]
    voc07, kitti = ls.dataset_index("voc07"), ls.dataset_index("kitti")
    voc_dets = _dets_from_gt(gt_voc, ls, voc07, extra_labels=[ls.to_unified(0, 1)])
    kitti_dets = _dets_from_gt(gt_kitti, ls, kitti)
    for d in kitti_dets:  # shift every kitti box: AP50 stays 1 for large boxes, AP drops
        d.boxes[:, [0, 2]] += 0.25 * (d.boxes[:, 2:3] - d.boxes[:, 0:1])
    # a mixed batch, one image processed twice (sampler padding) -> counted once
    ev.process(
        [voc07, kitti, voc07],
        [gt_voc["images"][0]["id"], gt_kitti["images"][0]["id"], gt_voc["images"][0]["id"]],
        [voc_dets[0], kitti_dets[0], voc_dets[0]],
        oracle_detections=[voc_dets[0], kitti_dets[0], voc_dets[0]],
    )
    ev.process(
        torch.tensor([voc07] * 3), torch.tensor([im["id"] for im in gt_voc["images"][1:]]),
        voc_dets[1:], oracle_detections=voc_dets[1:],
    )  # fmt: skip
    ev.process([kitti] * 2, [im["id"] for im in gt_kitti["images"][1:]], kitti_dets[1:],
               oracle_detections=kitti_dets[1:])  # fmt: skip
    res = ev.evaluate()
    assert res is not None
    assert list(res.datasets) == ["voc07", "kitti"]
    v, k = res.datasets["voc07"], res.datasets["kitti"]
    assert v.ap == pytest.approx(1.0)
    assert v.num_foreign == 4 and v.foreign_share == pytest.approx(4 / (4 + v.num_detections))
    assert k.num_foreign == 0 and k.ap < 0.9
    assert res.mean_ap == pytest.approx((v.ap + k.ap) / 2)
    assert res.mean_ap50 == pytest.approx((v.ap50 + k.ap50) / 2)

    md = res.to_markdown()
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    table = {r.split("|")[1].strip(): [c.strip() for c in r.strip("|").split("|")] for r in rows}
    assert set(table) == {"dataset", "voc07", "kitti", "mean"}
    for col in ("AP", "AP50", "AP75", "AR100", "oracle AP"):
        i = header.index(col)
        vals = [float(table[n][i]) for n in ("voc07", "kitti")]
        assert float(table["mean"][i]) == pytest.approx(np.mean(vals), abs=0.006), col
    assert "skipped voc12: same test set as voc07" in md

    written = res.write(tmp_path / "out")
    assert set(written) >= {
        "results.json",
        "results.md",
        "detections_voc07.json",
        "detections_kitti.json",
        "detections_voc07_oracle.json",
    }
    loaded = json.loads(written["results.json"].read_text())
    assert loaded["mean"]["AP"] == pytest.approx(res.mean_ap)
    assert EvalResults.from_dict(loaded).datasets["kitti"].ap == pytest.approx(k.ap)
    dets_json = json.loads(written["detections_voc07.json"].read_text())
    assert {d["category_id"] for d in dets_json} <= {5, 8}  # native ids only
    kitti_json = json.loads(written["detections_kitti.json"].read_text())
    assert evaluate_dataset(gt_kitti, kitti_json).stats == pytest.approx(k.stats, abs=1e-12)
    assert re.search(r"\| mean \|", (tmp_path / "out" / "results.md").read_text())


def test_evaluator_unprocessed_images_count_as_missed(tmp_path) -> None:
    ls, gt_voc, _, gts = _evaluator_case(tmp_path)
    voc07 = ls.dataset_index("voc07")
    dets = _dets_from_gt(gt_voc, ls, voc07)
    full = MultiDatasetEvaluator(gt={"voc07": gts["voc07"]}, label_space=ls)
    sub = MultiDatasetEvaluator(
        gt={"voc07": gts["voc07"]}, label_space=ls, only_processed_images=True
    )
    for ev in (full, sub):
        ev.process([voc07], [gt_voc["images"][0]["id"]], dets[:1])
    r_full, r_sub = full.evaluate(), sub.evaluate()
    assert r_sub.datasets["voc07"].ap == pytest.approx(1.0)
    assert r_sub.datasets["voc07"].num_images == 1
    assert r_full.datasets["voc07"].ap < 0.9 and r_full.datasets["voc07"].num_images == 4


def _dist_worker(rank: int, world: int, init_file: str, tmp: str, q) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from pathlib import Path

        ls, gt_voc, _, gts = _evaluator_case(Path(tmp))
        voc07 = ls.dataset_index("voc07")
        dets = _dets_from_gt(gt_voc, ls, voc07)
        ev = MultiDatasetEvaluator(gt={"voc07": gts["voc07"]}, label_space=ls)
        mine = [i for i in range(4) if i % world == rank] + [0]  # image 0 twice (padding)
        ev.process([voc07] * len(mine), [gt_voc["images"][i]["id"] for i in mine],
                   [dets[i] for i in mine])  # fmt: skip
        res = ev.evaluate()
        q.put((rank, None if res is None else res.datasets["voc07"].to_dict()))
    finally:
        dist.destroy_process_group()


def test_evaluator_gathers_across_processes(tmp_path) -> None:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    mp.spawn(
        _dist_worker,
        args=(2, str(tmp_path / "init"), str(tmp_path), q),
        nprocs=2,
        join=True,
    )
    got = dict(q.get() for _ in range(2))
    assert got[1] is None
    assert got[0]["ap"] == pytest.approx(1.0)  # all 4 images arrived on rank 0
    assert got[0]["num_detections"] == len(_evaluator_case(tmp_path)[1]["annotations"])
