"""LISA CSV converter (no real CSV exists publicly: the documented format and the quoted row)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pycocotools.coco import COCO
from uodb_sample_layout import LISA_HEADER, LISA_ROWS, LISA_STOP, make_lisa

from damex.data.converters.lisa import convert_lisa, lisa_group, lisa_tag_to_class, read_lisa_rows
from damex.errors import DatasetError


@pytest.fixture
def lisa(tmp_path: Path) -> Path:
    return make_lisa(tmp_path / "src")


def test_lisa_tag_mapping() -> None:
    assert lisa_tag_to_class("stop") == "stop"
    assert lisa_tag_to_class("speedLimit25") == "speedlimit"
    assert lisa_tag_to_class("truckSpeedLimit55") == "speedlimit"
    assert lisa_tag_to_class("noLeftTurn") == "noturn"
    assert lisa_tag_to_class("noRightTurn") == "noturn"
    for tag in ("signalAhead", "pedestrianCrossing", "merge", "rampSpeedAdvisory45", "yieldAhead"):
        assert lisa_tag_to_class(tag) == "warning"
    for tag in ("keepRight", "doNotEnter", "yield", "zoneAhead45", "stopp"):
        assert lisa_tag_to_class(tag) is None


def test_lisa_boxes_by_hand(lisa: Path, tmp_path: Path) -> None:
    out = tmp_path / "l.json"
    r = convert_lisa(lisa / "allAnnotations.csv", lisa, out)
    COCO(str(out))
    data = json.loads(out.read_text())
    assert [c["name"] for c in data["categories"]] == ["stop", "speedlimit", "warning", "noturn"]
    stop_image = next(i for i in data["images"] if i["file_name"] == LISA_STOP)
    assert (stop_image["width"], stop_image["height"]) == (1024, 522)
    anns = [a for a in data["annotations"] if a["image_id"] == stop_image["id"]]
    # real row "...;stop;862;104;916;158;..." and a second sign on the same frame
    assert [(a["category_id"], a["bbox"]) for a in anns] == [
        (1, [862.0, 104.0, 54.0, 54.0]),
        (2, [100.0, 120.0, 30.0, 40.0]),
    ]
    assert r.images == 3 and r.boxes == 3
    assert r.skipped == {"LISA tag 'keepRight' not in UODB": 1}
    assert r.examples["LISA tag 'keepRight' not in UODB"] == [f"{lisa}/allAnnotations.csv:4"]


def test_lisa_fields_by_header_name_and_include(lisa: Path, tmp_path: Path) -> None:
    # Same data, columns in another order (and the short header without the flags column).
    header = LISA_HEADER.split(";")
    order = [1, 0, 5, 4, 3, 2]
    rows = [[r.split(";")[i] for i in order] for r in LISA_ROWS]
    csv = tmp_path / "frameAnnotations.csv"
    csv.write_text("\n".join(";".join(x) for x in [[header[i] for i in order], *rows]) + "\n")
    out = tmp_path / "l.json"
    r = convert_lisa(csv, lisa, out, include=lambda row: row["Filename"] == LISA_STOP)
    anns = json.loads(out.read_text())["annotations"]
    assert [a["bbox"] for a in anns] == [[862.0, 104.0, 54.0, 54.0], [100.0, 120.0, 30.0, 40.0]]
    assert r.images == 1


def test_lisa_group_is_the_recording(lisa: Path) -> None:
    rows = [row for _, row in read_lisa_rows(lisa / "allAnnotations.csv")]
    assert lisa_group(rows[0]) == "aiua120214-0/DataLog02142012_external_camera.avi"
    assert lisa_group({"Filename": "vid0/x/y.png"}) == "vid0/x"  # no Origin file column


def test_lisa_bad_inputs_name_the_line(lisa: Path, tmp_path: Path) -> None:
    csv = lisa / "allAnnotations.csv"
    good = csv.read_text()
    csv.write_text(good.replace(";stop;862;104;", ";stop;86x;104;"))
    with pytest.raises(DatasetError, match=r"allAnnotations\.csv:2: corner fields must be numbers"):
        convert_lisa(csv, lisa, tmp_path / "l.json")
    csv.write_text(good.replace(";keepRight;10;20;", ";keepRight;10;"))
    with pytest.raises(DatasetError, match=r"allAnnotations\.csv:4: expected 11 ';'-separated"):
        convert_lisa(csv, lisa, tmp_path / "l.json")
    r = convert_lisa(csv, lisa, tmp_path / "l.json", on_bad_sample="skip")
    assert r.skipped["malformed row"] == 1 and r.boxes == 3
    csv.write_text(good.replace("Annotation tag", "Tag"))
    with pytest.raises(
        DatasetError, match=r"allAnnotations\.csv:1: header lacks \['Annotation tag'\]"
    ):
        read_lisa_rows(csv)
    csv.write_text("")
    with pytest.raises(DatasetError, match=r"allAnnotations\.csv: empty annotation file"):
        convert_lisa(csv, lisa, tmp_path / "l.json")


def test_lisa_missing_frame(lisa: Path, tmp_path: Path) -> None:
    (lisa / LISA_STOP).unlink()
    with pytest.raises(
        DatasetError, match=r"allAnnotations\.csv:2: image not found: .*stop_1330545910"
    ):
        convert_lisa(lisa / "allAnnotations.csv", lisa, tmp_path / "l.json")
