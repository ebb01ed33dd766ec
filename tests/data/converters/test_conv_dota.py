"""DOTA labelTxt converter on the real DOTA_devkit example labels (CRLF, gsd header)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pycocotools.coco import COCO
from uodb_sample_layout import make_dota

from damex.data.converters.dota import convert_dota
from damex.data.uodb import UODB_CLASSES
from damex.errors import DatasetError

DOTA = UODB_CLASSES["dota"]


@pytest.fixture
def dota(tmp_path: Path) -> Path:
    return make_dota(tmp_path / "src")


def test_dota_p1888_first_polygon_min_max(dota: Path, tmp_path: Path) -> None:
    assert b"\r\n" in (dota / "train/labelTxt/P1888.txt").read_bytes()  # real CRLF file
    out = tmp_path / "d.json"
    r = convert_dota(dota / "train/labelTxt", dota / "train/images", out, file_name_prefix="train/")
    COCO(str(out))
    data = json.loads(out.read_text())
    assert [(i["file_name"], i["width"], i["height"]) for i in data["images"]] == [
        ("train/P0770.png", 1470, 1299),
        ("train/P1888.png", 712, 557),
    ]
    p1888 = [a for a in data["annotations"] if a["image_id"] == 2]
    assert len(p1888) == 64
    # "674 375 683 375 684 394 675 395 small-vehicle 0": x 674..684, y 375..395
    first = p1888[0]
    assert first["bbox"] == [674.0, 375.0, 10.0, 20.0]
    assert first["category_id"] == DOTA.index("small-vehicle") + 1
    # "465 371 455 372 451 324 460 323 large-vehicle 0": x 451..465, y 323..372
    assert p1888[2]["bbox"] == [451.0, 323.0, 14.0, 49.0]
    assert p1888[2]["category_id"] == DOTA.index("large-vehicle") + 1
    assert (r.images, r.boxes, r.ignored, r.clipped) == (2, 22 + 64, 0, 0)


def test_dota_difficult_is_ignore(dota: Path, tmp_path: Path) -> None:
    out = tmp_path / "d.json"
    r = convert_dota(dota / "val/labelTxt", dota / "val/images", out)
    assert (r.boxes, r.ignored) == (141, 17)  # P2709 has 17 objects with difficult=1
    anns = json.loads(out.read_text())["annotations"]
    # line 21: "1474 1053 1486 1053 1486 1066 1474 1066 storage-tank 1"
    crowd = [a for a in anns if a["iscrowd"]]
    assert crowd[0]["bbox"] == [1474.0, 1053.0, 12.0, 13.0]
    assert crowd[0]["category_id"] == DOTA.index("storage-tank") + 1
    r = convert_dota(dota / "val/labelTxt", dota / "val/images", out, difficult="drop")
    assert (r.boxes, r.ignored, r.skipped["difficult dropped"]) == (141, 0, 17)


def test_dota_without_header_and_with_gsd_null(dota: Path, tmp_path: Path) -> None:
    label = dota / "train/labelTxt/P1888.txt"
    lines = label.read_text().splitlines()
    label.write_text("\n".join(lines[2:]) + "\n")  # no header at all
    p0770 = dota / "train/labelTxt/P0770.txt"
    p0770.write_text(p0770.read_text().replace("gsd:0.266578848023", "gsd:null"))
    r = convert_dota(dota / "train/labelTxt", dota / "train/images", tmp_path / "d.json")
    assert r.boxes == 86 and r.num_skipped == 0


def test_dota_unknown_class_and_malformed_line(dota: Path, tmp_path: Path) -> None:
    label = dota / "train/labelTxt/P1888.txt"
    text = label.read_text()
    label.write_text(text.replace("large-vehicle 0", "airport 0", 1))
    with pytest.raises(DatasetError, match=r"P1888\.txt:5: unknown class 'airport'"):
        convert_dota(dota / "train/labelTxt", dota / "train/images", tmp_path / "d.json")
    # 9 fields (a coordinate lost): an error that says 10 are expected and 9 were found
    label.write_text(text.replace("683 351 694 351", "683 351 694", 1))
    with pytest.raises(
        DatasetError, match=r"P1888\.txt:4: expected 10 space-separated fields .*, got 9"
    ):
        convert_dota(dota / "train/labelTxt", dota / "train/images", tmp_path / "d.json")
    # 9 fields (difficult missing) is no longer accepted silently either
    label.write_text(text.replace("small-vehicle 0", "small-vehicle", 1))
    with pytest.raises(DatasetError, match=r"P1888\.txt:\d+: expected 10 .*, got 9"):
        convert_dota(dota / "train/labelTxt", dota / "train/images", tmp_path / "d.json")
    label.write_text(text.replace("683 351 694 351", "683 351 694 x", 1))
    with pytest.raises(
        DatasetError, match=r"P1888\.txt:4: coordinates and difficult must be numbers"
    ):
        convert_dota(dota / "train/labelTxt", dota / "train/images", tmp_path / "d.json")
    label.write_text(text.replace("683 351 694 351", "683 351 694", 1))
    r = convert_dota(
        dota / "train/labelTxt", dota / "train/images", tmp_path / "d.json", on_bad_sample="skip"
    )
    assert r.skipped["malformed line"] == 1 and r.boxes == 85


def test_dota_missing_image_and_empty_file(dota: Path, tmp_path: Path) -> None:
    (dota / "train/images/P0770.png").unlink()
    with pytest.raises(DatasetError, match=r"P0770\.txt: image not found: .*images/P0770"):
        convert_dota(dota / "train/labelTxt", dota / "train/images", tmp_path / "d.json")
    (dota / "train/labelTxt/P0770.txt").unlink()
    (dota / "train/labelTxt/P1888.txt").write_text("\r\n")
    with pytest.raises(DatasetError, match=r"P1888\.txt: empty annotation file"):
        convert_dota(dota / "train/labelTxt", dota / "train/images", tmp_path / "d.json")
