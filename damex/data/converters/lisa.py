"""LISA Traffic Sign Dataset ``allAnnotations.csv`` -> COCO JSON with UODB's 4 classes.

Format (LISA's ``mergeAnnotationFiles.py`` output; no real file could be checked here): ``;``-
separated with a header row; the fields used are looked up by header name: ``Filename``
(relative to the folder holding the CSV), ``Annotation tag``, ``Upper left corner X/Y``,
``Lower right corner X/Y``. One row per sign; a frame with several signs has several rows.
Frames are PNGs of varying size (read from each PNG header). Boxes are integer corners; whether
they are 0- or 1-based could not be verified, so they are taken as continuous 0-based corners
``[ulx, uly, lrx - ulx, lry - uly]``, which is what UODB/DAMEX's VOC round trip produced.

Tag -> class mapping (:func:`lisa_tag_to_class`; UODB never published its own, this is ours,
following the MUTCD sign families LISA's superclasses are named after):

* ``stop`` -> stop
* ``speedLimit*`` (15..65), ``truckSpeedLimit*``, ``schoolSpeedLimit*`` -> speedlimit
  (white regulatory speed-limit plates)
* ``noLeftTurn``, ``noRightTurn`` -> noturn
* yellow warning signs -> warning: ``addedLane, curveLeft, curveRight, dip, intersection,
  laneEnds, merge, pedestrianCrossing, rampSpeedAdvisory*, roundabout, school, signalAhead,
  slow, stopAhead, thruMergeLeft, thruMergeRight, turnLeft, turnRight, yieldAhead``
* anything else (``doNotEnter, doNotPass, keepRight, rightLaneMustTurn, yield, zoneAhead*,
  thruTrafficMergeLeft, ...``) is not a UODB class: skipped and counted per tag.

Split: UODB's ``LISA_train``/``LISA_test`` lists were never published. The caller chooses rows
through ``include`` (``damex.data.converters.prepare`` documents its default).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Mapping, Sequence
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
from damex.errors import DatasetError

__all__ = [
    "LISA_WARNING_TAGS",
    "LISA_NOTURN_TAGS",
    "lisa_tag_to_class",
    "read_lisa_rows",
    "lisa_group",
    "convert_lisa",
]

logger = logging.getLogger(__name__)

_Rows = list[tuple[int, dict[str, str]]]  # (CSV line, row) of one frame

LISA_WARNING_TAGS: frozenset[str] = frozenset(
    {
        "addedLane", "curveLeft", "curveRight", "dip", "intersection", "laneEnds", "merge",
        "pedestrianCrossing", "roundabout", "school", "signalAhead", "slow", "stopAhead",
        "thruMergeLeft", "thruMergeRight", "turnLeft", "turnRight", "yieldAhead",
    }
)  # fmt: skip
LISA_NOTURN_TAGS: frozenset[str] = frozenset({"noLeftTurn", "noRightTurn"})
_SPEEDLIMIT_PREFIXES = ("speedLimit", "truckSpeedLimit", "schoolSpeedLimit")
_WARNING_PREFIXES = ("rampSpeedAdvisory",)

_REQUIRED = (
    "Filename",
    "Annotation tag",
    "Upper left corner X",
    "Upper left corner Y",
    "Lower right corner X",
    "Lower right corner Y",
)


def lisa_tag_to_class(tag: str) -> str | None:
    """UODB class of a LISA annotation tag, or None when UODB has no such class."""
    tag = tag.strip()
    if tag == "stop":
        return "stop"
    if tag.startswith(_SPEEDLIMIT_PREFIXES):
        return "speedlimit"
    if tag in LISA_NOTURN_TAGS:
        return "noturn"
    if tag in LISA_WARNING_TAGS or tag.startswith(_WARNING_PREFIXES):
        return "warning"
    return None


def read_lisa_rows(
    csv_path: Path, issues: Issues | None = None
) -> list[tuple[int, dict[str, str]]]:
    """Read the CSV into ``(line number, {header: value})`` pairs.

    Args:
        csv_path: the annotation CSV.
        issues: bad-sample policy for rows whose field count differs from the header's
            (default: such a row raises).

    Raises:
        DatasetError: empty file, missing header fields, or a malformed row (naming the line).
    """
    try:
        text = read_text(csv_path)
    except BadRecord as bad:
        raise DatasetError(str(bad)) from None
    lines = text.splitlines()
    reader = csv.reader(lines, delimiter=";")
    header = [h.strip() for h in next(reader)]
    missing = [h for h in _REQUIRED if h not in header]
    if missing:
        raise DatasetError(
            f"{csv_path}:1: header lacks {missing}; expected ';'-separated fields including "
            f"{list(_REQUIRED)}, got {header}"
        )
    rows: list[tuple[int, dict[str, str]]] = []
    for fields in reader:
        lineno = reader.line_num
        if not fields or all(not f.strip() for f in fields):
            continue
        if len(fields) != len(header):
            bad = BadRecord(
                f"{csv_path}:{lineno}",
                f"expected {len(header)} ';'-separated fields like the header, got "
                f"{len(fields)}: {lines[lineno - 1]!r}",
                "malformed row",
            )
            if issues is None:
                raise DatasetError(str(bad))
            issues.handle(bad)
            continue
        rows.append((lineno, {h: f.strip() for h, f in zip(header, fields)}))
    return rows


def lisa_group(row: Mapping[str, str]) -> str:
    """The recording a row belongs to: ``Origin file`` if present, else the frame's folder.

    Frames of one recording are near-duplicates, so default splits keep them together.
    """
    origin = row.get("Origin file", "").strip()
    if origin:
        return origin
    return str(Path(row["Filename"]).parent)


def _sign_objects(
    csv_path: Path,
    rows: _Rows,
    classes: Sequence[str],
    class_to_id: Mapping[str, int],
    *,
    tag_to_class: Callable[[str], str | None],
    issues: Issues,
) -> list[ObjectRecord]:
    """The boxes of one frame's rows; tags without a class are skipped (counted per tag).

    Raises:
        ValueError: ``tag_to_class`` returned a name that is not one of the classes.
    """
    objects = []
    for lineno, row in rows:
        where = f"{csv_path}:{lineno}"
        tag = row["Annotation tag"]
        target = tag_to_class(tag)
        if target is None:
            issues.report.skip(f"LISA tag '{tag}' not in UODB", where)
            continue
        if target not in class_to_id:
            raise ValueError(f"tag_to_class({tag!r}) = {target!r} is not one of {classes}")
        try:
            try:
                x0, y0, x1, y1 = (float(row[h]) for h in _REQUIRED[2:])
            except ValueError:
                raise BadRecord(
                    where,
                    f"corner fields must be numbers, got {[row[h] for h in _REQUIRED[2:]]}",
                    "malformed row",
                ) from None
        except BadRecord as bad:
            issues.handle(bad)
            continue
        objects.append(
            ObjectRecord(where=where, category_id=class_to_id[target], x0=x0, y0=y0, x1=x1, y1=y1)
        )
    return objects


def convert_lisa(
    csv_path: Path,
    image_root: Path,
    json_out: Path,
    *,
    include: Callable[[Mapping[str, str]], bool] | None = None,
    classes: Sequence[str] | None = None,
    tag_to_class: Callable[[str], str | None] = lisa_tag_to_class,
    file_name_prefix: str = "",
    dataset: str = "lisa",
    split: str = "train",
    on_bad_sample: OnBadSample = "error",
    out_of_bounds: OutOfBounds = "clip",
    progress: bool = False,
    allow_empty: bool = False,
) -> ConversionReport:
    """Convert LISA's ``allAnnotations.csv`` (or a ``frameAnnotations.csv``) to a COCO JSON.

    Args:
        csv_path: the ``;``-separated annotation CSV.
        image_root: the folder ``Filename`` is relative to (usually the CSV's folder).
        json_out: the COCO JSON to write.
        include: keeps a row when it returns True (default: all rows); rows of one frame
            should all get the same answer.
        classes: default ``UODB_CLASSES["lisa"]``; native ids ``1..4`` in that order.
        tag_to_class: tag -> class name or None (skipped, counted per tag).
        file_name_prefix: prepended to ``Filename`` in ``file_name``.
        dataset: dataset name for the report.
        split: split name for the report.
        on_bad_sample: ``"error"`` | ``"skip"``.
        out_of_bounds: ``"clip"`` | ``"error"``.
        progress: show a tqdm bar.
        allow_empty: write a split without images instead of raising ``DatasetError``.

    Returns:
        The split's counts.

    Raises:
        DatasetError: bad input (the message names the CSV and its line, or the missing image).
    """
    csv_path, image_root = Path(csv_path), Path(image_root)
    classes = list(classes or UODB_CLASSES["lisa"])
    class_to_id = {name: i for i, name in enumerate(classes, start=1)}
    builder = split_builder(
        dataset=dataset,
        split=split,
        categories=list(enumerate(classes, start=1)),
        on_bad_sample=on_bad_sample,
        out_of_bounds=out_of_bounds,
        description=f"{dataset} {split} converted from {csv_path.name}",
    )
    issues = builder.issues
    frames: dict[str, _Rows] = {}
    for lineno, row in read_lisa_rows(csv_path, issues):
        if include is None or include(row):
            frames.setdefault(row["Filename"], []).append((lineno, row))

    def parse(filename: str) -> ImageRecord:
        rows = frames[filename]
        first = f"{csv_path}:{rows[0][0]}"
        width, height = read_image_size(image_root / filename, where=first)
        record = ImageRecord(
            where=first, file_name=f"{file_name_prefix}{filename}", width=width, height=height
        )
        record.objects.extend(
            _sign_objects(
                csv_path, rows, classes, class_to_id, tag_to_class=tag_to_class, issues=issues
            )
        )
        return record

    return convert_records(
        builder,
        sorted(frames),
        parse,
        json_out,
        progress=progress,
        source=f"{csv_path} (rows selected for {split})" if include else str(csv_path),
        allow_empty=allow_empty,
    )
