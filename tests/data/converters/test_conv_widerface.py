"""WIDER FACE bbx_gt converter on the (second-hand) real head of wider_face_train_bbx_gt.txt."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pycocotools.coco import COCO
from uodb_sample_layout import WIDER_VAL, make_widerface

from damex.data.converters.widerface import convert_widerface
from damex.errors import DatasetError


@pytest.fixture
def wider(tmp_path: Path) -> Path:
    return make_widerface(tmp_path / "src")


def _val(wider: Path, out: Path, text: str | None = None, **kw: object):
    gt = wider / "wider_face_split/wider_face_val_bbx_gt.txt"
    if text is not None:
        gt.write_text(text)
    return convert_widerface(gt, wider / "WIDER_val/images", out, split="test", **kw)


def test_wider_train_first_face_by_hand(wider: Path, tmp_path: Path) -> None:
    out = tmp_path / "w.json"
    r = convert_widerface(
        wider / "wider_face_split/wider_face_train_bbx_gt.txt",
        wider / "WIDER_train/images",
        out,
        file_name_prefix="WIDER_train/",
    )
    COCO(str(out))
    data = json.loads(out.read_text())
    assert data["categories"] == [{"id": 1, "name": "face"}]
    assert [i["file_name"] for i in data["images"]] == [
        "WIDER_train/0--Parade/0_Parade_marchingband_1_849.jpg",
        "WIDER_train/0--Parade/0_Parade_Parade_0_904.jpg",
    ]
    # "449 330 122 149 0 0 0 0 0 0 " -> xywh as is
    assert [a["bbox"] for a in data["annotations"]] == [
        [449.0, 330.0, 122.0, 149.0],
        [361.0, 98.0, 263.0, 339.0],
    ]
    assert data["annotations"][0]["area"] == 122.0 * 149.0
    assert (r.images, r.boxes, r.ignored, r.num_skipped) == (2, 2, 0, 0)


def test_wider_zero_face_record_invalid_and_zero_width(wider: Path, tmp_path: Path) -> None:
    out = tmp_path / "w.json"
    r = _val(wider, out)
    data = json.loads(out.read_text())
    # The 0-face image is kept (empty) and its line of zeros is not read as a record/face.
    assert [i["file_name"] for i in data["images"]] == [
        "0--Parade/0_Parade_marchingband_1_465.jpg",
        "0--Parade/0_Parade_Parade_0_628.jpg",
    ]
    anns = data["annotations"]
    assert [(a["image_id"], a["bbox"], a["iscrowd"]) for a in anns] == [
        (2, [26.0, 299.0, 10.0, 16.0], 0),
        (2, [25.0, 329.0, 7.0, 11.0], 1),  # invalid=1 -> ignore region
    ]
    assert r.skipped["zero-area box"] == 1
    assert r.examples["zero-area box"][0].endswith("wider_face_val_bbx_gt.txt:8")
    assert (r.empty_images, r.boxes, r.ignored) == (1, 1, 1)
    r = _val(wider, out, invalid="drop")
    assert r.ignored == 0 and r.skipped["invalid face dropped"] == 1


def test_wider_zero_face_record_at_end_of_file(wider: Path, tmp_path: Path) -> None:
    text = WIDER_VAL.split("0--Parade/0_Parade_Parade_0_628.jpg")[0]  # only the 0-face record
    r = _val(wider, tmp_path / "w.json", text)
    assert (r.images, r.boxes) == (1, 0)


def test_wider_malformed_face_line(wider: Path, tmp_path: Path) -> None:
    text = WIDER_VAL.replace("26 299 10 16 2 0 0 0 0 0 ", "26 299 ten 16 2 0 0 0 0 0")
    with pytest.raises(DatasetError, match=r"wider_face_val_bbx_gt\.txt:6: fields must be numbers"):
        _val(wider, tmp_path / "w.json", text)
    r = _val(wider, tmp_path / "w.json", on_bad_sample="skip")
    assert r.skipped["malformed line"] == 1 and r.ignored == 1
    text = WIDER_VAL.replace("26 299 10 16 2 0 0 0 0 0 ", "26 299 10")
    with pytest.raises(DatasetError, match=r"bbx_gt\.txt:6: expected 10 fields"):
        _val(wider, tmp_path / "w.json", text)


def test_wider_bad_count_and_truncated_always_raise(wider: Path, tmp_path: Path) -> None:
    text = WIDER_VAL.replace("\n3\n", "\nthree\n")
    with pytest.raises(DatasetError, match=r"bbx_gt\.txt:5: expected the face count"):
        _val(wider, tmp_path / "w.json", text, on_bad_sample="skip")
    text = WIDER_VAL.replace("\n3\n", "\n4\n")
    with pytest.raises(DatasetError, match=r"bbx_gt\.txt:4: .* announces 4 faces"):
        _val(wider, tmp_path / "w.json", text)


def test_wider_empty_file_and_missing_image(wider: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"bbx_gt\.txt: empty annotation file"):
        _val(wider, tmp_path / "w.json", "\n")
    (wider / "WIDER_val/images/0--Parade/0_Parade_Parade_0_628.jpg").unlink()
    with pytest.raises(DatasetError, match=r"bbx_gt\.txt:4: image not found: .*Parade_0_628\.jpg"):
        _val(wider, tmp_path / "w.json", WIDER_VAL)
