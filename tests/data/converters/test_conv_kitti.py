"""KITTI label_2 converter on the real 000000-000002 labels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pycocotools.coco import COCO
from uodb_sample_layout import make_kitti

from damex.data.converters.kitti import convert_kitti
from damex.errors import DatasetError


@pytest.fixture
def kitti(tmp_path: Path) -> Path:
    return make_kitti(tmp_path / "src")


def _convert(kitti: Path, out: Path, **kw: object):
    return convert_kitti(kitti / "training/label_2", kitti / "training/image_2", out, **kw)


def test_kitti_boxes_by_hand(kitti: Path, tmp_path: Path) -> None:
    out = tmp_path / "k.json"
    r = _convert(kitti, out)
    COCO(str(out))
    data = json.loads(out.read_text())
    assert [c["name"] for c in data["categories"]] == ["pedestrian", "cyclist", "vehicle"]
    assert [(i["file_name"], i["width"], i["height"]) for i in data["images"]] == [
        ("000000.png", 1242, 375), ("000001.png", 1242, 375), ("000002.png", 1242, 375),
    ]  # fmt: skip
    by_image: dict[int, list] = {}
    for a in data["annotations"]:
        by_image.setdefault(a["image_id"], []).append((a["category_id"], a["bbox"]))
    # 000000: Pedestrian 712.40 143.00 810.73 307.92
    assert by_image[1] == [(1, [712.4, 143.0, 98.33, 164.92])]
    # 000001: Truck -> vehicle, Car 387.63 181.54 423.81 203.12 -> vehicle, Cyclist; 4 DontCare
    assert by_image[2] == [
        (3, [599.41, 156.4, 30.34, 32.85]),
        (3, [387.63, 181.54, 36.18, 21.58]),
        (2, [676.6, 163.95, 12.38, 29.98]),
    ]
    car = data["annotations"][2]
    assert car["area"] == round(36.18 * 21.58, 6)
    # 000002: Misc dropped, Car kept
    assert by_image[3] == [(3, [657.39, 190.13, 42.68, 33.26])]
    assert r.skipped == {"KITTI type 'DontCare' not in UODB": 4, "KITTI type 'Misc' not in UODB": 1}
    assert r.examples["KITTI type 'Misc' not in UODB"] == [f"{kitti}/training/label_2/000002.txt:1"]
    assert (r.images, r.boxes, r.ignored) == (3, 5, 0)


def test_kitti_image_ids_select_a_split(kitti: Path, tmp_path: Path) -> None:
    out = tmp_path / "k.json"
    r = _convert(kitti, out, image_ids=["000002"], split="test", file_name_prefix="x/")
    data = json.loads(out.read_text())
    assert [i["file_name"] for i in data["images"]] == ["x/000002.png"]
    assert r.split == "test" and r.images == 1


def _line(path: Path, lineno: int, new: str) -> None:
    lines = path.read_text().splitlines()
    lines[lineno - 1] = new
    path.write_text("\n".join(lines) + "\n")


def test_kitti_malformed_line_names_file_and_line(kitti: Path, tmp_path: Path) -> None:
    label = kitti / "training/label_2/000001.txt"
    _line(label, 2, "Car 0.00 0 1.85 387.63 181.54")
    with pytest.raises(DatasetError, match=r"000001\.txt:2: expected 15 space-separated fields"):
        _convert(kitti, tmp_path / "k.json")
    r = _convert(kitti, tmp_path / "k.json", on_bad_sample="skip")
    assert r.skipped["malformed line"] == 1 and r.boxes == 4


def test_kitti_unknown_type(kitti: Path, tmp_path: Path) -> None:
    label = kitti / "training/label_2/000002.txt"
    label.write_text(label.read_text().replace("Misc", "Bus"))
    with pytest.raises(DatasetError, match=r"000002\.txt:1: unknown KITTI type 'Bus'"):
        _convert(kitti, tmp_path / "k.json")


def test_kitti_bad_number(kitti: Path, tmp_path: Path) -> None:
    label = kitti / "training/label_2/000000.txt"
    label.write_text(label.read_text().replace("712.40", "7l2.40"))
    with pytest.raises(DatasetError, match=r"000000\.txt:1: bbox fields 5-8 must be numbers"):
        _convert(kitti, tmp_path / "k.json")


def test_kitti_missing_image_names_it(kitti: Path, tmp_path: Path) -> None:
    (kitti / "training/image_2/000000.png").unlink()
    with pytest.raises(DatasetError, match=r"000000\.txt: image not found: .*image_2/000000\.png"):
        _convert(kitti, tmp_path / "k.json")
    r = _convert(kitti, tmp_path / "k.json", on_bad_sample="skip")
    assert r.skipped["missing image"] == 1 and r.images == 2


def test_kitti_empty_label_file(kitti: Path, tmp_path: Path) -> None:
    (kitti / "training/label_2/000002.txt").write_text("")
    with pytest.raises(DatasetError, match=r"000002\.txt: empty annotation file"):
        _convert(kitti, tmp_path / "k.json")


def test_kitti_zero_area_skipped_and_out_of_bounds_clipped(kitti: Path, tmp_path: Path) -> None:
    label = kitti / "training/label_2/000002.txt"
    # Car with right == left: zero width; Misc line replaced by a Van leaving the 1242 px image.
    _line(
        label,
        2,
        "Car 0.00 0 -1.67 657.39 190.13 657.39 223.39 1.41 1.58 4.36 3.18 2.27 34.38 -1.58",
    )
    _line(
        label,
        1,
        "Van 0.00 0 -1.82 1200.00 167.34 1250.50 327.94 1.63 1.48 2.37 3.23 1.59 8.55 -1.47",
    )
    out = tmp_path / "k.json"
    r = _convert(kitti, out, image_ids=["000002"])
    assert r.skipped["zero-area box"] == 1
    assert r.examples["zero-area box"] == [f"{label}:2"]
    assert r.clipped == 1
    assert json.loads(out.read_text())["annotations"][0]["bbox"] == [1200.0, 167.34, 42.0, 160.6]
    with pytest.raises(DatasetError, match=r"000002\.txt:1: box .* leaves the 1242x375 image"):
        _convert(kitti, out, image_ids=["000002"], out_of_bounds="error")
