"""Limited-data subsets: size, determinism, nesting, annotations of kept images only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from damex.data.subsets import main, make_subset, select_subset, subset_file_name, subset_size
from damex.errors import DatasetError


def _coco(path: Path, num_images: int) -> Path:
    images = [
        {"id": 100 + i, "file_name": f"{i}.jpg", "width": 10, "height": 10}
        for i in range(num_images)
    ]
    anns = [
        {
            "id": k + 1,
            "image_id": 100 + (k % num_images),
            "category_id": 1,
            "bbox": [0, 0, 1, 1],
            "area": 1.0,
            "iscrowd": 0,
        }
        for k in range(2 * num_images)
    ]
    path.write_text(
        json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "x"}]})
    )
    return path


def test_subset_size() -> None:
    assert subset_size(1000, 10) == 100
    assert subset_size(7, 10) == 1  # round(0.7) = 1
    assert subset_size(3, 1) == 1  # at least one image
    assert subset_size(5, 100) == 5
    for bad in (0, -1, 100.5):
        with pytest.raises(ValueError, match="percent"):
            subset_size(10, bad)


def test_make_subset_deterministic_size_and_annotations(tmp_path: Path) -> None:
    src = _coco(tmp_path / "train.json", 50)
    a = make_subset(src, tmp_path / "a.json", 10, seed=3)
    b = make_subset(src, tmp_path / "b.json", 10, seed=3)
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert (a.images_in, a.images_out, a.annotations_out) == (50, 5, 10) == (50, b.images_out, 10)
    data = json.loads((tmp_path / "a.json").read_text())
    kept = {i["id"] for i in data["images"]}
    assert len(kept) == 5
    assert {x["image_id"] for x in data["annotations"]} == kept  # all annotations of kept images
    assert data["categories"] == [{"id": 1, "name": "x"}]
    assert data["info"]["subset"] == {
        "source": "train.json",
        "percent": 10.0,
        "seed": 3,
        "images": 5,
        "of": 50,
    }
    c = make_subset(src, tmp_path / "c.json", 10, seed=4)
    other = {i["id"] for i in json.loads((tmp_path / "c.json").read_text())["images"]}
    assert c.images_out == 5 and other != kept  # another seed, another subset


def test_subsets_nest_and_ignore_file_order() -> None:
    ids = list(range(1, 201))
    small, large = select_subset(ids, 5, seed=0), select_subset(ids, 20, seed=0)
    assert len(small) == 10 and len(large) == 40 and small <= large
    assert select_subset(list(reversed(ids)), 5, seed=0) == small


def test_make_subset_bad_input(tmp_path: Path) -> None:
    empty = tmp_path / "e.json"
    empty.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    with pytest.raises(DatasetError, match=r"e\.json: no images"):
        make_subset(empty, tmp_path / "o.json", 10)
    assert not (tmp_path / "o.json").exists()


def test_make_subsets_cli(tmp_path: Path) -> None:
    ann = tmp_path / "uodb/kitti/annotations"
    ann.mkdir(parents=True)
    _coco(ann / "train.json", 20)
    assert (
        main(
            [
                "--root",
                str(tmp_path / "uodb"),
                "--datasets",
                "kitti",
                "--percent",
                "10",
                "50",
                "--seed",
                "1",
            ]
        )
        == 0
    )
    assert subset_file_name(10) == "fsPerc10_train.json"
    small = json.loads((ann / "fsPerc10_train.json").read_text())
    large = json.loads((ann / "fsPerc50_train.json").read_text())
    assert (len(small["images"]), len(large["images"])) == (2, 10)
    assert (
        main(
            [
                "--json-in",
                str(ann / "train.json"),
                "--json-out",
                str(tmp_path / "x.json"),
                "--percent",
                "25",
            ]
        )
        == 0
    )
    assert len(json.loads((tmp_path / "x.json").read_text())["images"]) == 5
    assert main(["--root", str(tmp_path / "uodb"), "--datasets", "comic", "--percent", "10"]) == 2
