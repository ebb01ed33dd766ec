"""The second generated benchmark: deterministic, valid boxes, its own domains, in the catalog."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from damex.config import DataConfig
from damex.data.catalog import build_catalog
from damex.data.synthetic import SYNTHETIC_DATASETS
from damex.data.synthetic_alt import (
    ALT_DATASETS,
    alt_split_sizes,
    ensure_alt_benchmark,
    generate_alt_benchmark,
)


def test_generates_valid_deterministic_coco(tmp_path: Path) -> None:
    a = generate_alt_benchmark(tmp_path / "a", seed=3, scale=0.1, image_size=128)
    b = generate_alt_benchmark(tmp_path / "b", seed=3, scale=0.1, image_size=128)
    assert a["datasets"] == b["datasets"]
    for name, classes in ALT_DATASETS.items():
        for split, n in alt_split_sizes(name, 0.1).items():
            ja = (tmp_path / "a" / name / "annotations" / f"{split}.json").read_bytes()
            assert ja == (tmp_path / "b" / name / "annotations" / f"{split}.json").read_bytes()
            coco = json.loads(ja)
            assert len(coco["images"]) == n
            assert [c["name"] for c in coco["categories"]] == classes
            sizes = {i["id"]: (i["width"], i["height"]) for i in coco["images"]}
            for ann in coco["annotations"]:
                x, y, w, h = ann["bbox"]
                iw, ih = sizes[ann["image_id"]]
                assert w >= 3 and h >= 3 and x >= 0 and y >= 0 and x + w <= iw and y + h <= ih
                assert 1 <= ann["category_id"] <= len(classes)
        img = json.loads((tmp_path / "a" / name / "annotations" / "train.json").read_text())
        first = img["images"][0]
        pixels = np.asarray(Image.open(tmp_path / "a" / name / "images" / first["file_name"]))
        assert pixels.shape == (first["height"], first["width"], 3) and pixels.std() > 3
    # every domain has objects, and the four domains differ in object size
    boxes = {n: sum(s["boxes"] for s in a["datasets"][n].values()) for n in ALT_DATASETS}
    assert min(boxes.values()) > 0, boxes


def test_size_imbalance_and_names_disjoint_from_the_builtin_benchmark() -> None:
    train = [alt_split_sizes(n)["train"] for n in ALT_DATASETS]
    assert max(train) / min(train) == 10
    assert not set(ALT_DATASETS) & set(SYNTHETIC_DATASETS)
    classes = [c for cs in ALT_DATASETS.values() for c in cs]
    assert len(classes) == len(set(classes))  # no class name shared between datasets


def test_catalog_and_ensure(tmp_path: Path) -> None:
    catalog = build_catalog(DataConfig(root=str(tmp_path)))
    spec = catalog["alt_cells"]
    expected = tmp_path / "synthetic_alt" / "alt_cells" / "annotations" / "val.json"
    assert spec.ann_file("val") == expected
    assert spec.classes == ["cell", "dividing"]
    root = ensure_alt_benchmark(tmp_path / "synthetic_alt", scale=0.05, image_size=96)
    assert spec.ann_file("val").is_file()
    stamp = spec.ann_file("val").stat().st_mtime_ns
    ensure_alt_benchmark(root, scale=0.05, image_size=96)  # up to date: not regenerated
    assert spec.ann_file("val").stat().st_mtime_ns == stamp
