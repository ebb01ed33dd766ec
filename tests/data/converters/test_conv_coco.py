"""COCO passthrough on the real (transcribed) coco_dummy instances_val2017.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pycocotools.coco import COCO
from uodb_sample_layout import SAMPLES

from damex.data.converters.coco import coco2014_val_name, convert_coco
from damex.data.uodb import COCO_CATEGORY_IDS, COCO_CLASSES
from damex.errors import DatasetError

SAMPLE = SAMPLES / "coco/annotations/instances_val2017.json"


def test_coco_passthrough_keeps_native_ids(tmp_path: Path) -> None:
    out = tmp_path / "c.json"
    r = convert_coco(SAMPLE, out)
    COCO(str(out))
    data = json.loads(out.read_text())
    src = json.loads(SAMPLE.read_text())
    assert [c["id"] for c in data["categories"]] == COCO_CATEGORY_IDS
    assert [c["name"] for c in data["categories"]] == COCO_CLASSES
    assert [i["id"] for i in data["images"]] == [255917, 139]
    assert data["images"][0] == {
        "id": 255917, "file_name": "000000255917.jpg", "width": 640, "height": 427,
    }  # fmt: skip
    ann = {a["id"]: a for a in data["annotations"]}
    assert len(ann) == 37
    assert ann[403418] == {
        "id": 403418, "image_id": 255917, "category_id": 10,
        "bbox": [222.62, 217.82, 19.19, 21.11], "area": 385.75690000000003, "iscrowd": 0,
    }  # fmt: skip
    assert ann[403418]["area"] == next(a["area"] for a in src["annotations"] if a["id"] == 403418)
    crowd = ann[900300255917]
    assert (crowd["iscrowd"], crowd["bbox"], crowd["area"]) == (1, [59.0, 253.0, 252.0, 84.0], 4015)
    assert "segmentation" not in crowd
    assert (r.images, r.boxes, r.ignored, r.clipped, r.num_skipped) == (2, 36, 1, 0, 0)


def test_coco_exclude_and_rename(tmp_path: Path) -> None:
    out = tmp_path / "c.json"
    r = convert_coco(
        SAMPLE, out, exclude_image_ids={139}, file_name_fn=coco2014_val_name, keep_segmentation=True
    )
    data = json.loads(out.read_text())
    assert data["images"] == [
        {"id": 255917, "file_name": "COCO_val2014_000000255917.jpg", "width": 640, "height": 427}
    ]
    assert {a["image_id"] for a in data["annotations"]} == {255917}
    assert all("segmentation" in a for a in data["annotations"])
    assert r.images == 1


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "in.json"
    path.write_text(json.dumps(data, indent=1))
    return path


def test_coco_bad_inputs(tmp_path: Path) -> None:
    src = json.loads(SAMPLE.read_text())
    bad = tmp_path / "bad.json"
    bad.write_text('{\n "images": [\n  {"id": 1,}\n ]\n}\n')
    with pytest.raises(DatasetError, match=r"bad\.json: invalid JSON at line 3"):
        convert_coco(bad, tmp_path / "c.json")
    bad.write_text("")
    with pytest.raises(DatasetError, match=r"bad\.json: empty annotation file"):
        convert_coco(bad, tmp_path / "c.json")
    data = json.loads(json.dumps(src))
    data["annotations"][3]["category_id"] = 12  # an id COCO does not use
    with pytest.raises(
        DatasetError, match=r"in\.json annotations\[3\] \(id 1355973\): category id"
    ):
        convert_coco(_write(tmp_path, data), tmp_path / "c.json")
    r = convert_coco(_write(tmp_path, data), tmp_path / "c.json", on_bad_sample="skip")
    assert r.skipped["unknown category id"] == 1
    data = json.loads(json.dumps(src))
    data["categories"][0]["name"] = "human"
    with pytest.raises(DatasetError, match=r"categories\[0\] is \(1, 'human'\)"):
        convert_coco(_write(tmp_path, data), tmp_path / "c.json")
    data = json.loads(json.dumps(src))
    data["annotations"][0]["bbox"] = [630.0, 400.0, 20.0, 0.0]
    r = convert_coco(_write(tmp_path, data), tmp_path / "c.json")
    assert r.clipped == 1 and r.skipped["zero-area box"] == 1
