"""GMU-Kitchen converter (format unverified) on frame XMLs made from the real VOC samples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pycocotools.coco import COCO
from uodb_sample_layout import make_kitchen, write_image

from damex.data.converters.kitchen import convert_kitchen, list_kitchen_scenes
from damex.data.uodb import UODB_CLASSES
from damex.errors import DatasetError

KITCHEN = UODB_CLASSES["kitchen"]


@pytest.fixture
def kitchen(tmp_path: Path) -> Path:
    return make_kitchen(tmp_path / "src")


def test_kitchen_frames_by_hand(kitchen: Path, tmp_path: Path) -> None:
    assert list_kitchen_scenes(kitchen) == ["gmu_scene_001", "gmu_scene_002", "gmu_scene_003"]
    out = tmp_path / "k.json"
    r = convert_kitchen(kitchen, ["gmu_scene_002"], out)
    COCO(str(out))
    data = json.loads(out.read_text())
    assert [i["file_name"] for i in data["images"]] == [
        "gmu_scene_002/Images/rgb_1.png",
        "gmu_scene_002/Images/rgb_2.png",
    ]
    assert [c["name"] for c in data["categories"]] == KITCHEN
    # VOC 000001's dog box (48 240 195 371) renamed coca_cola_glass_bottle
    first = data["annotations"][0]
    assert first["bbox"] == [47.0, 239.0, 148.0, 132.0]
    assert first["category_id"] == KITCHEN.index("coca_cola_glass_bottle") + 1 == 1
    assert data["annotations"][2]["category_id"] == KITCHEN.index("pringles_bbq") + 1
    assert (r.images, r.boxes) == (2, 3)


def test_kitchen_size_from_png_when_missing(kitchen: Path, tmp_path: Path) -> None:
    xml = kitchen / "gmu_scene_001/Annotations/rgb_1.xml"
    text = xml.read_text()
    start, end = text.index("\t<size>"), text.index("</size>\n") + len("</size>\n")
    xml.write_text(text[:start] + text[end:])
    out = tmp_path / "k.json"
    with pytest.raises(DatasetError, match=r"rgb_1\.xml: <size> missing: image not found: .*rgb_1"):
        convert_kitchen(kitchen, ["gmu_scene_001"], out)
    write_image(kitchen / "gmu_scene_001/Images/rgb_1.png", (1920, 1080))
    convert_kitchen(kitchen, ["gmu_scene_001"], out)
    assert json.loads(out.read_text())["images"][0]["width"] == 1920


def test_kitchen_unknown_object_names_line(kitchen: Path, tmp_path: Path) -> None:
    xml = kitchen / "gmu_scene_003/Annotations/rgb_2.xml"
    xml.write_text(xml.read_text().replace("pringles_bbq", "pringles_sour_cream"))
    with pytest.raises(DatasetError, match=r"rgb_2\.xml:20 <object> #1: unknown class"):
        convert_kitchen(kitchen, ["gmu_scene_003"], tmp_path / "k.json")


def test_kitchen_missing_scene(kitchen: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"gmu_scene_009/Annotations: scene annotation folder"):
        convert_kitchen(kitchen, ["gmu_scene_009"], tmp_path / "k.json")
