"""The one COCO-JSON reader: a file's top level, categories, images and annotations, validated.

Used by the training/test datasets (``damex.data.coco``), the label space, the converters, the
subset tool and the evaluation's ground truth, so that a bad file gives the same error
everywhere: the file, the record (``images[i]``, ``annotation id N (image M)``), what was
expected and what was found. Imports nothing from the rest of damex but its errors.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from damex.errors import DatasetError

__all__ = [
    "AnnotationArrays",
    "ImageRecord",
    "check_top_level",
    "load_coco_json",
    "parse_annotations",
    "parse_categories",
    "parse_images",
    "read_categories",
]

_TOP_LEVEL_KEYS = ("images", "annotations", "categories")
_MAX_IDS_IN_MESSAGE = 30
_NUMBER = (int, float)  # exact JSON number types (bool excluded)


def _fmt_ids(ids: list[int]) -> str:
    if len(ids) <= _MAX_IDS_IN_MESSAGE:
        return str(ids)
    head = ", ".join(str(i) for i in ids[:_MAX_IDS_IN_MESSAGE])
    return f"[{head}, ... ({len(ids)} ids)]"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_top_level(data: Any, source: str | Path) -> dict[str, Any]:
    """``data`` as a COCO object: a dict with ``images``, ``annotations``, ``categories`` lists.

    Raises:
        DatasetError: naming ``source``, the key, what was expected and what was found.
    """
    if not isinstance(data, dict):
        raise DatasetError(f"{source}: top level must be a JSON object, got {type(data).__name__}")
    for key in _TOP_LEVEL_KEYS:
        if key not in data:
            raise DatasetError(f"{source}: missing required key {key!r}")
        if not isinstance(data[key], list):
            raise DatasetError(f"{source}: {key!r} must be a list, got {type(data[key]).__name__}")
    return data


def load_coco_json(path: str | Path) -> dict[str, Any]:
    """Read a COCO JSON file and check its top-level structure (records are not checked).

    Returns:
        The parsed object; it has ``images``, ``annotations`` and ``categories`` lists.

    Raises:
        DatasetError: missing, empty or unreadable file, text that is not UTF-8, invalid JSON
            (with the decoder's line and column), a top level that is not an object, or a
            missing / non-list key.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM is tolerated
    except FileNotFoundError:
        raise DatasetError(f"{path}: annotation file not found") from None
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text ({e.reason})") from None
    except OSError as e:
        raise DatasetError(f"{path}: cannot read annotation file: {e}") from None
    if not text.strip():
        raise DatasetError(f"{path}: empty annotation file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(
            f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}"
        ) from None
    return check_top_level(data, path)


def parse_categories(source: str | Path, categories: list[Any]) -> list[dict[str, Any]]:
    """Validated ``[{"id", "name"}]`` sorted by id (ints, non-empty names, no duplicates)."""
    out: list[dict[str, Any]] = []
    seen: set[int] = set()
    for i, cat in enumerate(categories):
        if not isinstance(cat, dict):
            raise DatasetError(f"{source}: categories[{i}] must be an object, got {cat!r}")
        for key in ("id", "name"):
            if key not in cat:
                raise DatasetError(f"{source}: categories[{i}]: missing required field {key!r}")
        cid, name = cat["id"], cat["name"]
        if not _is_int(cid):
            raise DatasetError(f"{source}: categories[{i}]: id must be an int, got {cid!r}")
        if not isinstance(name, str) or not name:
            raise DatasetError(f"{source}: category id {cid}: name must be a non-empty string")
        if cid in seen:
            raise DatasetError(f"{source}: duplicate category id {cid}")
        seen.add(cid)
        out.append({"id": cid, "name": name})
    if not out:
        raise DatasetError(f"{source}: 'categories' is empty")
    return sorted(out, key=lambda c: c["id"])


def read_categories(path: str | Path) -> list[dict[str, Any]]:
    """The validated ``categories`` of a COCO JSON file, ``[{"id", "name"}]`` sorted by id."""
    return parse_categories(Path(path), load_coco_json(path)["categories"])


@dataclass(frozen=True)
class ImageRecord:
    """One validated ``images`` entry."""

    file_name: str
    height: int
    width: int


def parse_images(source: str | Path, images: list[Any]) -> dict[int, ImageRecord]:
    """Image id -> record, sorted by id (the order does not depend on how the JSON was written).

    Raises:
        DatasetError: a non-object entry, a missing field, a non-int or duplicate id, an empty
            file name, or a width/height that is not a positive int.
    """
    records: dict[int, ImageRecord] = {}
    for i, img in enumerate(images):
        if not isinstance(img, dict):
            raise DatasetError(f"{source}: images[{i}] must be an object, got {img!r}")
        for key in ("id", "file_name", "width", "height"):
            if key not in img:
                where = f"image id {img['id']}" if "id" in img else f"images[{i}]"
                raise DatasetError(f"{source}: {where}: missing required field {key!r}")
        iid, fname, w, h = img["id"], img["file_name"], img["width"], img["height"]
        if not _is_int(iid):
            raise DatasetError(f"{source}: images[{i}]: id must be an int, got {iid!r}")
        if iid in records:
            raise DatasetError(f"{source}: duplicate image id {iid} (images[{i}])")
        if not isinstance(fname, str) or not fname:
            raise DatasetError(f"{source}: image id {iid}: file_name must be a non-empty string")
        if not (_is_int(w) and _is_int(h) and w > 0 and h > 0):
            raise DatasetError(
                f"{source}: image id {iid}: width/height must be positive ints, got {w!r}/{h!r}"
            )
        records[iid] = ImageRecord(fname, h, w)
    return dict(sorted(records.items()))


def _where(j: int, ann: Any) -> str:
    """How an error message names annotation record ``j``."""
    if not isinstance(ann, dict):
        return f"annotations[{j}]"
    where = f"annotation id {ann['id']}" if "id" in ann else f"annotations[{j}]"
    if "image_id" in ann:
        where += f" (image {ann['image_id']})"
    return where


@dataclass(frozen=True)
class AnnotationArrays:
    """The validated ``annotations`` of a file as arrays, in file order (``A`` records).

    Attributes:
        ids: ``int64 [A]`` annotation ids (unique).
        image_ids: ``int64 [A]`` the image of each record (an id of ``images``).
        category_ids: ``int64 [A]`` native category ids (ids of ``categories``).
        boxes_xywh: ``float64 [A, 4]`` finite ``[x, y, w, h]`` pixels, as written.
        crowd: ``bool [A]`` ``iscrowd`` (missing = False).
    """

    ids: np.ndarray
    image_ids: np.ndarray
    category_ids: np.ndarray
    boxes_xywh: np.ndarray
    crowd: np.ndarray

    def where(self, j: int) -> str:
        """How an error message names record ``j``."""
        return f"annotation id {int(self.ids[j])} (image {int(self.image_ids[j])})"


def _missing_field(source: str | Path, j: int, ann: Any) -> DatasetError:
    if not isinstance(ann, dict):
        return DatasetError(f"{source}: annotations[{j}] must be an object, got {ann!r}")
    key = next(k for k in ("id", "image_id", "category_id", "bbox") if k not in ann)
    return DatasetError(f"{source}: {_where(j, ann)}: missing required field {key!r}")


def parse_annotations(
    source: str | Path,
    annotations: list[Any],
    image_ids: Collection[int],
    category_ids: Collection[int],
) -> AnnotationArrays:
    """Validate every annotation record (a lean loop: COCO train has ~860k) into arrays.

    Args:
        source: the file, for messages.
        annotations: the JSON ``annotations`` list.
        image_ids: the ids of ``images``.
        category_ids: the ids of ``categories``.

    Raises:
        DatasetError: a missing field, a non-int or duplicate id, an unknown image or
            category, or a bbox that is not 4 finite numbers.
    """
    images, cats = set(image_ids), set(category_ids)
    ids: list[int] = []
    imgs: list[int] = []
    labs: list[int] = []
    boxes: list[list[float]] = []
    crowds: list[Any] = []
    for j, ann in enumerate(annotations):
        try:
            aid, iid, cid, bbox = ann["id"], ann["image_id"], ann["category_id"], ann["bbox"]
        except (KeyError, TypeError):
            raise _missing_field(source, j, ann) from None
        if type(aid) is not int:
            raise DatasetError(f"{source}: {_where(j, ann)}: id must be an int, got {aid!r}")
        if type(iid) is not int or iid not in images:
            raise DatasetError(f"{source}: {_where(j, ann)}: image_id {iid!r} not in images")
        if type(cid) is not int or cid not in cats:
            raise DatasetError(
                f"{source}: {_where(j, ann)}: category_id {cid!r} not in categories "
                f"{_fmt_ids(sorted(cats))}"
            )
        if not (
            type(bbox) is list
            and len(bbox) == 4
            and type(bbox[0]) in _NUMBER
            and type(bbox[1]) in _NUMBER
            and type(bbox[2]) in _NUMBER
            and type(bbox[3]) in _NUMBER
        ):
            raise DatasetError(
                f"{source}: {_where(j, ann)}: bbox must be 4 finite numbers [x, y, w, h], "
                f"got {bbox!r}"
            )
        ids.append(aid)
        imgs.append(iid)
        labs.append(cid)
        boxes.append(bbox)
        crowds.append(ann.get("iscrowd", 0))
    out = AnnotationArrays(
        ids=np.array(ids, dtype=np.int64),
        image_ids=np.array(imgs, dtype=np.int64),
        category_ids=np.array(labs, dtype=np.int64),
        boxes_xywh=np.array(boxes, dtype=np.float64).reshape(-1, 4),
        crowd=np.array([bool(c) for c in crowds], dtype=bool),
    )
    uniq, counts = np.unique(out.ids, return_counts=True)
    if (counts > 1).any():
        raise DatasetError(f"{source}: duplicate annotation id {int(uniq[np.argmax(counts > 1)])}")
    finite = np.isfinite(out.boxes_xywh).all(axis=1)
    if not finite.all():
        j = int(np.argmin(finite))
        raise DatasetError(
            f"{source}: {_where(j, annotations[j])}: bbox must be 4 finite numbers "
            f"[x, y, w, h], got {annotations[j]['bbox']!r}"
        )
    return out
