"""VOC XML converter on the real VOC2007 000001/000002 annotations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pycocotools.coco import COCO
from uodb_sample_layout import make_voc07

from damex.data.converters.voc import UODB_KITTI_VOC_ALIASES, convert_voc
from damex.data.uodb import UODB_CLASSES, VOC_CLASSES
from damex.errors import DatasetError


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _edit(xml: Path, old: str, new: str, count: int = 1) -> None:
    text = xml.read_text()
    assert old in text
    xml.write_text(text.replace(old, new, count))


@pytest.fixture
def voc(tmp_path: Path) -> Path:
    return make_voc07(tmp_path / "src")


def test_voc_000001_boxes_by_hand(voc: Path, tmp_path: Path) -> None:
    out = tmp_path / "test.json"
    report = convert_voc(voc, "test", out, classes=VOC_CLASSES, split="test")
    coco = COCO(str(out))  # pycocotools accepts it
    data = _load(out)
    assert data["images"] == [{"id": 1, "file_name": "000001.jpg", "width": 353, "height": 500}]
    assert [c["id"] for c in data["categories"]] == list(range(1, 21))
    anns = data["annotations"]
    # dog: xmin 48 ymin 240 xmax 195 ymax 371 (1-based inclusive) -> [47, 239, 148, 132]
    dog, person = anns
    assert dog["category_id"] == VOC_CLASSES.index("dog") + 1 == 12
    assert dog["bbox"] == [47.0, 239.0, 148.0, 132.0]
    assert dog["area"] == 148.0 * 132.0
    assert dog["iscrowd"] == 0
    # person: 8 12 352 498 -> [7, 11, 345, 487]; x1 = 352 <= 353, no clipping
    assert person["category_id"] == 15
    assert person["bbox"] == [7.0, 11.0, 345.0, 487.0]
    assert (report.images, report.boxes, report.ignored, report.clipped) == (1, 2, 0, 0)
    assert len(coco.getAnnIds(imgIds=[1])) == 2


def test_voc_difficult_policies(voc: Path, tmp_path: Path) -> None:
    _edit(voc / "Annotations/000001.xml", "<difficult>0</difficult>", "<difficult>1</difficult>")
    out = tmp_path / "a.json"
    r = convert_voc(voc, "test", out, classes=VOC_CLASSES)
    assert [a["iscrowd"] for a in _load(out)["annotations"]] == [1, 0]
    assert (r.boxes, r.ignored) == (1, 1)
    r = convert_voc(voc, "test", out, classes=VOC_CLASSES, difficult="drop")
    assert [a["category_id"] for a in _load(out)["annotations"]] == [15]
    assert r.skipped["difficult dropped"] == 1
    convert_voc(voc, "test", out, classes=VOC_CLASSES, difficult="keep")
    assert [a["iscrowd"] for a in _load(out)["annotations"]] == [0, 0]


def test_voc_missing_difficult_is_zero(voc: Path, tmp_path: Path) -> None:
    xml = voc / "Annotations/000001.xml"
    xml.write_text(xml.read_text().replace("\t\t<difficult>0</difficult>\n", ""))
    r = convert_voc(voc, "test", tmp_path / "a.json", classes=VOC_CLASSES)
    assert (r.boxes, r.ignored) == (2, 0)


def test_voc_unknown_class_names_file_and_line(voc: Path, tmp_path: Path) -> None:
    _edit(voc / "Annotations/000001.xml", "<name>dog</name>", "<name>unicorn</name>")
    out = tmp_path / "a.json"
    with pytest.raises(DatasetError, match=r"000001\.xml:20 <object> #1.*unknown class 'unicorn'"):
        convert_voc(voc, "test", out, classes=VOC_CLASSES)
    assert not out.exists()  # nothing half-written
    assert list(tmp_path.glob(".*tmp")) == []
    r = convert_voc(voc, "test", out, classes=VOC_CLASSES, on_bad_sample="skip")
    assert r.skipped["unknown class 'unicorn'"] == 1
    assert r.examples["unknown class 'unicorn'"][0].endswith("000001.xml:20 <object> #1")
    assert [a["category_id"] for a in _load(out)["annotations"]] == [15]


def test_voc_malformed_xml_names_line(voc: Path, tmp_path: Path) -> None:
    _edit(voc / "Annotations/000001.xml", "</object>\n\t<object>", "</objekt>\n\t<object>")
    with pytest.raises(DatasetError, match=r"000001\.xml:31: malformed XML"):
        convert_voc(voc, "test", tmp_path / "a.json", classes=VOC_CLASSES)
    with pytest.raises(DatasetError, match=r"test\.txt: no images .* skipped"):
        convert_voc(voc, "test", tmp_path / "a.json", classes=VOC_CLASSES, on_bad_sample="skip")
    assert not (tmp_path / "a.json").exists()
    r = convert_voc(
        voc,
        "test",
        tmp_path / "a.json",
        classes=VOC_CLASSES,
        on_bad_sample="skip",
        allow_empty=True,
    )
    assert r.skipped["malformed XML"] == 1 and r.images == 0


def test_voc_bad_number_names_bndbox_line(voc: Path, tmp_path: Path) -> None:
    _edit(voc / "Annotations/000001.xml", "<xmin>48</xmin>", "<xmin>4x8</xmin>")
    with pytest.raises(DatasetError, match=r"000001\.xml:25 <bndbox> of <object> #1: <xmin>"):
        convert_voc(voc, "test", tmp_path / "a.json", classes=VOC_CLASSES)


def test_voc_empty_file(voc: Path, tmp_path: Path) -> None:
    (voc / "Annotations/000001.xml").write_text("")
    with pytest.raises(DatasetError, match=r"000001\.xml: empty annotation file"):
        convert_voc(voc, "test", tmp_path / "a.json", classes=VOC_CLASSES)


def test_voc_out_of_bounds_clip_or_error(voc: Path, tmp_path: Path) -> None:
    _edit(voc / "Annotations/000001.xml", "<xmax>352</xmax>", "<xmax>400</xmax>")
    out = tmp_path / "a.json"
    r = convert_voc(voc, "test", out, classes=VOC_CLASSES)
    assert r.clipped == 1
    assert _load(out)["annotations"][1]["bbox"] == [7.0, 11.0, 346.0, 487.0]  # x1 clipped to 353
    with pytest.raises(DatasetError, match=r"000001\.xml:32 <object> #2.*leaves the 353x500"):
        convert_voc(voc, "test", out, classes=VOC_CLASSES, out_of_bounds="error")


def test_voc_missing_size_reads_image_or_names_it(voc: Path, tmp_path: Path) -> None:
    _edit(voc / "Annotations/000001.xml", "<width>353</width>", "<width>0</width>")
    out = tmp_path / "a.json"
    convert_voc(voc, "test", out, classes=VOC_CLASSES)
    assert _load(out)["images"][0]["width"] == 353  # from the JPEG header
    (voc / "JPEGImages/000001.jpg").unlink()
    with pytest.raises(DatasetError, match=r"image not found: .*JPEGImages/000001\.jpg"):
        convert_voc(voc, "test", out, classes=VOC_CLASSES)


def test_voc_uodb_kitti_aliases(voc: Path, tmp_path: Path) -> None:
    """UODB's KITTIVOC uses lower-case KITTI names: car -> vehicle, dontcare dropped."""
    _edit(voc / "Annotations/000001.xml", "<name>dog</name>", "<name>Car</name>")
    _edit(voc / "Annotations/000001.xml", "<name>person</name>", "<name>dontcare</name>")
    out = tmp_path / "a.json"
    r = convert_voc(voc, "test", out, classes=UODB_CLASSES["kitti"], aliases=UODB_KITTI_VOC_ALIASES)
    assert [a["category_id"] for a in _load(out)["annotations"]] == [3]  # vehicle
    assert r.skipped["class 'dontcare' not in UODB"] == 1
