"""DeepLesion converter on the real DL_info.csv rows, with 16-bit slices of known values."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from uodb_sample_layout import DL_PIXEL_HU0, DL_PIXEL_HU_MINUS85, make_deeplesion

from damex.data.converters.deeplesion import convert_deeplesion, window_hu
from damex.errors import DatasetError


@pytest.fixture
def dl(tmp_path: Path) -> Path:
    return make_deeplesion(tmp_path / "src")


def _convert(dl: Path, tmp_path: Path, **kw: object):
    out = tmp_path / "out"
    r = convert_deeplesion(
        dl / "DL_info.csv", dl / "Images_png", out / "images", out / "train.json", **kw
    )
    return r, out


def test_window_hu_closed_form() -> None:
    raw = np.array([[32768 - 175, 32768 + 275, 32768 - 85, 32768 - 2000, 32768 + 50]])
    # window (-175, 275): width 450; -85 -> 90/450*255 = 51; 50 -> 225/450*255 = 127.5 -> 128
    assert window_hu(raw, -175, 275).tolist() == [[0, 255, 51, 0, 128]]
    with pytest.raises(ValueError, match="high > low"):
        window_hu(raw, 10, 10)


def test_deeplesion_trainval_boxes_and_windowing(dl: Path, tmp_path: Path) -> None:
    r, out = _convert(dl, tmp_path)
    COCO(str(out / "train.json"))
    data = json.loads((out / "train.json").read_text())
    # Train_Val_Test in {1, 2}: the five rows with 1 (the sample has no 2)
    assert [i["file_name"] for i in data["images"]] == [
        "000089_01_01/037.png", "000089_02_01/035.png", "000089_02_01/050.png",
        "000089_05_02/176.png", "000092_02_03/212.png",
    ]  # fmt: skip
    assert all((i["width"], i["height"]) == (512, 512) for i in data["images"])
    # 000089_01_01_037: Bounding_boxes "132.977, 171.808, 165.939, 214.029"
    first = data["annotations"][0]
    assert first["bbox"] == [132.977, 171.808, 32.962, 42.221]
    assert first["category_id"] == 1 and data["categories"] == [{"id": 1, "name": "lesion"}]
    assert (r.images, r.boxes) == (5, 5)
    # 8-bit PNG windowed with the row's DICOM window (-175, 275): HU 0 -> 175/450*255 = 99.17
    png = np.asarray(Image.open(out / "images/000089_01_01/037.png"))
    assert png.dtype == np.uint8 and png.shape == (512, 512)
    assert png[DL_PIXEL_HU0] == 99
    assert png[DL_PIXEL_HU_MINUS85] == 51
    assert png[0, 0] == 0  # HU -1000 is below the window
    # 000092_02_03_212 has the window (-1500, 500): HU 0 -> 1500/2000*255 = 191.25
    png = np.asarray(Image.open(out / "images/000092_02_03/212.png"))
    assert png[DL_PIXEL_HU0] == 191
    assert png[0, 0] == round(500 / 2000 * 255)  # HU -1000 -> 63.75 -> 64


def test_deeplesion_test_split_groups_rows(dl: Path, tmp_path: Path) -> None:
    r, out = _convert(dl, tmp_path, subsets=(3,), split="test")
    data = json.loads((out / "train.json").read_text())
    assert len(data["images"]) == 5
    two = next(i for i in data["images"] if i["file_name"] == "000091_03_01/093.png")
    boxes = [a["bbox"] for a in data["annotations"] if a["image_id"] == two["id"]]
    assert boxes == [[237.344, 224.926, 18.976, 16.393], [235.948, 231.555, 29.22, 22.355]]
    assert (r.images, r.boxes) == (5, 6)


def test_deeplesion_context_slices(dl: Path, tmp_path: Path) -> None:
    folder = dl / "Images_png/000089_01_01"
    raw = np.full((512, 512), 32768 + 275, dtype=np.uint16)  # top of the window -> 255
    Image.fromarray(raw).save(folder / "036.png")
    _, out = _convert(dl, tmp_path, context_slices=True)
    rgb = np.asarray(Image.open(out / "images/000089_01_01/037.png"))
    assert rgb.shape == (512, 512, 3)
    assert rgb[0, 0].tolist() == [255, 0, 0]  # R = slice 36, G = key slice, B = key (no 38)
    assert rgb[DL_PIXEL_HU0].tolist() == [255, 99, 99]


def _edit_csv(dl: Path, old: str, new: str) -> None:
    csv = dl / "DL_info.csv"
    text = csv.read_text()
    assert old in text
    csv.write_text(text.replace(old, new, 1))


def test_deeplesion_missing_slice_names_row_and_path(dl: Path, tmp_path: Path) -> None:
    (dl / "Images_png/000089_02_01/050.png").unlink()
    with pytest.raises(DatasetError, match=r"DL_info\.csv:4: image not found: .*000089_02_01/050"):
        _convert(dl, tmp_path)
    r, _ = _convert(dl, tmp_path, on_bad_sample="skip")
    assert r.skipped["missing image"] == 1 and r.images == 4


def test_deeplesion_bad_rows_name_the_line(dl: Path, tmp_path: Path) -> None:
    _edit_csv(dl, '"132.977, 171.808, 165.939, 214.029"', '"132.977, 171.808, 165.939"')
    with pytest.raises(DatasetError, match=r"DL_info\.csv:2: Bounding_boxes must hold 4"):
        _convert(dl, tmp_path)
    _edit_csv(dl, '"123, 181.32, 153.45, 223.888"', '"123, 181.32, 153.45, 223.888",extra')
    with pytest.raises(DatasetError, match=r"DL_info\.csv:3: expected 18 comma-separated fields"):
        _convert(dl, tmp_path)


def test_deeplesion_size_mismatch_and_empty_csv(dl: Path, tmp_path: Path) -> None:
    _edit_csv(dl, '"512, 512","-175, 275",F,71,1', '"256, 512","-175, 275",F,71,1')
    with pytest.raises(DatasetError, match=r"DL_info\.csv:2: .*Image_size says 256x512"):
        _convert(dl, tmp_path)
    (dl / "DL_info.csv").write_text("")
    with pytest.raises(DatasetError, match=r"DL_info\.csv: empty annotation file"):
        _convert(dl, tmp_path)


def test_deeplesion_existing_png_kept_unless_overwrite(dl: Path, tmp_path: Path) -> None:
    _, out = _convert(dl, tmp_path)
    png = out / "images/000089_01_01/037.png"
    Image.fromarray(np.zeros((512, 512), dtype=np.uint8)).save(png)
    _convert(dl, tmp_path)
    assert np.asarray(Image.open(png))[DL_PIXEL_HU0] == 0  # complete file kept as is
    _convert(dl, tmp_path, overwrite_images=True)
    assert np.asarray(Image.open(png))[DL_PIXEL_HU0] == 99
