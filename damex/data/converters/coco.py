"""COCO instances JSON passthrough: native category ids, image ids, annotation ids and iscrowd.

The output keeps ``images[{id, file_name, width, height}]``, ``annotations[{id, image_id,
category_id, bbox, area, iscrowd}]`` (``area`` is COCO's own segmentation area, which COCOeval
uses for its small/medium/large ranges) and ``categories[{id, name}]`` with COCO's native,
non-contiguous ids 1..90 (checked against ``damex.data.uodb``). Segmentations are dropped
unless ``keep_segmentation=True``. Boxes are validated like every other converter's (clip and
count, zero-area skipped and counted).

Splits reproduced (docs/design.md §4.1; UODB/DAMEX): ``instances_valminusminival2014`` -> train,
``instances_minival2014`` -> test, images from ``val2014``. COCO 2017's ``val2017`` is the same
5k images as ``minival2014``, so the test split can also be made from ``instances_val2017.json``
(``file_name_fn`` renames ``000000xxxxxx.jpg`` to ``COCO_val2014_000000xxxxxx.jpg``), and the
train split from ``instances_val2014.json`` minus those image ids (``exclude_image_ids``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

from damex.data.coco_json import load_coco_json
from damex.data.converters.common import (
    BadRecord,
    CocoBuilder,
    ConversionReport,
    OnBadSample,
    OutOfBounds,
    check_not_empty,
    progress_bar,
    split_builder,
)
from damex.data.uodb import COCO_CATEGORY_IDS, COCO_CLASSES
from damex.errors import DatasetError

__all__ = ["load_coco_json", "convert_coco", "coco2014_val_name"]  # load_coco_json: re-exported

logger = logging.getLogger(__name__)

_COCO_NAME_OF_ID: dict[int, str] = dict(zip(COCO_CATEGORY_IDS, COCO_CLASSES))


def coco2014_val_name(file_name: str, image_id: int) -> str:
    """The ``val2014`` file name of a COCO image id (``COCO_val2014_%012d.jpg``)."""
    return f"COCO_val2014_{image_id:012d}.jpg"


def _check_categories(path: Path, categories: list[Mapping[str, Any]]) -> list[tuple[int, str]]:
    out = []
    for k, cat in enumerate(categories):
        try:
            cid, name = int(cat["id"]), str(cat["name"])
        except (KeyError, TypeError, ValueError):
            raise DatasetError(f"{path}: categories[{k}] needs an int 'id' and a 'name'") from None
        expected = _COCO_NAME_OF_ID.get(cid)
        if expected is None:
            raise DatasetError(f"{path}: categories[{k}] has id {cid}, not a COCO category id")
        if expected != name:
            raise DatasetError(
                f"{path}: categories[{k}] is ({cid}, {name!r}); COCO's id {cid} is {expected!r}"
            )
        out.append((cid, name))
    return sorted(out)


def _add_images(
    builder: CocoBuilder,
    json_in: Path,
    images: list[Mapping[str, Any]],
    excluded: set[int],
    file_name_fn: Callable[[str, int], str] | None,
) -> dict[int, tuple[int, int]]:
    """Add the kept ``images[]`` to ``builder``; returns image id -> ``(width, height)``."""
    sizes: dict[int, tuple[int, int]] = {}
    for k, img in enumerate(images):
        where = f"{json_in} images[{k}]"
        try:
            try:
                image_id, name = int(img["id"]), str(img["file_name"])
                width, height = int(img["width"]), int(img["height"])
            except (KeyError, TypeError, ValueError):
                raise BadRecord(
                    where, "needs int 'id', 'width', 'height' and a 'file_name'", "malformed entry"
                ) from None
            if width <= 0 or height <= 0:
                raise BadRecord(
                    where, f"size must be positive, got {width}x{height}", "malformed entry"
                )
        except BadRecord as bad:
            builder.issues.handle(bad)
            continue
        if image_id in excluded:
            continue
        if file_name_fn is not None:
            name = file_name_fn(name, image_id)
        builder.add_image(file_name=name, width=width, height=height, image_id=image_id)
        sizes[image_id] = (width, height)
    return sizes


def _add_annotations(
    builder: CocoBuilder,
    json_in: Path,
    anns: list[Mapping[str, Any]],
    sizes: Mapping[int, tuple[int, int]],
    excluded: set[int],
    *,
    keep_segmentation: bool,
    progress: bool,
) -> set[int]:
    """Add the boxes of the kept images to ``builder``; returns the ids of images given a box."""
    with_boxes: set[int] = set()
    for k, ann in enumerate(progress_bar(anns, builder.report, progress)):
        where = f"{json_in} annotations[{k}]"
        try:
            try:
                ann_id, image_id = int(ann["id"]), int(ann["image_id"])
                category_id = int(ann["category_id"])
                x, y, w, h = (float(v) for v in ann["bbox"])
                iscrowd = int(ann.get("iscrowd", 0))
                area = float(ann["area"]) if "area" in ann else None
            except (KeyError, TypeError, ValueError):
                raise BadRecord(
                    where,
                    "needs int 'id', 'image_id', 'category_id' and 'bbox' [x, y, w, h]",
                    "malformed entry",
                ) from None
            where = f"{where} (id {ann_id})"
            if image_id in excluded:
                continue
            if image_id not in sizes:
                raise BadRecord(
                    where, f"image_id {image_id} is not in images[]", "unknown image id"
                )
            written = builder.add_box(
                image_id=image_id,
                category_id=category_id,
                xyxy=(x, y, x + w, y + h),
                image_size=sizes[image_id],
                where=where,
                iscrowd=iscrowd,
                area=area,
                ann_id=ann_id,
            )
        except BadRecord as bad:
            builder.issues.handle(bad)
            continue
        if written:
            with_boxes.add(image_id)
            if keep_segmentation and "segmentation" in ann:
                builder.annotations[-1]["segmentation"] = ann["segmentation"]
    return with_boxes


def convert_coco(
    json_in: Path,
    json_out: Path,
    *,
    exclude_image_ids: Collection[int] = (),
    file_name_fn: Callable[[str, int], str] | None = None,
    keep_segmentation: bool = False,
    dataset: str = "coco",
    split: str = "train",
    on_bad_sample: OnBadSample = "error",
    out_of_bounds: OutOfBounds = "clip",
    progress: bool = False,
    allow_empty: bool = False,
) -> ConversionReport:
    """Copy a COCO instances JSON, keeping every native id.

    Args:
        json_in: a COCO ``instances_*.json``.
        json_out: the COCO JSON to write.
        exclude_image_ids: images (and their annotations) to leave out.
        file_name_fn: ``(file_name, image_id) -> new file_name`` (e.g.
            :func:`coco2014_val_name`).
        keep_segmentation: copy ``segmentation`` too.
        dataset: dataset name for the report.
        split: split name for the report.
        on_bad_sample: ``"error"`` | ``"skip"``.
        out_of_bounds: ``"clip"`` | ``"error"``.
        progress: show a tqdm bar.
        allow_empty: write a split without images instead of raising ``DatasetError``.

    Returns:
        The split's counts.

    Raises:
        DatasetError: bad input; the message names the file and the ``images[k]`` /
            ``annotations[k]`` entry.
    """
    json_in = Path(json_in)
    data = load_coco_json(json_in)
    categories = _check_categories(json_in, data["categories"])
    builder = split_builder(
        dataset=dataset,
        split=split,
        categories=categories,
        on_bad_sample=on_bad_sample,
        out_of_bounds=out_of_bounds,
        description=f"{dataset} {split} from {json_in.name}",
    )
    report = builder.report
    excluded = {int(i) for i in exclude_image_ids}
    sizes = _add_images(builder, json_in, data["images"], excluded, file_name_fn)
    with_boxes = _add_annotations(
        builder,
        json_in,
        data["annotations"],
        sizes,
        excluded,
        keep_segmentation=keep_segmentation,
        progress=progress,
    )
    report.empty_images = len(sizes) - len(with_boxes)
    check_not_empty(report, str(json_in), len(data["images"]), allow_empty=allow_empty)
    builder.write(Path(json_out))
    return report
