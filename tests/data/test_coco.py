"""CocoDetection on real files: loading, metadata, and every kind of bad input."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from damex.data.coco import CocoDetection, load_coco_json, read_categories
from damex.data.label_space import LabelSpace
from damex.errors import DatasetError
from damex.structures import Sample

W, H = 32, 24  # every test image is 32 x 24
CATS = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]


def _color(image_id: int) -> tuple[int, int, int]:
    return (10 * image_id, 200 - 10 * image_id, 77)


def _write_dataset(
    tmp: Path, annotations: list[dict] | None = None, *, images: int = 3, fmt: str = "PNG"
) -> Path:
    """Writes ``tmp/img/{id}.png`` (solid colour per image) and ``tmp/ann.json``."""
    (tmp / "img").mkdir(exist_ok=True)
    recs = []
    for i in range(1, images + 1):
        name = f"{i}.{fmt.lower()}"
        Image.new("RGB", (W, H), _color(i)).save(tmp / "img" / name, fmt)
        recs.append({"id": i, "file_name": name, "width": W, "height": H})
    if annotations is None:
        annotations = [
            {"id": 10, "image_id": 1, "category_id": 1, "bbox": [2, 3, 10, 5]},
            {"id": 11, "image_id": 1, "category_id": 2, "bbox": [0, 0, 32, 24], "iscrowd": 0},
            {"id": 12, "image_id": 2, "category_id": 2, "bbox": [4.5, 6.5, 3, 2]},
        ]
    data = {"images": recs, "annotations": annotations, "categories": CATS}
    (tmp / "ann.json").write_text(json.dumps(data, indent=1))
    return tmp / "ann.json"


def _space() -> LabelSpace:
    # the toy dataset is the second of the run, so its unified labels are offset by 3
    return LabelSpace.build(
        [("other", [{"id": 1, "name": "x"}], 3), ("toy", CATS, None)], policy="disjoint"
    )


def _ds(tmp: Path, **kwargs) -> CocoDetection:
    return CocoDetection(tmp / "ann.json", tmp / "img", 1, _space(), **kwargs)


def test_loads_samples_and_metadata(tmp_path: Path) -> None:
    _write_dataset(tmp_path)
    ds = _ds(tmp_path)
    assert len(ds) == 3 and ds.name == "toy" and ds.num_boxes == 3
    s = ds[0]
    assert isinstance(s, Sample)
    assert s.image.dtype == torch.uint8 and s.image.shape == (3, H, W)
    assert s.image[:, 5, 7].tolist() == list(_color(1))  # RGB, channel-first, exact pixels
    assert s.boxes.dtype == torch.float32 and s.labels.dtype == torch.int64
    assert s.boxes.tolist() == [[2, 3, 12, 8], [0, 0, 32, 24]]  # xywh -> xyxy
    assert s.labels.tolist() == [3, 4]  # unified: block of "toy" starts after other's 3 slots
    assert (s.dataset_id, s.image_id, s.orig_size) == (1, 1, (H, W))
    s2 = ds[1]
    assert s2.boxes.tolist() == [[4.5, 6.5, 7.5, 8.5]] and s2.labels.tolist() == [4]
    s3 = ds[-1]  # an image without boxes is kept (negative sample)
    assert s3.image_id == 3 and s3.boxes.shape == (0, 4) and s3.labels.shape == (0,)
    info = ds.image_info(1)
    assert (info.image_id, info.file_name, info.size) == (2, "2.png", (H, W))
    assert info.path == tmp_path / "img" / "2.png"
    assert [ds.image_labels(i) for i in range(3)] == [[3, 4], [4], []]
    assert ds.num_classes_present == 2
    rep = ds.report()
    assert rep["images"] == 3 and rep["boxes"] == 3 and rep["images_without_boxes"] == 1
    assert rep["dropped_crowd"] == rep["dropped_degenerate"] == rep["clipped"] == 0
    with pytest.raises(IndexError):
        ds[3]


def test_images_are_ordered_by_id_and_jpeg_and_gray_are_rgb(tmp_path: Path) -> None:
    ann = _write_dataset(tmp_path, fmt="JPEG")
    data = json.loads(ann.read_text())
    data["images"].reverse()
    Image.new("L", (W, H), 99).save(tmp_path / "img" / "2.jpeg", "JPEG")  # grayscale file
    ann.write_text(json.dumps(data))
    ds = _ds(tmp_path)
    assert ds.image_ids == [1, 2, 3]
    gray = ds[1].image
    assert gray.shape == (3, H, W)
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    assert abs(int(gray[0, 4, 4]) - 99) <= 2


def test_transform_hook_and_pickling(tmp_path: Path) -> None:
    _write_dataset(tmp_path)

    def flip(s: Sample) -> Sample:
        return s.replace(image=s.image.flip(-1))

    ds = _ds(tmp_path, transform=flip)
    assert torch.equal(ds[0].image, _ds(tmp_path)[0].image.flip(-1))
    clone = pickle.loads(pickle.dumps(_ds(tmp_path)))  # DataLoader workers pickle it
    assert torch.equal(clone[1].boxes, _ds(tmp_path)[1].boxes)


def test_crowd_and_degenerate_boxes_are_dropped_and_counted(tmp_path: Path) -> None:
    _write_dataset(
        tmp_path,
        [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5], "iscrowd": 1},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [1, 1, 0, 5]},  # zero width
            {"id": 3, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, -2]},  # negative
            {"id": 4, "image_id": 2, "category_id": 2, "bbox": [40, 1, 5, 5]},  # fully outside
            {"id": 5, "image_id": 2, "category_id": 2, "bbox": [1, 1, 4, 4]},
        ],
    )
    ds = _ds(tmp_path)
    rep = ds.report()
    assert rep["annotations"] == 5 and rep["boxes"] == 1
    assert rep["dropped_crowd"] == 1 and rep["dropped_degenerate"] == 3
    assert ds[0].boxes.shape == (0, 4)
    assert ds[1].boxes.tolist() == [[1, 1, 5, 5]]


def test_out_of_bounds_boxes_clip_or_error(tmp_path: Path) -> None:
    _write_dataset(
        tmp_path,
        [
            {"id": 7, "image_id": 2, "category_id": 1, "bbox": [20, 10, 30, 30]},
            {"id": 8, "image_id": 2, "category_id": 1, "bbox": [-0.5, 0, 10, 24.5]},  # < 1 px
        ],
    )
    ds = _ds(tmp_path, out_of_bounds="clip")
    assert ds[1].boxes.tolist() == [[20, 10, 32, 24], [0, 0, 9.5, 24]]
    assert ds.report()["clipped"] == 2
    with pytest.raises(DatasetError, match=r"annotation id 7 \(image 2\).*outside the 32x24 image"):
        _ds(tmp_path, out_of_bounds="error")
    # within the 1 px tolerance, "error" still clips instead of raising
    near = {"id": 8, "image_id": 2, "category_id": 1, "bbox": [-0.5, 0, 10, 24.5]}
    _write_dataset(tmp_path, [near])
    assert _ds(tmp_path, out_of_bounds="error")[1].boxes.tolist() == [[0, 0, 9.5, 24]]


def test_unknown_category_names_file_record_and_known_ids(tmp_path: Path) -> None:
    _write_dataset(tmp_path, [{"id": 17, "image_id": 3, "category_id": 99, "bbox": [1, 1, 2, 2]}])
    with pytest.raises(DatasetError) as err:
        _ds(tmp_path)
    assert str(err.value) == (
        f"{tmp_path / 'ann.json'}: annotation id 17 (image 3): category_id 99 not in categories "
        "[1, 2]"
    )


def test_duplicate_ids(tmp_path: Path) -> None:
    ann = _write_dataset(tmp_path)
    data = json.loads(ann.read_text())
    data["images"][2]["id"] = 1
    ann.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"ann\.json: duplicate image id 1 \(images\[2\]\)"):
        _ds(tmp_path)
    data = json.loads(_write_dataset(tmp_path).read_text())
    data["annotations"][1]["id"] = 10
    ann.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match="duplicate annotation id 10"):
        _ds(tmp_path)


def test_malformed_json_names_line_and_column(tmp_path: Path) -> None:
    _write_dataset(tmp_path)
    (tmp_path / "ann.json").write_text('{\n  "images": [],\n  "annotations": [,]\n}\n')
    with pytest.raises(DatasetError, match=r"ann\.json: invalid JSON at line 3, column 19"):
        _ds(tmp_path)
    (tmp_path / "ann.json").write_text("[1, 2]")
    with pytest.raises(DatasetError, match="top level must be a JSON object"):
        load_coco_json(tmp_path / "ann.json")
    (tmp_path / "ann.json").write_text('{"images": [], "categories": []}')
    with pytest.raises(DatasetError, match="missing required key 'annotations'"):
        _ds(tmp_path)
    with pytest.raises(DatasetError, match="annotation file not found"):
        load_coco_json(tmp_path / "nope.json")


@pytest.mark.parametrize(
    ("where", "field", "match"),
    [
        ("annotations", "bbox", r"annotation id 10 \(image 1\): missing required field 'bbox'"),
        ("annotations", "category_id", r"annotation id 10 \(image 1\): missing required field"),
        ("images", "file_name", r"image id 1: missing required field 'file_name'"),
        ("images", "height", r"image id 1: missing required field 'height'"),
        ("categories", "name", r"categories\[0\]: missing required field 'name'"),
    ],
)
def test_missing_required_fields(tmp_path: Path, where: str, field: str, match: str) -> None:
    ann = _write_dataset(tmp_path)
    data = json.loads(ann.read_text())
    del data[where][0][field]
    ann.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=match):
        _ds(tmp_path)


def test_invalid_values(tmp_path: Path) -> None:
    _write_dataset(tmp_path, [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3]}])
    with pytest.raises(DatasetError, match=r"annotation id 1 \(image 1\): bbox must be 4 finite"):
        _ds(tmp_path)
    _write_dataset(tmp_path, [{"id": 1, "image_id": 9, "category_id": 1, "bbox": [1, 2, 3, 4]}])
    with pytest.raises(DatasetError, match="image_id 9 not in images"):
        _ds(tmp_path)


def test_categories_must_match_the_label_space(tmp_path: Path) -> None:
    ann = _write_dataset(tmp_path)
    data = json.loads(ann.read_text())
    data["categories"][1]["name"] = "wolf"
    ann.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"renamed: \[\(2, 'dog', 'wolf'\)\]"):
        _ds(tmp_path)


def test_missing_image_errors_or_is_skipped_at_construction(tmp_path: Path) -> None:
    _write_dataset(tmp_path)
    (tmp_path / "img" / "1.png").unlink()
    with pytest.raises(DatasetError, match=r"image id 1: image file not found: .*1\.png"):
        _ds(tmp_path)
    ds = _ds(tmp_path, on_bad_sample="skip")
    assert len(ds) == 2 and ds.image_ids == [2, 3]
    assert [ds.image_labels(i) for i in range(2)] == [[4], []]  # boxes stay with their image
    assert ds[0].boxes.tolist() == [[4.5, 6.5, 7.5, 8.5]]
    rep = ds.report()
    assert rep["skipped"] == 1 and rep["images"] == 2 and rep["boxes"] == 1
    assert rep["skipped_images"][0]["image_id"] == 1
    assert "not found" in rep["skipped_images"][0]["reason"]


def _truncated_jpeg(path: Path) -> None:
    buf = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 255, (H, W, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, "JPEG", quality=95)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


@pytest.mark.parametrize("kind", ["garbage", "truncated"])
def test_corrupt_image_errors_or_is_skipped_when_loaded(tmp_path: Path, kind: str) -> None:
    _write_dataset(tmp_path)
    bad = tmp_path / "img" / "2.png"
    if kind == "garbage":
        bad.write_bytes(b"\xff\xd8\xff\xe0 this is not an image")
    else:
        _truncated_jpeg(bad)
    ds = _ds(tmp_path)  # the file exists, so construction succeeds
    assert ds[0].image_id == 1
    with pytest.raises(DatasetError, match=r"ann\.json: image id 2: cannot read image .*2\.png"):
        ds[1]
    skip = _ds(tmp_path, on_bad_sample="skip")
    replaced = skip[1]  # the next readable image instead, never a silent crash
    assert replaced.image_id == 3
    assert skip[1].image_id == 3  # remembered
    rep = skip.report()
    assert rep["skipped"] == 1 and rep["skipped_images"][0]["image_id"] == 2 and rep["images"] == 2


def test_header_check_finds_unreadable_and_wrong_size_images_upfront(tmp_path: Path) -> None:
    _write_dataset(tmp_path)
    (tmp_path / "img" / "2.png").write_bytes(b"garbage")
    Image.new("RGB", (W + 1, H), 0).save(tmp_path / "img" / "3.png")
    with pytest.raises(DatasetError, match="image id 2: cannot read image"):
        _ds(tmp_path, check_images="header")
    ds = _ds(tmp_path, check_images="header", on_bad_sample="skip")
    assert ds.image_ids == [1]
    reasons = [s["reason"] for s in ds.report()["skipped_images"]]
    assert "cannot read image" in reasons[0] and "is 33x24, the JSON says 32x24" in reasons[1]


def test_size_mismatch_found_when_loading(tmp_path: Path) -> None:
    _write_dataset(tmp_path)
    Image.new("RGB", (W, H + 2), 0).save(tmp_path / "img" / "1.png")
    with pytest.raises(DatasetError, match="is 32x26, the JSON says 32x24"):
        _ds(tmp_path)[0]


def test_constructor_argument_checks(tmp_path: Path) -> None:
    _write_dataset(tmp_path)
    with pytest.raises(ValueError, match="out_of_bounds"):
        _ds(tmp_path, out_of_bounds="drop")
    with pytest.raises(ValueError, match="on_bad_sample"):
        _ds(tmp_path, on_bad_sample="ignore")
    with pytest.raises(ValueError, match="dataset_id 5"):
        CocoDetection(tmp_path / "ann.json", tmp_path / "img", 5, _space())
    assert read_categories(tmp_path / "ann.json") == CATS
