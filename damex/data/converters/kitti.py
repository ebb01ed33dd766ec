"""KITTI object ``label_2`` -> COCO JSON with UODB's 3 classes (pedestrian, cyclist, vehicle).

Source layout: ``training/label_2/<id>.txt`` and ``training/image_2/<id>.png`` (only the
training half of KITTI has labels). Each line has 15 space-separated fields: ``type truncated
occluded alpha left top right bottom h w l x y z rotation_y``; the 2D box is xyxy in 0-based
float pixels and is written as ``[left, top, right - left, bottom - top]``.

Class mapping (docs/design.md §4.1 / DAMEX ``voc_to_coco.py``): Car, Van, Truck -> vehicle;
Pedestrian,
Person_sitting -> pedestrian; Cyclist -> cyclist. DontCare regions are dropped (as DAMEX did;
a COCO ignore region needs a category, and DontCare has none). Tram and Misc are dropped too:
DAMEX's mapping has no entry for them (its converter would have failed on them, so UODB's
KITTI cannot have contained them under those names) and neither is a car/van/truck. Every
dropped object is counted under ``"KITTI type '<T>' not in UODB"``. Any other type is an
unknown class (bad input).

Split: UODB's ``kittivoc_train``/``kittivoc_test`` lists were never published; KITTI's own
test labels are not public either. The caller chooses the image ids of each split
(``damex.data.converters.prepare`` documents its default); this function converts one list.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from damex.data.converters.common import (
    BadRecord,
    ConversionReport,
    ImageRecord,
    Issues,
    ObjectRecord,
    OnBadSample,
    OutOfBounds,
    convert_records,
    read_image_size,
    read_text,
    split_builder,
)
from damex.data.uodb import UODB_CLASSES

__all__ = ["KITTI_CLASS_MAP", "convert_kitti", "list_kitti_ids"]

logger = logging.getLogger(__name__)

KITTI_CLASS_MAP: dict[str, str | None] = {
    "Car": "vehicle",
    "Van": "vehicle",
    "Truck": "vehicle",
    "Pedestrian": "pedestrian",
    "Person_sitting": "pedestrian",
    "Cyclist": "cyclist",
    "Tram": None,
    "Misc": None,
    "DontCare": None,
}

_NUM_FIELDS = 15


def list_kitti_ids(label_dir: Path) -> list[str]:
    """Sorted ids (file stems) of the ``*.txt`` files in ``label_dir``."""
    return sorted(p.stem for p in Path(label_dir).glob("*.txt"))


def _parse_label_file(
    label_path: Path,
    *,
    file_name: str,
    image_path: Path,
    class_map: Mapping[str, str | None],
    class_to_id: Mapping[str, int],
    issues: Issues,
) -> ImageRecord:
    text = read_text(label_path)
    width, height = read_image_size(image_path, where=str(label_path))
    record = ImageRecord(where=str(label_path), file_name=file_name, width=width, height=height)
    for lineno, line in enumerate(text.splitlines(), start=1):
        where = f"{label_path}:{lineno}"
        fields = line.split()
        if not fields:
            continue
        try:
            if len(fields) < _NUM_FIELDS:
                raise BadRecord(
                    where,
                    f"expected {_NUM_FIELDS} space-separated fields, got {len(fields)}: {line!r}",
                    "malformed line",
                )
            kitti_type = fields[0]
            if kitti_type not in class_map:
                raise BadRecord(
                    where,
                    f"unknown KITTI type {kitti_type!r}; expected one of {sorted(class_map)}",
                    f"unknown class '{kitti_type}'",
                )
            try:
                left, top, right, bottom = (float(v) for v in fields[4:8])
            except ValueError:
                raise BadRecord(
                    where, f"bbox fields 5-8 must be numbers, got {fields[4:8]}", "malformed line"
                ) from None
        except BadRecord as bad:
            issues.handle(bad)
            continue
        target = class_map[kitti_type]
        if target is None:
            issues.report.skip(f"KITTI type '{kitti_type}' not in UODB", where)
            continue
        record.objects.append(
            ObjectRecord(
                where=where, category_id=class_to_id[target], x0=left, y0=top, x1=right, y1=bottom
            )
        )
    return record


def convert_kitti(
    label_dir: Path,
    image_dir: Path,
    json_out: Path,
    *,
    image_ids: Sequence[str] | None = None,
    classes: Sequence[str] | None = None,
    class_map: Mapping[str, str | None] | None = None,
    image_ext: str = ".png",
    file_name_prefix: str = "",
    dataset: str = "kitti",
    split: str = "train",
    on_bad_sample: OnBadSample = "error",
    out_of_bounds: OutOfBounds = "clip",
    progress: bool = False,
    allow_empty: bool = False,
) -> ConversionReport:
    """Convert KITTI ``label_2`` files to a COCO JSON.

    Args:
        label_dir: ``training/label_2``.
        image_dir: ``training/image_2`` (image sizes are read from the PNG headers).
        json_out: the COCO JSON to write.
        image_ids: ids to convert (default: every label file, sorted).
        classes: UODB class names (default ``UODB_CLASSES["kitti"]``); ids ``1..C``.
        class_map: KITTI type -> class name or None to drop (default :data:`KITTI_CLASS_MAP`).
        image_ext: image file extension.
        file_name_prefix: prepended to ``<id><ext>`` in ``file_name``.
        dataset: dataset name for the report.
        split: split name for the report.
        on_bad_sample: ``"error"`` | ``"skip"``.
        out_of_bounds: ``"clip"`` | ``"error"``.
        progress: show a tqdm bar.
        allow_empty: write a split without images instead of raising ``DatasetError``.

    Returns:
        The split's counts.

    Raises:
        DatasetError: bad input with ``on_bad_sample="error"``; the message names the label
            file and line (or the missing image).
    """
    label_dir, image_dir = Path(label_dir), Path(image_dir)
    classes = list(classes or UODB_CLASSES["kitti"])
    class_map = dict(class_map or KITTI_CLASS_MAP)
    class_to_id = {name: i for i, name in enumerate(classes, start=1)}
    for kitti_type, target in class_map.items():
        if target is not None and target not in class_to_id:
            raise ValueError(f"class_map[{kitti_type!r}] = {target!r} is not one of {classes}")
    ids = list_kitti_ids(label_dir) if image_ids is None else list(image_ids)
    builder = split_builder(
        dataset=dataset,
        split=split,
        categories=list(enumerate(classes, start=1)),
        on_bad_sample=on_bad_sample,
        out_of_bounds=out_of_bounds,
        description=f"{dataset} {split} converted from KITTI label_2 ({label_dir})",
    )

    def parse(image_id: str) -> ImageRecord:
        return _parse_label_file(
            label_dir / f"{image_id}.txt",
            file_name=f"{file_name_prefix}{image_id}{image_ext}",
            image_path=image_dir / f"{image_id}{image_ext}",
            class_map=class_map,
            class_to_id=class_to_id,
            issues=builder.issues,
        )

    source = f"{label_dir} (*.txt label files)" if image_ids is None else f"{label_dir} (ids)"
    return convert_records(
        builder, ids, parse, json_out, progress=progress, source=source, allow_empty=allow_empty
    )
