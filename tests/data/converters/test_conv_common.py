"""convert_records / split_builder: the shared per-image loop of every converter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from damex.data.converters.common import (
    BadRecord,
    ImageRecord,
    ObjectRecord,
    convert_records,
    split_builder,
)
from damex.errors import DatasetError


def _parse(name: str) -> ImageRecord:
    if name == "bad":
        raise BadRecord("list.txt:2", "image not found: bad.png", "missing image")
    record = ImageRecord(where="list.txt:1", file_name=f"{name}.png", width=10, height=8)
    record.objects.append(ObjectRecord(where="list.txt:1", category_id=2, x0=1, y0=2, x1=4, y1=6))
    return record


def _builder(on_bad_sample: str):
    return split_builder(
        dataset="toy",
        split="test",
        categories=[(1, "a"), (2, "b")],
        on_bad_sample=on_bad_sample,
        out_of_bounds="clip",
        description="toy test",
    )


def test_convert_records_skips_bad_items_and_writes(tmp_path: Path) -> None:
    out = tmp_path / "ann" / "test.json"
    report = convert_records(_builder("skip"), ["ok", "bad"], _parse, out, progress=False)
    assert (report.dataset, report.split, report.json_path) == ("toy", "test", out)
    assert (report.images, report.boxes, report.empty_images) == (1, 1, 0)
    assert dict(report.skipped) == {"missing image": 1}
    assert report.examples["missing image"] == ["list.txt:2"]
    data = json.loads(out.read_text())
    assert [img["file_name"] for img in data["images"]] == ["ok.png"]
    assert data["annotations"][0]["bbox"] == [1.0, 2.0, 3.0, 4.0]
    assert data["categories"] == [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]


def test_convert_records_error_policy_names_the_place(tmp_path: Path) -> None:
    out = tmp_path / "test.json"
    with pytest.raises(DatasetError, match=r"^list\.txt:2: image not found: bad\.png$"):
        convert_records(_builder("error"), ["ok", "bad"], _parse, out, progress=False)
    assert not out.exists()
