"""damex.Predictor: loading a run, every accepted image type, native labels, explanations, and
the README example (run as written, with this test's run folder and image)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_fixtures import REF, tiny_config
from PIL import Image

import damex
from damex.engine.report import evaluate_checkpoint
from damex.errors import CheckpointError

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture(scope="module")
def predictor(reference_run: Path) -> damex.Predictor:
    return damex.Predictor.from_run(reference_run)


def _test_image(synthetic_root: Path, dataset: str) -> tuple[Path, int]:
    gt = json.loads((synthetic_root / dataset / "annotations" / "test.json").read_text())
    img = gt["images"][0]
    return synthetic_root / dataset / "images" / img["file_name"], int(img["id"])


def test_every_image_type_gives_the_same_detections(
    predictor: damex.Predictor, synthetic_root: Path
) -> None:
    path, _ = _test_image(synthetic_root, "syn_photo")
    with Image.open(path) as im:
        pil = im.convert("RGB")
    arr = np.asarray(pil)  # [H, W, 3] uint8
    chw = torch.from_numpy(arr.copy()).permute(2, 0, 1)
    ref = predictor(path)
    assert ref.image_size == arr.shape[:2] and len(ref) == predictor.cfg.eval.num_select
    for image in (str(path), pil, arr, chw, chw.float() / 255.0, arr.astype(np.float32) / 255):
        det = predictor(image)
        torch.testing.assert_close(det.boxes, ref.boxes, rtol=0, atol=1e-4)
        torch.testing.assert_close(det.scores, ref.scores, rtol=0, atol=1e-6)
        assert det.names == ref.names and torch.equal(det.experts, ref.experts)
    # batch of two different images = one call each (padding does not change the result)
    other, _ = _test_image(synthetic_root, "syn_signs")
    both = predictor.batch([path, other], batch_size=2)
    single = predictor(other)
    for got, want in ((both[0], ref), (both[1], single)):
        torch.testing.assert_close(got.scores, want.scores, rtol=0, atol=1e-4)
        torch.testing.assert_close(got.boxes, want.boxes, rtol=0, atol=1e-2)


def test_native_labels_match_the_evaluators_detections(
    predictor: damex.Predictor, synthetic_root: Path, reference_run: Path, tmp_path: Path
) -> None:
    """The predictor reproduces ``damex evaluate``'s detections (native ids, boxes, scores)."""
    cfg = tiny_config(synthetic_root, reference_run, **REF)
    evaluate_checkpoint(cfg, reference_run / "best.pth", datasets=["syn_signs"], out_dir=tmp_path)
    written = json.loads((tmp_path / "detections_syn_signs.json").read_text())
    path, image_id = _test_image(synthetic_root, "syn_signs")
    want = sorted((r for r in written if r["image_id"] == image_id), key=lambda r: -r["score"])
    det = predictor(path)
    gt = json.loads((synthetic_root / "syn_signs" / "annotations" / "test.json").read_text())
    names = {c["id"]: c["name"] for c in gt["categories"]}
    mine = [r for r in det.records() if r["dataset"] == "syn_signs"]
    assert want and len(mine) == len(want)
    for got, ref in zip(mine, want):
        assert got["category_id"] == ref["category_id"]
        assert got["label"] == names[ref["category_id"]]  # the dataset's own class name
        assert got["score"] == pytest.approx(ref["score"], abs=1e-4)
        x1, y1, x2, y2 = got["box"]
        assert [x1, y1, x2 - x1, y2 - y1] == pytest.approx(ref["bbox"], abs=1e-2)


def test_eval_voc_metric_reaches_the_evaluation(
    synthetic_root: Path, reference_run: Path, tmp_path: Path
) -> None:
    """``eval.voc_metric=11point`` gives the VOC07 11-point AP50 of the written detections."""
    from damex.config import with_overrides
    from damex.evaluation.voc_eval import voc_eval

    cfg = tiny_config(synthetic_root, reference_run, **REF)
    gt = json.loads((synthetic_root / "syn_signs" / "annotations" / "test.json").read_text())
    for metric in ("area", "11point"):
        out = tmp_path / metric
        res = evaluate_checkpoint(
            with_overrides(cfg, [f"eval.voc_metric={metric}"]),
            reference_run / "best.pth",
            datasets=["syn_signs"],
            out_dir=out,
        )
        dets = json.loads((out / "detections_syn_signs.json").read_text())
        ids = sorted({int(r["image_id"]) for r in dets})
        want = voc_eval(gt, dets, metric=metric, image_ids=ids).ap
        m = res.datasets["syn_signs"]
        assert m.voc_metric == metric
        assert m.voc_ap50 == pytest.approx(want, abs=1e-9)


def test_explanations_name_expert_gate_and_mapped_datasets(
    predictor: damex.Predictor, synthetic_root: Path
) -> None:
    path, _ = _test_image(synthetic_root, "syn_signs")
    det = predictor(path)
    records = det.records()
    json.dumps(records)  # JSON-ready
    num_experts = predictor.cfg.moe.num_experts
    assert det.layer_names == ["decoder.0"]  # tiny config: decoder_ffn [moe, dense]
    for r in records:
        (choice,) = r["experts"]
        assert 0 <= choice["expert"] < num_experts
        # the top-1 softmax probability is at least 1/E and at most 1
        assert 1.0 / num_experts - 1e-6 <= choice["gate"] <= 1.0
        assert choice["datasets"] == [
            n for n, e in predictor.expert_map.items() if e == choice["expert"]
        ]
        assert r["dataset"] in ("syn_photo", "syn_signs")
    # detections of one query share the query's routing
    by_query: dict[int, tuple[int, float]] = {}
    for r in records:
        key = (r["experts"][0]["expert"], r["experts"][0]["gate"])
        assert by_query.setdefault(r["query"], key) == key


def test_router_label_mask_keeps_the_voted_datasets_labels(
    predictor: damex.Predictor, reference_run: Path, synthetic_root: Path
) -> None:
    """label_mask='router': the labels come from the dataset(s) the image's router votes for."""
    masked = damex.Predictor.from_run(reference_run, label_mask="router")
    for dataset in ("syn_photo", "syn_signs"):
        path, _ = _test_image(synthetic_root, dataset)
        full, det = predictor(path), masked(path)
        votes = predictor.routing_counts([path]).sum(0)  # [E]: all matching queries' votes
        voted = [n for n, e in predictor.expert_map.items() if votes[e] == votes.max()]
        assert set(det.datasets) <= set(voted) and len(det) > 0
        # the masked top-K is the unmasked ranking with the other datasets' labels removed
        keep = [i for i, d in enumerate(full.datasets) if d in voted]
        n = min(len(keep), len(det))
        torch.testing.assert_close(det.scores[:n], full.scores[keep][:n], rtol=0, atol=1e-6)
    with pytest.raises(damex.ConfigError, match="label_mask must be"):
        damex.Predictor.from_run(reference_run, label_mask="oracle")


def test_bad_inputs_are_named(predictor: damex.Predictor, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        predictor(torch.full((3, 8, 8), 200.0))
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        predictor(torch.zeros(8, 8, 3, dtype=torch.uint8))
    with pytest.raises(FileNotFoundError, match="nope.png"):
        predictor(tmp_path / "nope.png")
    with pytest.raises(CheckpointError, match="has no checkpoint"):
        damex.Predictor.from_run(tmp_path)


def test_readme_example_runs(reference_run: Path, synthetic_root: Path, capsys) -> None:
    text = README.read_text(encoding="utf-8")
    match = re.search(r"<!-- predictor-example -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README lost its predictor example"
    code = match.group(1)
    assert len(code.strip().splitlines()) <= 6
    path, _ = _test_image(synthetic_root, "syn_signs")
    code = code.replace("runs/synthetic_damex_small", str(reference_run))
    code = code.replace("data/synthetic/syn_signs/images/test_00000.jpg", str(path))
    exec(compile(code, str(README), "exec"), {})
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5
    dataset, label = lines[0].split()[:2]
    assert dataset in ("syn_photo", "syn_signs") and label.isidentifier()


def test_explained_demo_writes_json_and_a_readable_overlay(
    synthetic_root: Path, reference_run: Path, tmp_path: Path
) -> None:
    from damex.engine.report import run_explained_demo

    cfg = tiny_config(synthetic_root, reference_run, **REF)
    path, _ = _test_image(synthetic_root, "syn_signs")
    written = run_explained_demo(
        cfg, reference_run / "best.pth", path, tmp_path, top_n=3, min_score=0.0
    )
    assert written == [tmp_path / f"{path.stem}.png"]
    doc = json.loads((tmp_path / f"{path.stem}.json").read_text())
    dets = doc["detections"]
    assert len(dets) == cfg.eval.num_select and doc["moe_layers"] == ["decoder.0"]
    shown = [d for d in dets if d["shown"]]
    assert 1 <= len(shown) <= 3 and len({d["query"] for d in shown}) == len(shown)
    assert all(d["score"] >= 0.3 * dets[0]["score"] - 1e-6 for d in shown)  # per-image threshold
    with Image.open(written[0]) as im:
        assert min(im.size) >= 512  # the 96 px test image is enlarged for display
